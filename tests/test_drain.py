"""How ready connections reach the pool's workers (`services/drain.py`): a job only for
an item no worker is free to take, and every job counted once."""

from __future__ import annotations

import threading
from collections.abc import Callable

from services.drain import ReadyQueue
from support import EVENTUALLY


class Pool:
    """Jobs submitted and not run yet; the test runs them when it chooses."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)


def test_a_job_per_item_up_to_the_workers_and_one_job_serves_them_all() -> None:
    pool, served = Pool(), list[int]()
    queue: ReadyQueue[int] = ReadyQueue(2, pool.submit, served.append)
    for item in range(5):
        queue.put(item)
    assert queue.call_workers()
    assert len(pool.jobs) == 2 and queue.jobs == 2
    pool.jobs.pop()()  # one job takes everything queued, in order
    assert served == [0, 1, 2, 3, 4] and queue.jobs == 1
    pool.jobs.pop()()  # the other finds nothing, and ends
    assert queue.jobs == 0
    queue.put(5)
    assert queue.call_workers() and len(pool.jobs) == 1


def test_no_job_for_an_item_a_free_job_will_take() -> None:
    pool = Pool()
    queue: ReadyQueue[int] = ReadyQueue(8, pool.submit, lambda _: None)
    queue.put(1)
    assert queue.call_workers() and len(pool.jobs) == 1
    queue.put(2)
    assert queue.call_workers() and len(pool.jobs) == 2  # two items, two free jobs
    assert queue.call_workers() and len(pool.jobs) == 2


def test_an_item_queued_while_every_job_serves_gets_a_job_of_its_own() -> None:
    # A job busy with one item (a lingering worker) is not counted on for the next.
    pool, started, release = Pool(), threading.Event(), threading.Event()

    def serve(item: int) -> None:
        if item == 1:
            started.set()
            release.wait(EVENTUALLY)

    queue: ReadyQueue[int] = ReadyQueue(8, pool.submit, serve)
    queue.put(1)
    queue.call_workers()
    first = threading.Thread(target=pool.jobs.pop())
    first.start()
    try:
        assert started.wait(EVENTUALLY)
        queue.put(2)
        assert queue.call_workers() and len(pool.jobs) == 1
        pool.jobs.pop()()
        assert queue.jobs == 1  # the first still serves
    finally:
        release.set()
        first.join(EVENTUALLY)
    assert queue.jobs == 0


def test_a_refused_job_is_not_counted_and_the_items_wait() -> None:
    pool, refusals = Pool(), [MemoryError()]  # the first submit is refused, no other

    def submit(job: Callable[[], None]) -> None:
        if refusals:
            raise refusals.pop()
        pool.submit(job)

    queue: ReadyQueue[int] = ReadyQueue(2, submit, lambda _: None)
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
    queue: ReadyQueue[int] = ReadyQueue(2, submit, served.append)
    queue.put(1)
    assert not queue.call_workers()  # the submitter took the claim: never counted
    assert queue.jobs == 0
    queued.pop()()  # runs after all: it lost the claim, and does nothing
    assert served == [] and queue.jobs == 0 and len(queue) == 1
    assert queue.take_all() == [1]
