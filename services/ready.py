"""`ready` dispatch: connections wait in the event loop, and a worker serves one only
while it has bytes to echo.

The production shape (gunicorn's gthread, cheroot's ConnectionManager, Tomcat
NIO): the event loop's thread owns every admitted connection while it waits,
whether for bytes (`waiting`) or for a client that does not read to take its
echo (`writing`). When one is ready the loop queues it for the pool (`queued`,
`services/drain.py`); a worker echoes what is there without waiting for more
(`busy`), arms it for its next event (`services/parked.py`) and hands it back
through a queue and a wake-up. So a waiting connection costs a descriptor and a
few hundred bytes, never a thread, and N slow clients cannot hold a pool of N.

The loop also enforces what used to need a worker's blocking socket (who is due:
`services/parking.py`):
- idle timeout, from the connection's last byte;
- send timeout: a `writing` connection that took nothing for that long is closed
  as `slow_reader`;
- an output budget for echoes read but not yet taken: past half of it, workers read
  from a client only what they could echo, and the rest waits in the kernel, where
  TCP's window holds the client back; over all of it (turns under way overshoot),
  the longest-stalled writer holding an echo is closed. So a flood of slow readers
  can neither fill the memory nor make the server churn through reconnections;
- the connection cap: at it, a newcomer takes the place of a waiting connection that
  is behind the minimum rate (it has sent fewer than `--min-rate` bytes a second over
  its life), the furthest behind first; if every connection keeps to the rate, the
  newcomer is refused. Never one in a worker or with an echo in flight. So an
  attacker who holds the cap with connections that are merely fresh cannot push out
  the clients already served (docs/design.md).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections import deque

from services.config import Config
from services.connection import Connection, served_first, writers_to_close
from services.dispatch import Dispatch, Submit
from services.drain import PoolQueue
from services.echo import Turn, close_reason_for, echo_turn, set_kernel_timeout, worker_buffer
from services.ledger import Ledger
from services.logs import RateLimitedLog, quietly
from services.loop import EventLoop
from services.parked import INTEREST, READ, WRITE, ParkedSet
from services.parking import Parking
from services.states import Closed, State, Wait
from services.stats import ServerStats, retrying

log = logging.getLogger("echo.ready")

_HANDBACKS_PER_WAKE = 4096  # so a flood of hand-backs cannot starve accept and timeouts
_EVENTS_PER_WAKE = 1024  # likewise for events; the rest are there at the next select()
# A writer that woke for writability and could send nothing waits this long before it is
# watched again: under TCP memory pressure the kernel reports writable sockets that take
# nothing, and watching them again at once spins (docs/design.md).
WRITABLE_REST = 0.5


class ReadyDispatch(Dispatch):
    def __init__(
        self, config: Config, stats: ServerStats, ledger: Ledger, loop: EventLoop, submit: Submit
    ) -> None:
        self._config = config
        self._stats = stats
        self._ledger = ledger
        self._loop = loop
        self.entry = State.WAITING
        self.queue_capacity = config.max_connections
        self._parked = ParkedSet()  # what parked connections wait for
        self._queue: PoolQueue[Connection] = PoolQueue(config.workers, submit, self.serve_turn)
        self._warn = RateLimitedLog(log)
        self._parking = Parking(  # the loop's lists of parked connections
            config.idle_timeout, config.send_timeout, config.min_rate, WRITABLE_REST
        )
        self._handbacks: deque[Connection] = deque()  # from workers, counted as parked
        self._one: list[Connection | None] = [None]  # `_ready`'s batch of one
        self._loop_done = False  # the loop has ended: workers close what they hand back
        self.taken_back = 0  # hand-backs taken (the watchdog's progress; the loop's thread)
        try:
            loop.watch(self._parked, selectors.EVENT_READ, self._on_events)
        except BaseException:
            self._parked.close()
            raise
        loop.after_each_wait(self._after_wait, self.next_deadline)
        loop.on_wake(self._after_wake)

    # -- on the loop's thread ------------------------------------------------------------

    def _after_wake(self) -> None:
        self.take_back()

    def _after_wait(self, now: float) -> None:
        # Woken or not: a hand-back whose wake-up was lost waits one turn at most.
        self.take_back()
        self.expire(now)

    def admit(self, sock: socket.socket) -> None:
        """A new connection, already counted as `waiting`: park it until it sends."""
        # Blocking mode, so that a lingering worker waits in recv() itself, for at most
        # the linger (SO_RCVTIMEO); every other call passes MSG_DONTWAIT (echo_turn).
        # An accepted socket is blocking already, and setblocking() is a system call
        # that hands the GIL away from the loop's thread: only when it is not.
        if sock.gettimeout() is not None:
            sock.setblocking(True)
        if self._config.linger:
            set_kernel_timeout(sock, socket.SO_RCVTIMEO, self._config.linger)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        conn = Connection(sock, now)  # WAITING
        self._parking.park(conn, now)
        try:
            self._parked.add(conn, READ)
        except BaseException:
            self._parking.unpark(conn)
            raise

    def _on_events(self, _parked: ParkedSet, _mask: int) -> None:
        try:
            woken: list[Connection | None] = list(self._parked.with_events(_EVENTS_PER_WAKE))
        except MemoryError:  # after epoll_wait took the events, they are lost with the list
            self._arm_again()
            raise
        self._queue_woken(woken)
        self._call_workers()
        if woken:
            self._stats.loop_lag.observe(time.monotonic() - self._loop.woke_at)

    def _arm_again(self) -> None:
        """Arm every parked connection again, and every one handed back: each may have
        had its event taken, and nothing else would serve it. Armed already, no harm."""
        parked = [
            *self._parking.watched(),
            *(conn for conn in list(self._handbacks) if conn.state in INTEREST),
        ]
        for conn in parked:
            if self._parked.holds(conn):
                with contextlib.suppress(OSError):  # closed meanwhile, or epoll_ctl failed
                    self._parked.arm(conn, INTEREST[conn.state])

    def _queue_one(self, conn: Connection) -> None:
        """Queue one connection with an event for the pool (see `_queue_woken`)."""
        self._one[0] = conn  # a list made beforehand: this allocates nothing
        self._queue_woken(self._one)

    def _queue_woken(self, woken: list[Connection | None]) -> None:
        """Queue connections with an event for the pool (`_call_workers()` after), and
        count them in one step per state they leave, not one per connection: at the
        cap, the loop's thread is what every connection waits for. Never raises: each
        event is taken, and a connection neither served nor closed would wait forever.
        Overwrites `woken` (None for each connection it does not queue)."""
        readers, writers = self._unpark_woken(woken)
        self._count_queued(woken, State.WAITING, readers)
        self._count_queued(woken, State.WRITING, writers)
        now = time.monotonic()
        for i, conn in enumerate(woken):
            if conn is None:
                continue
            woken[i] = None  # `_one` keeps no connection alive
            conn.state = State.QUEUED
            conn.ready_at = now
            try:
                self._queue.put(conn, served_first(conn, self._config.min_rate, now))
            except MemoryError:
                self._close(conn, Closed.ERROR)

    def _unpark_woken(self, woken: list[Connection | None]) -> tuple[int, int]:
        """Take the parked ones out of their sets; how many were reading, and writing."""
        readers = writers = 0
        for i, conn in enumerate(woken):
            if conn is None:
                continue
            if not self._parking.take(conn):
                # Handed back but not taken back yet (its worker armed it before handing
                # it back): served once it is; or closed earlier in the same batch.
                conn.early = True
                woken[i] = None
                continue
            conn.woke_writable = conn.state is State.WRITING  # a resting one has no events
            if conn.woke_writable:
                writers += 1
            else:
                readers += 1
        return readers, writers

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

    def _call_workers(self) -> None:
        """Jobs on the pool for the queued connections; those the pool refused wait for
        the next call (at the latest, the next tick), or for close_all()."""
        if self._queue and not self._queue.call_workers() and not self._loop.stopping:
            self._warn.warning(
                "the pool refused a job; %d ready connection(s) wait", len(self._queue)
            )

    @property
    def handbacks_waiting(self) -> int:
        """Connections handed back and not yet taken (the watchdog's hand-back lane)."""
        return len(self._handbacks)

    def take_back(self) -> None:
        """Park what the workers handed back; then keep the output budget. While the
        loop runs only its thread takes from `_handbacks`, and workers only append."""
        if not self._handbacks:
            return
        now = time.monotonic()
        for _ in range(min(len(self._handbacks), _HANDBACKS_PER_WAKE)):
            conn = self._handbacks.popleft()
            if self._loop.stopping:
                self._close(conn, Closed.SHUTDOWN)
            else:
                try:
                    self._parking.park(conn, now)
                except MemoryError:
                    self._close(conn, Closed.ERROR)
                else:
                    if conn.early:  # its event came while it was on its way back
                        conn.early = False
                        self._queue_one(conn)
            with contextlib.suppress(MemoryError):  # past 256 an int allocates
                self.taken_back += 1
        if self._loop.stopping:
            return
        self._call_workers()
        if self._handbacks:
            self._loop.wake()  # more than one wake's worth: come back after the rest
        pending, budget = self._stats.pending_output.value, self._config.output_budget
        if pending > budget:
            for conn in writers_to_close(self._parking.writers_by_stall(), pending, budget):
                self._close_parked(conn, Closed.SLOW_READER)

    def next_deadline(self, now: float) -> float:
        return self._parking.next_deadline(now)

    def expire(self, now: float) -> None:
        """Close the idle and the stalled; watch again the writers that have rested."""
        while (conn := self._parking.rested(now)) is not None:
            try:
                self._parked.arm(conn, WRITE)
            except (MemoryError, OSError):  # epoll_ctl: ENOMEM, ENOSPC
                self._close_parked(conn, Closed.ERROR)
            else:
                conn.state = State.WRITING  # the same count: RESTING is counted as writing
        while (conn := self._parking.idle(now)) is not None:
            self._close_parked(conn, Closed.IDLE)
        while (conn := self._parking.stalled(now)) is not None:
            self._close_parked(conn, Closed.SLOW_READER)
        self._call_workers()  # again, if the pool refused a job since the last call

    def make_room(self, now: float) -> bool:
        """At the cap: close a waiting connection for a newcomer, if one is behind the
        minimum rate (see the module's docstring); with no minimum rate, the quietest.
        Never one in a worker or with an echo in flight. False: refuse the newcomer."""
        victim = self._parking.behind(now)
        if victim is None:
            return False
        self._close_parked(victim, Closed.EVICTED)
        return True

    def close_all(self, reason: Closed) -> None:
        """The loop is ending (the server is stopping): close everything parked, queued
        and handed back; later hand-backs are closed by their workers."""
        self._loop_done = True
        for conn in self._parking.everyone():
            self._close_parked(conn, reason)
        for conn in self._queue.take_all():
            self._close(conn, reason)
        while True:  # workers may take their own back meanwhile (`_after_turn`)
            try:
                conn = self._handbacks.popleft()
            except IndexError:  # empty
                break
            self._close(conn, reason)
        self._parked.close()  # a worker that arms a connection now is told so, and closes it

    def _close_parked(self, conn: Connection, reason: Closed) -> None:
        self._parking.unpark(conn)
        self._close(conn, reason)

    def _close(self, conn: Connection, reason: Closed) -> None:
        """Close a connection and move its count from its state to closed{reason}. Never
        raises. By whoever owns it: the loop's thread, or its worker."""
        if conn.unsent:
            with contextlib.suppress(MemoryError):
                retrying(self._stats.pending_output.decr, len(conn.unsent))
            conn.unsent = b""
        self._parked.forget(conn)
        self._ledger.finish(conn.sock, conn.state, reason)
        conn.state = State.CLOSED

    # -- on a worker's thread ------------------------------------------------------------

    def serve_turn(self, conn: Connection) -> bool:
        """Echo what `conn` has for us, then hand it back to the loop or close it; True
        if the turn lingered (`PoolQueue.linger`). Never raises: whatever happens, the
        connection is parked again or closed and counted."""
        stats = self._stats
        turn = Turn()
        pending_before = len(conn.unsent)
        outcome: Wait | Closed = Closed.ERROR
        try:
            stats.dispatch_wait.observe(time.monotonic() - conn.ready_at)
            retrying(stats.on_start)
            conn.state = State.BUSY
            if self._loop.stopping:
                outcome = Closed.SHUTDOWN
            else:
                outcome, conn.unsent = echo_turn(
                    conn.sock,
                    worker_buffer(),
                    conn.unsent,
                    max_messages=self._config.turn_messages,
                    linger=bool(self._config.linger),
                    no_one_waiting=self._no_one_waiting,
                    turn=turn,
                    # Half the budget used: echo only what the client takes, and leave
                    # the rest in the kernel, where TCP's window holds the client back.
                    hold_back=stats.pending_output.value > self._config.output_budget // 2,
                    publish=self._publish,
                    on_linger=self._queue.linger,
                )
        except OSError as error:
            outcome = close_reason_for(error)
            conn.unsent = b""
            quietly(log.debug, "connection ended: %s", error)
        except Exception:  # MemoryError included: close it, the worker goes on
            outcome = Closed.ERROR
            conn.unsent = b""
            quietly(log.exception, "unexpected error while serving a connection")
        finally:
            try:
                writing = outcome is Wait.WRITE
                unsent = conn.settle(turn.received, turn.sent, writing, time.monotonic())
                if unsent != pending_before:
                    retrying(self._stats.pending_output.incr, unsent - pending_before)
                self._after_turn(conn, outcome, turn)
            except MemoryError:
                self._close(conn, Closed.ERROR)
        return turn.lingered

    def _after_turn(self, conn: Connection, outcome: Wait | Closed, turn: Turn) -> None:
        """Hand a connection back to the loop, or close it; count the turn's traffic
        either way."""
        stats = self._stats
        traffic = turn.unpublished()
        if isinstance(outcome, Wait) and not self._loop.stopping and conn.state is State.BUSY:
            parked = _parked_after(conn, outcome, turn)
            retrying(stats.hand_back, stats.counter(parked), *traffic)
            conn.state = parked
            events = INTEREST.get(parked)  # a resting writer is armed by the loop, later
            try:
                # Armed first, while this worker still owns it: once handed back the
                # loop may close it, and its number may belong to another connection.
                if events is not None:
                    self._parked.arm(conn, events)
                self._handbacks.append(conn)
            except Exception:  # epoll_ctl: ENOMEM, ENOSPC; the set closed (stopping); memory
                self._close(conn, Closed.SHUTDOWN if self._loop.stopping else Closed.ERROR)
                return
            # Checked after the append: if the loop had not ended by then, it takes it
            # (close_all); if it had, whichever of the two removes it closes it.
            if not self._loop_done:
                self._loop.wake()
                return
            try:
                self._handbacks.remove(conn)
            except ValueError:
                return  # the loop took it, and closed it
            self._close(conn, Closed.SHUTDOWN)
            return
        if any(traffic):
            retrying(stats.on_traffic, *traffic)
        if isinstance(outcome, Wait):
            outcome = Closed.SHUTDOWN if self._loop.stopping else Closed.ERROR
        self._close(conn, outcome)

    def _publish(self, received: int, sent: int, messages: int) -> None:
        retrying(self._stats.on_traffic, received, sent, messages)

    def _no_one_waiting(self) -> bool:
        """Whether every connection handed to the pool has a worker free to take it, even
        with this one kept: only then may a worker linger or go past a turn's cap."""
        stats = self._stats
        return stats.queued.glance <= self._config.workers - stats.busy.glance


def _parked_after(conn: Connection, wait: Wait, turn: Turn) -> State:
    """Where a connection waits after a turn that ends waiting for `wait`: a writer woken
    for room that was not there rests (see WRITABLE_REST)."""
    if wait is Wait.READ:
        return State.WAITING
    return State.RESTING if conn.woke_writable and not turn.sent else State.WRITING
