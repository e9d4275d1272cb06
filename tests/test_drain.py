"""How ready connections reach the pool's workers (`services/drain.py`): one job leads at
a time, serves what is queued and what it takes, hands the lead on before it lingers,
and every job is counted once."""

from __future__ import annotations

import threading
from collections.abc import Callable

import services.drain
from services.drain import PoolQueue
from support import EVENTUALLY


class Pool:
    """Jobs submitted and not run yet; the test runs them when it chooses."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)


class Leading:
    """A PoolQueue's callbacks: `take` hands out `events` one call at a time (an int to
    serve at once, a list to queue, None for nothing) and stops the pool once they
    run out; `serve` records what it served."""

    def __init__(self, events: list[int | list[int] | None], workers: int = 4) -> None:
        self.pool = Pool()
        self.events = events
        self.served: list[int] = []
        self.lingers: set[int] = set()  # items whose turn lingers
        self.stopped = False
        self.unleads = 0
        self.queue: PoolQueue[int] = PoolQueue(
            workers,
            self.pool.submit,
            self.serve,
            take=self.take,
            stopping=lambda: self.stopped,
            unlead=self.unlead,
        )

    def take(self, timeout: float) -> int | None:
        assert timeout == services.drain.WAIT
        if not self.events:
            self.stopped = True
            return None
        event = self.events.pop(0)
        if isinstance(event, list):
            for item in event:
                self.queue.put(item, first=item >= 100)
            return None
        return event

    def serve(self, item: int) -> bool:
        self.served.append(item)
        if item in self.lingers:
            self.queue.linger()
            return True
        return False

    def unlead(self) -> None:
        self.unleads += 1

    def run_next_job(self) -> None:
        self.pool.jobs.pop(0)()


def leads(queue: PoolQueue[int]) -> bool:
    """`queue.led`, read afresh (a property mypy would take as fixed once asserted)."""
    return queue.led


def test_one_job_leads_and_serves_what_it_takes_and_what_is_queued() -> None:
    leading = Leading([1, [2, 3], None, 4])
    queue = leading.queue
    assert queue.call_workers() and queue.call_workers()
    assert len(leading.pool.jobs) == 1 and queue.jobs == 1 and leads(queue)  # one leader only
    leading.run_next_job()
    assert leading.served == [1, 2, 3, 4]
    assert queue.jobs == 0 and not leads(queue) and leading.unleads == 1  # stopped, settled


def test_items_put_first_go_ahead_of_the_others_a_run_at_a_time() -> None:
    run = services.drain.FIRST_RUN
    firsts = list(range(100, 100 + 2 * run))
    leading = Leading([[0, 1, 2, *firsts]], workers=1)
    assert leading.queue.call_workers()
    leading.run_next_job()
    assert leading.served == [*firsts[:run], 0, *firsts[run:], 1, 2]


def test_items_not_put_first_are_served_while_first_ones_keep_coming() -> None:
    # A busy client that fell behind the minimum rate because it waited must not wait
    # for good behind clients that keep ahead because they are served first.
    behind = list(range(5))
    leading = Leading([[*behind, 100]], workers=1)
    serve = leading.serve

    def serve_and_come_back(item: int) -> bool:
        if item >= 100 and len(leading.served) < 200:
            leading.queue.put(item + 1, first=True)  # a client ahead is back at once
        return serve(item)

    leading.serve = serve_and_come_back  # type: ignore[method-assign]
    leading.queue._serve = serve_and_come_back
    assert leading.queue.call_workers()
    leading.run_next_job()
    served = leading.served
    positions = [served.index(item) for item in behind]
    assert positions == sorted(positions)
    last_ahead = max(n for n, item in enumerate(served) if item >= 100)
    assert positions[-1] < last_ahead, "the others waited until no one was ahead"


def test_a_turn_that_lingers_hands_the_lead_to_a_follower_and_then_follows() -> None:
    leading = Leading([1, 2])
    leading.lingers.add(1)
    queue = leading.queue
    assert queue.call_workers()
    leading.run_next_job()  # serves 1, which lingers: another job leads, and this one ends
    assert leading.served == [1] and len(leading.pool.jobs) == 1
    assert queue.jobs == 1 and leads(queue) and leading.unleads == 0
    leading.run_next_job()  # the follower leads: serves 2, then stops
    assert leading.served == [1, 2] and queue.jobs == 0 and not leads(queue)


def test_a_lingering_turn_leads_again_when_no_follower_could() -> None:
    leading = Leading([1, 2], workers=1)
    leading.lingers.add(1)
    queue = leading.queue
    assert queue.call_workers()
    assert not queue.followed(lingering=False)  # every worker has a job: no follower
    leading.run_next_job()  # 1 lingers, no worker is free to lead: it leads on, serves 2
    assert leading.served == [1, 2] and not leading.pool.jobs
    assert queue.jobs == 0 and not leads(queue)


def test_followed_only_with_nothing_queued_and_a_worker_free() -> None:
    leading = Leading([], workers=2)
    queue = leading.queue
    assert queue.followed(lingering=False)
    queue.put(1)
    assert not queue.followed(lingering=False)  # the leader has more to serve
    assert queue.take_all() == [1]
    assert queue.call_workers() and queue.followed(lingering=False)  # a worker is free
    queue.linger()  # its turn lingers: the second worker is called to lead
    assert queue.jobs == 2 and not queue.followed(lingering=False)  # none free to start
    assert queue.followed(lingering=True)  # one leads: the lingering turn goes on


def test_never_more_jobs_than_workers() -> None:
    leading = Leading([1], workers=1)
    leading.lingers.add(1)
    queue = leading.queue
    assert queue.call_workers()
    queue.linger()  # as a lingering turn does: the lead is free, but no worker is
    assert queue.call_workers() and len(leading.pool.jobs) == 1 and queue.jobs == 1


def test_a_refused_job_is_not_counted_and_the_lead_stays_free() -> None:
    leading, refusals = Leading([1]), [MemoryError()]  # the first submit is refused

    def submit(job: Callable[[], None]) -> None:
        if refusals:
            raise refusals.pop()
        leading.pool.submit(job)

    leading.queue._submit = submit
    assert not leading.queue.call_workers()
    assert leading.queue.jobs == 0 and not leads(leading.queue)
    assert leading.queue.call_workers() and leading.queue.jobs == 1


def test_a_job_queued_by_a_submit_that_then_failed_runs_or_not_but_counts_once() -> None:
    leading = Leading([1])
    queued: list[Callable[[], None]] = []

    def submit(job: Callable[[], None]) -> None:
        queued.append(job)
        raise MemoryError  # after queuing, as queue.Queue.put can

    leading.queue._submit = submit
    assert not leading.queue.call_workers()  # the submitter took the claim: never counted
    assert leading.queue.jobs == 0
    queued.pop()()  # runs after all: it lost the claim, and does nothing
    assert leading.served == [] and leading.queue.jobs == 0 and not leads(leading.queue)


def test_a_leader_that_fails_ends_and_frees_the_lead() -> None:
    # serve() never raises; if it did, the lead must not stay held by a job that ended.
    leading = Leading([1, 2])

    def broken(item: int) -> bool:
        raise RuntimeError(item)

    leading.queue._serve = broken
    assert leading.queue.call_workers()
    job = leading.pool.jobs.pop()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except RuntimeError as error:
            failed.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(EVENTUALLY)
    assert failed and leading.queue.jobs == 0 and not leads(leading.queue)
    assert leading.unleads == 1


def test_the_leader_lane_sees_a_turn_under_way_and_not_a_lingering_one() -> None:
    leading = Leading([1, 2, 3])
    leading.lingers.add(2)
    queue = leading.queue
    seen: list[tuple[int, bool]] = []
    serve = leading.serve

    def watched(item: int) -> bool:
        seen.append((queue.turns, queue.in_turn))
        lingered = serve(item)
        seen.append((queue.turns, queue.in_turn))
        return lingered

    queue._serve = watched
    assert queue.call_workers()
    leading.run_next_job()  # 1, then 2 lingers: no longer the leader's turn
    assert seen == [(1, True), (1, True), (2, True), (2, False)]
    leading.run_next_job()  # the follower: 3
    assert seen[-2:] == [(3, True), (3, True)] and not queue.in_turn
