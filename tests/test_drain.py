"""How ready connections reach the pool's workers (`services/drain.py`): a job only for
an item no job is free to take, no more jobs that do not linger than RUNNABLE, and
every job counted once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import services.drain
from services.drain import PoolQueue
from support import EVENTUALLY, wait_until


class Pool:
    """Jobs submitted and not run yet; the test runs them when it chooses."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)


def quick(served: list[int]) -> Callable[[int], bool]:
    def serve(item: int) -> bool:
        served.append(item)
        return False

    return serve


def test_a_job_per_item_up_to_runnable_and_one_job_serves_them_all() -> None:
    pool, served = Pool(), list[int]()
    queue: PoolQueue[int] = PoolQueue(32, pool.submit, quick(served))
    for item in range(10):
        queue.put(item)
    assert queue.call_workers()
    assert len(pool.jobs) == services.drain.RUNNABLE == queue.jobs
    pool.jobs.pop()()  # one job takes everything queued, in order
    assert served == list(range(10)) and queue.jobs == services.drain.RUNNABLE - 1
    while pool.jobs:  # the others find nothing, and end
        pool.jobs.pop()()
    assert queue.jobs == 0
    queue.put(10)
    assert queue.call_workers() and len(pool.jobs) == 1


def test_items_put_first_go_ahead_of_the_others_a_run_at_a_time() -> None:
    pool, served = Pool(), list[int]()
    queue: PoolQueue[int] = PoolQueue(1, pool.submit, quick(served))
    run = services.drain.FIRST_RUN
    for item in range(3):
        queue.put(item)
    for item in range(10, 10 + 2 * run):
        queue.put(item, first=True)
    assert queue.call_workers() and len(queue) == 3 + 2 * run
    pool.jobs.pop()()
    firsts = list(range(10, 10 + 2 * run))
    assert served == [*firsts[:run], 0, *firsts[run:], 1, 2]


def test_items_not_put_first_are_served_while_first_ones_keep_coming() -> None:
    # A busy client that fell behind the minimum rate because it waited must not wait
    # for good behind clients that keep ahead because they are served first.
    pool, served = Pool(), list[int]()
    behind = list(range(5))

    def serve(item: int) -> bool:
        served.append(item)
        if item >= 100 and len(served) < 200:
            queue.put(item + 1, first=True)  # a client ahead is back at once
        return False

    queue: PoolQueue[int] = PoolQueue(1, pool.submit, serve)
    for item in behind:
        queue.put(item)
    queue.put(100, first=True)
    assert queue.call_workers()
    pool.jobs.pop()()
    positions = [served.index(item) for item in behind]
    assert positions == sorted(positions)
    last_ahead = max(n for n, item in enumerate(served) if item >= 100)
    assert positions[-1] < last_ahead, "the others waited until no one was ahead"


def test_never_more_jobs_than_workers() -> None:
    pool = Pool()
    queue: PoolQueue[int] = PoolQueue(2, pool.submit, quick([]))
    for item in range(10):
        queue.put(item)
    assert queue.call_workers() and len(pool.jobs) == 2


def test_no_job_for_an_item_a_free_job_will_take() -> None:
    pool = Pool()
    queue: PoolQueue[int] = PoolQueue(8, pool.submit, quick([]))
    queue.put(1)
    assert queue.call_workers() and len(pool.jobs) == 1
    queue.put(2)
    assert queue.call_workers() and len(pool.jobs) == 2  # two items, two free jobs
    assert queue.call_workers() and len(pool.jobs) == 2


@contextmanager
def serving_first(queue: PoolQueue[int], pool: Pool, started: threading.Event) -> Iterator[None]:
    """Run the first job on a thread of its own until the block ends (it waits in its
    turn on item 1 until then)."""
    queue.put(1)
    queue.call_workers()
    first = threading.Thread(target=pool.jobs.pop())
    first.start()
    try:
        assert started.wait(EVENTUALLY)
        yield
    finally:
        first.join(EVENTUALLY)
    assert not first.is_alive()


