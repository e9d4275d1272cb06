"""What the pool's leader does between turns (`ready` dispatch, `services/drain.py`):
wait on the parked set, take what is ready out of the parking lists, queue a batch in
the order the cap's fairness needs and count it, and keep its turns' counts in a
tally of its own, added to the shared counters now and then.

Everything here runs on whichever worker leads, except what runs under the parking
lock (`Parked.lock`), which the event loop's thread and a lingering worker share.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.accepting import next_backoff
from services.concurrency import SharedCounter
from services.config import Config
from services.connection import Connection, served_first
from services.drain import PoolQueue
from services.echo import FLUSH_INTERVAL
from services.logs import RateLimitedLog
from services.loop import EventLoop
from services.parked import INTEREST, ParkedSet
from services.parking import Parking
from services.states import Closed, State
from services.stats import ServerStats, Tally, retrying

log = logging.getLogger("echo.ready")

# Events the leader takes per wait: enough to order a backlog (rate-keepers first), few
# enough that what it leaves in the kernel meanwhile is not kept waiting for long.
BATCH = 64


@dataclass(frozen=True)
class Parked:
    """Where parked connections are, shared with the event loop's thread: the epoll set,
    the parking lists, the lock held to change either, and how to close one."""

    set: ParkedSet
    parking: Parking
    lock: threading.Lock
    close: Callable[[Connection, Closed], None]


class Leader:
    def __init__(
        self,
        config: Config,
        stats: ServerStats,
        loop: EventLoop,
        parked: Parked,
        *,
        submit: Callable[[Callable[[], None]], None],
        serve: Callable[[Connection], bool],
    ) -> None:
        self._config = config
        self._stats = stats
        self._loop = loop
        self._set, self._parking, self._lock, self._close = (
            parked.set,
            parked.parking,
            parked.lock,
            parked.close,
        )
        self.queue: PoolQueue[Connection] = PoolQueue(
            config.workers,
            submit,
            serve,
            take=self.take,
            stopping=lambda: loop.stopping,
            unlead=self.stop_leading,
        )
        self._warn = RateLimitedLog(log)
        self._wait_backoff = 0.0  # after the set's wait failed
        # The leader's turns' counts, added up before it waits, before it hands the lead
        # on, and at least every FLUSH_INTERVAL (`take`): whoever leads, only it.
        self.tally = Tally()
        self._flush_at = 0.0
        # Seconds the leaders have spent on anything but waiting for events, which is
        # how near the one thread that serves every event is to its limit
        # (`echo_leader_busy_seconds_total`): from each wait's return to the next wait.
        self.busy_seconds = 0.0
        self._busy_since: float | None = None  # the last wait returned, if one leads

    def take(self, timeout: float) -> Connection | None:
        """Wait up to `timeout` for parked connections with an event, and queue them; or
        the one to serve at once."""
        self.end_busy()
        try:
            if self.tally:  # kept no longer than FLUSH_INTERVAL, busy or not
                timeout = min(timeout, max(self._flush_at - time.monotonic(), 0.0))
            woken: list[Connection | None] = list(self._set.wait(timeout, BATCH))
            self._busy_since = woke = time.monotonic()
            if self.tally and woke >= self._flush_at:
                self.flush_tally()
        except MemoryError:  # after epoll_wait took the events, they are lost with the list
            with self._lock:
                self.arm_again()
            self._pause(errno.ENOMEM)
            return None
        except (OSError, ValueError) as error:  # the kernel failed; or closed: stopping
            if not self._loop.stopping:
                self._pause(getattr(error, "errno", None) or errno.EINVAL, error)
            return None
        self._wait_backoff = 0.0
        with self._lock:
            if len(woken) == 1 and not self.queue:
                # Alone: served at once, without being counted queued on the way.
                conn = woken[0]
                return conn if conn is not None and self._take_parked(conn) else None
            if woken:
                self._queue_woken(woken)
        return None

    def end_busy(self) -> None:
        """The leader is about to wait, or stops leading: count its time since the last
        wait as busy (by the leader)."""
        if self._busy_since is not None:
            self.busy_seconds += time.monotonic() - self._busy_since
            self._busy_since = None

    def stop_leading(self) -> None:
        """A job stops leading (its turn lingers, or it ends): it settles what it kept.
        Never raises."""
        self.end_busy()
        self.flush_tally()

    def flush_tally(self) -> None:
        """Add the leader's counts to the shared counters (by the leader). Never raises:
        out of memory, they wait for the next flush."""
        self._flush_at = time.monotonic() + FLUSH_INTERVAL
        with contextlib.suppress(MemoryError):
            self.tally.flush()

    def _pause(self, code: int, error: BaseException | None = None) -> None:
        """After a failed wait: pause as accept does (10 ms, doubling to 1 s while it
        fails), so that a wait that fails at once does not spin."""
        self._wait_backoff = next_backoff(code, self._wait_backoff)
        self._warn.warning(
            "waiting for events failed (%r); pausing %.3f s",
            error or MemoryError(),
            self._wait_backoff,
        )
        time.sleep(self._wait_backoff)

    def arm_again(self) -> None:
        """Arm every parked connection again (`_lock` held): each may have had its event
        taken, and nothing else would serve it. Armed already, no harm."""
        for conn in list(self._parking.watched()):
            if self._set.holds(conn):
                with contextlib.suppress(OSError):  # closed meanwhile, or epoll_ctl failed
                    self._set.arm(conn, INTEREST[conn.state])

    def _queue_woken(self, woken: list[Connection | None]) -> None:
        """Queue connections with an event (`_lock` held), and count them in one step
        per state they leave, not one per connection. Never raises: each event is
        taken, and a connection neither served nor closed would wait forever.
        Overwrites `woken` (None for each connection it does not queue)."""
        readers, writers = self._unpark_woken(woken)
        self._count_queued(woken, State.WAITING, readers)
        self._count_queued(woken, State.WRITING, writers)
        now = time.monotonic()
        for conn in woken:
            if conn is None:
                continue
            conn.state = State.QUEUED
            try:
                self.queue.put(conn, served_first(conn, self._config.min_rate, now))
            except MemoryError:
                self._close(conn, Closed.ERROR)

    def _unpark_woken(self, woken: list[Connection | None]) -> tuple[int, int]:
        """Take the parked ones out of their sets; how many were reading, and writing."""
        readers = writers = 0
        for i, conn in enumerate(woken):
            if conn is None:
                continue
            if not self._take_parked(conn):
                woken[i] = None
                continue
            if conn.woke_writable:
                writers += 1
            else:
                readers += 1
        return readers, writers

    def _take_parked(self, conn: Connection) -> bool:
        """Take a connection with an event out of the parking lists (`_lock` held); False
        if it is not there: closed since its event came (the descriptor's number may be
        another connection's by now: then that one has a turn with nothing to read)."""
        if not self._parking.take(conn):
            return False
        conn.woke_writable = conn.state is State.WRITING  # a resting one has no events
        conn.ready_at = time.monotonic()
        return True

    def _count_queued(self, woken: list[Connection | None], source: State, count: int) -> None:
        """Count the `count` connections of `woken` in `source` as queued (the caller
        sets their state); closes them if that fails."""
        stats = self._stats
        try:
            if count:
                retrying(stats.move, stats.counter(source), stats.queued, count)
        except MemoryError:
            for i, conn in enumerate(woken):
                if conn is not None and conn.state is source:
                    self._close(conn, Closed.ERROR)
                    woken[i] = None

    def count_turn(
        self, source: SharedCounter, parked: SharedCounter, traffic: tuple[int, int, int]
    ) -> None:
        """A turn on the leader ends parked: its counts kept in the leader's tally."""
        stats, tally = self._stats, self.tally
        if source is not parked:
            tally.add(source, -1)
            tally.add(parked, 1)
        tally.add(stats.started, 1)
        if any(traffic):
            received, sent, messages = traffic
            tally.add(stats.received_bytes, received)
            tally.add(stats.sent_bytes, sent)
            tally.add(stats.messages, messages)
