"""`ready` dispatch: connections wait in the event loop, and a worker serves one only
while it has bytes to echo.

The production shape (gunicorn's gthread, cheroot's ConnectionManager, Tomcat
NIO): an admitted connection waits parked, whether for bytes (`waiting`) or for a
client that does not read to take its echo (`writing`), in an epoll set of its
own (`services/parked.py`). The pool's leader waits on that set, takes what is
ready (`queued`) and echoes what is there without waiting for more (`busy`,
`services/drain.py`), then parks it again and arms it for its next event. So a
waiting connection costs a descriptor and a few hundred bytes, never a thread,
and N slow clients cannot hold a pool of N.

The parking lists are shared by the leader and the event loop's thread, under one
lock (`_lock`); the loop accepts, and enforces what used to need a worker's
blocking socket (who is due: `services/parking.py`):
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
import socket
import threading
import time
from functools import partial

from services.config import Config
from services.connection import Connection, writers_to_close
from services.dispatch import Dispatch, Submit
from services.echo import (
    Turn,
    close_reason_for,
    echo_turn,
    set_kernel_timeout,
    worker_buffer,
)
from services.leader import Leader, Parked
from services.ledger import Ledger
from services.logs import RateLimitedLog, quietly
from services.loop import EventLoop
from services.parked import INTEREST, READ, WRITE, ParkedSet
from services.parking import Parking
from services.states import Closed, State, Wait
from services.stats import ServerStats, retrying

log = logging.getLogger("echo.ready")

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
        self._warn = RateLimitedLog(log)
        # Who parks, takes or closes a parked connection holds `_lock`: the leader, a
        # lingering worker, or the loop's thread. Always before any counter's lock.
        self._lock = threading.Lock()
        self._parking = Parking(
            config.idle_timeout, config.send_timeout, config.min_rate, WRITABLE_REST
        )
        self._loop_done = False  # the loop has ended: workers close what they would park
        self._leader = Leader(
            config,
            stats,
            loop,
            Parked(self._parked, self._parking, self._lock, self._close),
            submit=submit,
            serve=self.serve_turn,
        )
        self._queue = self._leader.queue
        loop.after_each_wait(self._after_wait, self.next_deadline)
        loop.on_wake(self._keep_budget)

    # -- on the loop's thread ------------------------------------------------------------

    def _after_wait(self, now: float) -> None:
        self.expire(now)
        self._keep_budget()
        self._call_workers()  # again, if the pool refused a job since the last call
        self._stats.loop_lag.observe(time.monotonic() - self._loop.woke_at)

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
        with self._lock:
            self._parking.park(conn, now)
            try:
                self._parked.add(conn, READ)
            except BaseException:
                self._parking.unpark(conn)
                raise
        if not self._queue.led:
            self._call_workers()

    # -- the leader (what it does between turns: `services/leader.py`) ------------------

    @property
    def leader_turns(self) -> int:
        """Turns the leaders have begun (the watchdog's leader lane)."""
        return self._queue.turns

    @property
    def leader_busy_seconds(self) -> float:
        """Seconds the leaders spent serving, not waiting for events (the metrics)."""
        return self._leader.busy_seconds

    @property
    def leader_in_turn(self) -> int:
        """1 while the leader is in a turn, else 0 (the watchdog's leader lane)."""
        return int(self._queue.in_turn)

    def _call_workers(self) -> None:
        """A job to lead, if none does; a refusal is tried again at the loop's next pass."""
        if not self._queue.call_workers() and not self._loop.stopping:
            self._warn.warning("the pool refused a job; no worker leads until it takes one")

    # -- on the loop's thread ------------------------------------------------------------

    def _keep_budget(self) -> None:
        """Over the output budget, close the longest-stalled writers holding an echo."""
        pending, budget = self._stats.pending_output.value, self._config.output_budget
        if pending <= budget:
            return
        with self._lock:
            for conn in writers_to_close(self._parking.writers_by_stall(), pending, budget):
                self._close_parked(conn, Closed.SLOW_READER)

    def next_deadline(self, now: float) -> float:
        return self._parking.next_deadline(now)

    def expire(self, now: float) -> None:
        """Close the idle and the stalled; watch again the writers that have rested."""
        with self._lock:
            self._expire(now)

    def _expire(self, now: float) -> None:
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

    def make_room(self, now: float) -> bool:
        """At the cap: close a waiting connection for a newcomer, if one is behind the
        minimum rate (see the module's docstring); with no minimum rate, the quietest.
        Never one in a worker or with an echo in flight. False: refuse the newcomer."""
        with self._lock:
            victim = self._parking.behind(now)
            if victim is None:
                return False
            self._close_parked(victim, Closed.EVICTED)
        return True

    def close_all(self, reason: Closed) -> None:
        """The loop is ending (the server is stopping): close everything parked and
        queued; a turn under way closes its own when it ends (`_after_turn`)."""
        with self._lock:
            self._loop_done = True
            for conn in self._parking.everyone():
                self._close_parked(conn, reason)
        for conn in self._queue.take_all():
            self._close(conn, reason)
        self._parked.interrupt()  # the leader's wait ends, and it sees `stopping`
        with self._lock:
            self._parked.close()

    def _close_parked(self, conn: Connection, reason: Closed) -> None:
        self._parking.unpark(conn)
        self._close(conn, reason)

    def _close(self, conn: Connection, reason: Closed) -> None:
        """Close a connection and move its count from its state to closed{reason}. Never
        raises. By whoever owns it: who holds `_lock` for a parked one, else its worker."""
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
            # Counted where it was until the turn ends, or lingers (`_linger`).
            if self._loop.stopping:
                outcome = Closed.SHUTDOWN
            else:
                outcome, conn.unsent = echo_turn(
                    conn.sock,
                    worker_buffer(),
                    conn.unsent,
                    max_messages=self._config.turn_messages,
                    linger=bool(self._config.linger),
                    no_one_waiting=partial(self._may_keep, turn),
                    turn=turn,
                    # Half the budget used: echo only what the client takes, and leave
                    # the rest in the kernel, where TCP's window holds the client back.
                    hold_back=stats.pending_output.glance > self._config.output_budget // 2,
                    publish=self._publish,
                    on_linger=partial(self._linger, conn) if self._config.linger else None,
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
        """Park a connection again, or close it; count the turn's traffic either way."""
        stats = self._stats
        traffic = turn.unpublished()
        if isinstance(outcome, Wait):
            parked = _parked_after(conn, outcome, turn)
            if conn.state is State.BUSY:  # it lingered: off the leader's books
                retrying(stats.hand_back, stats.counter(parked), *traffic)
            else:
                self._leader.count_turn(stats.counter(conn.state), stats.counter(parked), traffic)
            conn.state = parked
            self._park(conn)
            if stats.pending_output.glance > self._config.output_budget or parked is State.RESTING:
                self._loop.wake()  # for the budget, or to watch it again in time
            return
        if any(traffic):
            retrying(stats.on_traffic, *traffic)
        self._close(conn, outcome)

    def _park(self, conn: Connection) -> None:
        """Park a connection counted as parked, and arm it for its next event (a resting
        writer: the loop arms it, later). Parked first: its event finds it parked. Under
        `_lock`, so the loop cannot close it in between, and arms nothing once ended."""
        events = INTEREST.get(conn.state)
        with self._lock:
            if self._loop_done:
                self._close(conn, Closed.SHUTDOWN)
                return
            try:
                self._parking.park(conn, time.monotonic())
            except MemoryError:
                self._close(conn, Closed.ERROR)
                return
            try:
                if events is not None:
                    self._parked.arm(conn, events)
            except Exception:  # epoll_ctl: ENOMEM, ENOSPC; memory
                self._close_parked(conn, Closed.ERROR)

    def _may_keep(self, turn: Turn) -> bool:
        """Whether a turn may keep its worker past its cap, or linger: only a turn that
        lingers (the leader's own turn must not keep the others waiting), only while
        the lead is free to hand on or handed on, and only while every open connection
        could have a worker of its own (one leads). With more connections than that,
        lingering threads only take the GIL from the leader, which serves the rest
        (docs/history/performance.md, 2026-12-04)."""
        if not self._config.linger or not self._queue.followed(turn.lingered):
            return False
        stats = self._stats
        active = stats.waiting.glance + stats.writing.glance
        return active + stats.queued.glance + stats.busy.glance < self._config.workers

    def _linger(self, conn: Connection) -> None:
        """Before a turn first waits for its client: count it busy, and hand the lead on
        with the leader's counts added up."""
        self._leader.stop_leading()
        retrying(self._stats.begin_turn, self._stats.counter(conn.state))
        conn.state = State.BUSY
        self._queue.linger()

    def _publish(self, received: int, sent: int, messages: int) -> None:
        retrying(self._stats.on_traffic, received, sent, messages)


def _parked_after(conn: Connection, wait: Wait, turn: Turn) -> State:
    """Where a connection waits after a turn that ends waiting for `wait`: a writer woken
    for room that was not there rests (see WRITABLE_REST)."""
    if wait is Wait.READ:
        return State.WAITING
    return State.RESTING if conn.woke_writable and not turn.sent else State.WRITING