@pytest.mark.parametrize("lingers", [True, False], ids=["lingering", "busy"])
def test_an_item_queued_while_every_runnable_job_serves(
    lingers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With one runnable job allowed: a job that lingers (waits for its client) is not
    # counted on for the next item, and another job is called; one that serves without
    # lingering comes back for it within its turn, and no job is added.
    monkeypatch.setattr(services.drain, "RUNNABLE", 1)
    pool, started, release, served = Pool(), threading.Event(), threading.Event(), []

    def serve(item: int) -> bool:
        served.append(item)
        if item == 1:
            if lingers:
                queue.linger()
            started.set()
            release.wait(EVENTUALLY)
        return lingers and item == 1

    queue: PoolQueue[int] = PoolQueue(8, pool.submit, serve)
    with serving_first(queue, pool, started):
        queue.put(2)
        assert queue.call_workers()
        assert len(pool.jobs) == (1 if lingers else 0)
        if lingers:
            pool.jobs.pop()()
            assert served == [1, 2]
        release.set()
    assert served == [1, 2] and queue.jobs == 0


def test_a_job_that_starts_to_linger_calls_another_for_what_it_was_counted_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(services.drain, "RUNNABLE", 1)
    pool, started, lingering, release = (
        Pool(), threading.Event(), threading.Event(), threading.Event()
    )  # fmt: skip

    def serve(item: int) -> bool:
        if item == 1:
            started.set()
            lingering.wait(EVENTUALLY)
            queue.linger()
            release.wait(EVENTUALLY)
        return item == 1

    queue: PoolQueue[int] = PoolQueue(8, pool.submit, serve)
    with serving_first(queue, pool, started):
        queue.put(2)
        assert queue.call_workers() and not pool.jobs  # the busy job will come back
        lingering.set()  # ... but it lingers instead
        wait_until(lambda: len(pool.jobs) == 1, what="another job called")
        pool.jobs.pop()()
        assert len(queue) == 0
        release.set()
    assert queue.jobs == 0


def test_a_job_ends_after_its_turn_while_enough_others_do_not_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Called while the first lingered, a second job takes the queue; once the first
    # stops lingering, one runnable job is enough, and the first ends without taking
    # more (else every burst of lingering would leave extra jobs fighting for the GIL).
    monkeypatch.setattr(services.drain, "RUNNABLE", 1)
    pool, started, release = Pool(), threading.Event(), threading.Event()
    served_by: list[tuple[int, str]] = []

    def serve(item: int) -> bool:
        served_by.append((item, threading.current_thread().name))
        if item == 1:
            queue.linger()
            started.set()
            release.wait(EVENTUALLY)
        return item == 1

    queue: PoolQueue[int] = PoolQueue(8, pool.submit, serve)
    with serving_first(queue, pool, started):
        queue.put(2)
        queue.put(3)
        assert queue.call_workers() and len(pool.jobs) == 1 and queue.jobs == 2
        release.set()
    assert queue.jobs == 1  # the first ended after its turn
    pool.jobs.pop()()
    first = served_by[0][1]
    assert [item for item, _ in served_by] == [1, 2, 3]
    assert all(name != first for _, name in served_by[1:])
    assert queue.jobs == 0


def test_a_refused_job_is_not_counted_and_the_items_wait() -> None:
    pool, refusals = Pool(), [MemoryError()]  # the first submit is refused, no other

    def submit(job: Callable[[], None]) -> None:
        if refusals:
            raise refusals.pop()
        pool.submit(job)

    queue: PoolQueue[int] = PoolQueue(2, submit, quick([]))
    queue.put(1)
    assert not queue.call_workers()
    assert queue.jobs == 0 and len(queue) == 1
    assert queue.call_workers() and queue.jobs == 1


def test_a_job_queued_by_a_submit_that_then_failed_runs_or_not_but_counts_once() -> None:
    queued: list[Callable[[], None]] = []

    def submit(job: Callable[[], None]) -> None:
        queued.append(job)
        raise MemoryError  # after queuing, as queue.Queue.put can

    served: list[int] = []
    queue: PoolQueue[int] = PoolQueue(2, submit, quick(served))
    queue.put(1)
    assert not queue.call_workers()  # the submitter took the claim: never counted
    assert queue.jobs == 0
    queued.pop()()  # runs after all: it lost the claim, and does nothing
    assert served == [] and queue.jobs == 0 and len(queue) == 1
    assert queue.take_all() == [1]
