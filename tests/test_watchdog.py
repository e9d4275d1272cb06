"""The watchdog's decisions, on a clock the test turns: hangs trip it; progress, idleness
and a stopped process do not."""

from __future__ import annotations

import re
import threading

import pytest

import services.ready
from services.watchdog import MIN_TIMEOUT, Lane, Watchdog
from support import EVENTUALLY, connect, running, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Work:
    """A lane's readings, set by the test."""

    def __init__(self) -> None:
        self.progress = 0
        self.pending = 1

    def lane(self) -> Lane:
        return Lane("workers", lambda: self.progress, lambda: self.pending)


def make(work: Work, timeout: float = 10.0) -> tuple[Watchdog, Clock]:
    clock = Clock()
    watchdog = Watchdog([work.lane()], timeout, on_trip=lambda _: None, clock=clock)
    watchdog.check(clock.now)  # the first look sets the clocks, as start() does
    return watchdog, clock


def run_checks(watchdog: Watchdog, clock: Clock, seconds: float) -> str | None:
    """Check on time, every interval, for `seconds`; the first trip's reason."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += watchdog.interval
        reason = watchdog.check(clock.now)
        if reason is not None:
            return reason
    return None


def test_work_waiting_without_progress_for_longer_than_the_timeout_trips_it() -> None:
    watchdog, clock = make(Work())
    assert run_checks(watchdog, clock, 9.0) is None
    reason = run_checks(watchdog, clock, 2.0)
    assert reason is not None and reason.startswith("workers made no progress for ")
    assert watchdog.tripped and watchdog.stalled_seconds > 10.0


def test_progress_restarts_the_clock() -> None:
    work = Work()
    watchdog, clock = make(work)
    for _ in range(10):
        assert run_checks(watchdog, clock, 8.0) is None
        work.progress += 1
    assert not watchdog.tripped


def test_nothing_waiting_is_never_a_hang() -> None:
    work = Work()
    work.pending = 0
    watchdog, clock = make(work)
    assert run_checks(watchdog, clock, 100.0) is None
    assert watchdog.stalled_seconds == 0


def test_a_stopped_process_is_not_a_hung_one_and_real_hangs_still_trip_after() -> None:
    watchdog, clock = make(Work())
    assert run_checks(watchdog, clock, 5.0) is None
    clock.now += 30.0  # SIGSTOP, `docker pause`, a frozen host: the check runs 30 s late
    assert watchdog.check(clock.now) is None
    assert watchdog.freezes == 1
    assert watchdog.stalled_seconds == 0
    # Still no progress, checked on time from here on: a full timeout later, it trips.
    assert run_checks(watchdog, clock, 9.0) is None
    assert run_checks(watchdog, clock, 2.0) is not None


def test_a_check_a_little_late_is_not_a_freeze() -> None:
    watchdog, clock = make(Work())
    clock.now += watchdog.interval + watchdog.late * 0.9
    watchdog.check(clock.now)
    assert watchdog.freezes == 0
    assert watchdog.stalled_seconds > 0


def test_a_timeout_under_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="under"):
        Watchdog([Work().lane()], MIN_TIMEOUT - 0.5, on_trip=lambda _: None)


def test_quiet_clients_holding_every_worker_with_no_idle_timeout_do_not_trip_it() -> None:
    # Connection dispatch, idle timeout off: a quiet client holds the only worker for
    # good while another waits. That is the configuration's doing, not a hang.
    trips: list[str] = []
    with (
        running(
            "queue",
            on_trip=trips.append,
            dispatch="connection",
            workers=1,
            queue_size=2,
            idle_timeout=None,
            send_timeout=1.0,
            watchdog_timeout=MIN_TIMEOUT,
        ) as server,
        connect(server.address),
        connect(server.address),
    ):
        wait_until(lambda: server.stats.queued.value == 1, what="the second to queue")
        watchdog = server.service.watchdog
        assert watchdog is not None
        # Two timeouts' worth of checks after the queue formed.
        wanted = watchdog.checks + int(2 * MIN_TIMEOUT / watchdog.interval) + 1
        wait_until(lambda: watchdog.checks >= wanted, what="two timeouts of checks")
        assert not trips and not watchdog.tripped


class OutOfMemoryAtFirst(threading.Event):
    """An event whose first waits cannot allocate their lock, as under a flood."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def wait(self, timeout: float | None = None) -> bool:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("can't allocate lock")
        return super().wait(timeout)


@pytest.mark.faults
def test_the_watchdog_outlives_running_out_of_memory_and_still_trips_on_a_hang() -> None:
    tripped = threading.Event()
    readings = iter([0, MemoryError(), *[0] * 1000])

    def progress() -> int:  # no progress ever; the first check's reading cannot allocate
        reading = next(readings)
        if isinstance(reading, MemoryError):
            raise reading
        return 0

    watchdog = Watchdog(
        [Lane("workers", progress, lambda: 1)], MIN_TIMEOUT, on_trip=lambda _: tripped.set()
    )
    watchdog._stop = OutOfMemoryAtFirst(failures=2)
    watchdog.start()
    try:
        assert tripped.wait(EVENTUALLY), "the watchdog died of the failures, or never looked"
    finally:
        watchdog.stop()


def test_a_hung_worker_trips_the_watchdog_and_the_metric_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In this process, with the trip reported instead of exiting: the scrape cannot race
    # the exit, as it would against a process that trips.
    release = threading.Event()

    def hang(*_args: object, **_kwargs: object) -> None:
        release.wait(EVENTUALLY)
        raise ConnectionResetError("released")

    monkeypatch.setattr(services.ready, "echo_turn", hang)
    trips: list[str] = []
    with (
        running("queue", on_trip=trips.append, workers=1, watchdog_timeout=MIN_TIMEOUT) as server,
        connect(server.address) as hung,
        connect(server.address) as waiting,
    ):
        try:
            assert server.sample("echo_watchdog_tripped") == 0
            hung.sendall(b"x")
            waiting.sendall(b"y")
            wait_until(lambda: trips, what="the watchdog to trip")
            # The one worker leads: its own lane trips, or the workers' lane if it took
            # both events in one batch (then queued, and waiting for it).
            assert re.search(r"(leader|workers) made no progress", trips[0]), trips
            assert server.sample("echo_watchdog_tripped") == 1
        finally:
            release.set()
