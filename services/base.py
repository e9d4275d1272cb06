"""What every model shares: the listener, the accept loop, accounting and shutdown.

A model only decides where an accepted connection runs (`dispatch`); the base
owns everything else, so the three models differ in nothing but threading.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial

from services.accepting import accept_connection, listen_again, next_backoff, turn_until
from services.concurrency import SharedCounter
from services.config import Config
from services.echo import RECEIVE_BUFFER, SEND_BUFFER, close_reason_for, echo
from services.logs import RateLimitedLog, quietly
from services.stats import ServerStats, persist

log = logging.getLogger("echo.server")

_ACCEPT_BATCH = 64  # accepts per wake-up, so the loop still notices a stop request
_TICK = 1.0  # the accept loop wakes at least this often (watchdog heartbeat)
_TCP_INFO_SIZE = 32  # enough of struct tcp_info for accept_queue()
_DRAIN = 1.0  # seconds open connections get to finish after a stop request
_WORKERS_GRACE = 2.0  # then seconds for workers to end once their connections are cut
# The promise (README): a stop request ends the process within this many seconds, a hung
# worker included. The drain, the workers' grace and one loop tick must fit inside it
# with a second to spare for the last log lines and the exit.
SHUTDOWN_DEADLINE = 5.0


class PortInUseError(OSError):
    pass


class Server(ABC):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._accepting = threading.Event()
        self._listener: socket.socket | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        # Open connections and when each was accepted (monotonic seconds).
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self._warn = RateLimitedLog(log)
        # The event loop's selector; a closed placeholder until the loop runs.
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        self._selector.close()
        self._backoff = 0.0  # seconds to stop accepting after descriptors ran out
        self._paused_until = 0.0  # monotonic; 0 while listening
        self._woken = False
        self.loop_woke_at = 0.0  # monotonic: when the loop's last select() returned
        # Where an admitted connection is counted first: waiting in the loop, or queued.
        self._entry = self.stats.waiting if config.parks else self.stats.queued

    # -- what a model provides -------------------------------------------------

    @abstractmethod
    def start_workers(self) -> None:
        """Start whatever runs connections; called once, before accepting."""

    @abstractmethod
    def dispatch(self, conn: socket.socket) -> None:
        """Hand an accepted connection to a worker, or `reject()` it. Must not block."""

    @abstractmethod
    def stop_workers(self, deadline: float) -> bool:
        """Let workers finish by `deadline` (monotonic); True when all did."""

    @property
    def queue_capacity(self) -> int:
        """How many connections may wait for a worker (0 when none ever wait)."""
        return 0

    @property
    def capacity(self) -> int | None:
        """Connections admitted at once (served or waiting); None for no limit."""
        return None

    # -- lifecycle --------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Open the listening socket; raise `PortInUseError` naming the address."""
        host, port = self.config.host, self.config.port
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Before listen(): accepted sockets inherit them, and the window scale
            # offered in the handshake follows the receive buffer.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            listener.bind((host, port))
        except OSError as error:
            listener.close()
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    error.errno, f"echo port {host}:{port} is already in use"
                ) from None
            raise
        listener.listen(self.config.backlog)
        listener.setblocking(False)
        self._listener = listener
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("bind() first")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def accept_queue(self) -> tuple[int, int] | None:
        """(connections the kernel has completed that wait for accept(), the most that
        may), from TCP_INFO on the listener; None when it is closed or not TCP."""
        listener = self._listener
        if listener is None:
            return None
        try:
            info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:  # closed while stopping
            return None
        # struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss,
        # unacked, sacked; on a listener `unacked` is the accept queue and `sacked` its cap.
        unacked, sacked = struct.unpack_from("II", info, 24)
        return unacked, sacked

    def close(self) -> None:
        """Release the sockets of a server that will never serve."""
        if self._listener is not None:
            self._listener.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def stop(self) -> None:
        """Ask the accept loop to stop. Safe from signal handlers and other threads."""
        self._stopping.set()
        # A full or closed wake-up socket means the loop is waking up already.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_accepting(self, timeout: float | None = None) -> bool:
        return self._accepting.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def run(self, on_ready: Callable[[], None] | None = None) -> bool:
        """Accept until `stop()`, then shut down; True when every worker finished in time.
        `on_ready` is called once the workers run and the loop is about to accept."""
        listener = self._listener
        if listener is None:
            self.bind()
            listener = self._listener
        if listener is None:
            raise RuntimeError("bind() did not open a listener")
        try:
            self.start_workers()
            self._event_loop(listener, on_ready)
            return self._shutdown(listener)
        finally:
            self._wake_reader.close()
            self._wake_writer.close()
            self._stopped.set()

    # -- the event loop: accepts, and (ready dispatch) parks waiting connections --------

    def _event_loop(
        self, listener: socket.socket, on_ready: Callable[[], None] | None = None
    ) -> None:
        """One thread owns the selector: the listener, the wake-up socket, and whatever a
        model parks there. Each registration's data is the callback for its events."""
        with selectors.DefaultSelector() as selector:
            self._selector = selector
            selector.register(listener, selectors.EVENT_READ, self._on_listener)
            selector.register(self._wake_reader, selectors.EVENT_READ, self._on_wake)
            self.on_loop_start(selector)
            self._accepting.set()
            if on_ready is not None:
                on_ready()
            try:
                turn_until(
                    self._stopping.is_set,
                    partial(self._turn, listener, selector),
                    partial(self._warn.warning, "out of memory in the event loop; carrying on"),
                )
            finally:
                self.on_loop_end()

    def _turn(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        self.stats.accept_loop_ticks.incr()
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            register = partial(selector.register, listener, selectors.EVENT_READ, self._on_listener)
            self._paused_until, self._backoff = listen_again(
                register, self._backoff, self._warn.warning, now
            )
        timeout = min(_TICK, self.next_deadline(now) - now)
        if self._paused_until:
            timeout = min(timeout, self._paused_until - now)
        events = selector.select(max(timeout, 0.0))
        self.loop_woke_at = time.monotonic()
        for key, mask in events:
            self._run_callback(key, mask)
        self.on_loop_tick(time.monotonic())

    def _run_callback(self, key: selectors.SelectorKey, mask: int) -> None:
        """One registration's callback. A failure is logged, and the loop goes on: every
        parked connection and the accept loop depend on this one thread."""
        try:
            key.data(key.fileobj, mask)
        except MemoryError:
            self._warn.warning("out of memory in the event loop; carrying on")
        except Exception:
            quietly(log.exception, "unexpected error in the event loop; carrying on")

    def _on_listener(self, listener: socket.socket, _mask: int) -> None:
        try:
            self._backoff = self._accept_batch(listener, self._backoff)
        except MemoryError:
            # Anything can fail to allocate when memory runs out (the threads model
            # under an address-space limit does this). The connection in hand, if
            # any, is closed by the GC; accept_connection() closes one it could not wrap.
            self._backoff = self._accept_failed(errno.ENOMEM, self._backoff)
        if self._backoff:  # stop listening for a while; the rest of the loop goes on
            self._selector.unregister(listener)
            self._paused_until = time.monotonic() + self._backoff

    def _on_wake(self, wake: socket.socket, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            # One read takes every byte (wake() sends one, rarely two, at a time); reading
            # on until "would block" cost an exception on every wake-up.
            wake.recv(4096)
        # Only now, after draining: a wake-up asked for from here on sends a byte that
        # is still there for the next select(). Reset before draining, a byte sent in
        # between would be drained while the flag stayed set, and no later wake() would
        # ever send again.
        self._woken = False
        self.on_wake()

    @property
    def loop_selector(self) -> selectors.BaseSelector:
        return self._selector

    def wake(self) -> None:
        """Wake the event loop from another thread (at most one byte in flight). Never
        raises. The flag stays set only while a byte is in flight: a wake-up that sent
        nothing clears it, so the next one tries again (the loop also takes back what
        is handed to it on every tick, woken or not)."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_writer.send(b"\0")
        except BlockingIOError:
            pass  # the pair is full: bytes are in flight, the loop will wake
        except Exception:  # closed (stopped), ENOBUFS, out of memory: nothing sent
            self._woken = False

    # Hooks for a model that parks connections in the loop (`ready` dispatch).

    def on_loop_start(self, selector: selectors.BaseSelector) -> None:  # noqa: B027 (a hook; no-op by default)
        """The loop's selector, before the first wait."""

    def next_deadline(self, now: float) -> float:
        """When the loop must next run `on_loop_tick` (monotonic), at the latest."""
        return now + _TICK

    def on_loop_tick(self, now: float) -> None:  # noqa: B027 (a hook; no-op by default)
        """After every wait: timeouts and the like."""

    def on_wake(self) -> None:  # noqa: B027 (a hook; no-op by default)
        """`wake()` was called."""

    def on_loop_end(self) -> None:  # noqa: B027 (a hook; no-op by default)
        """The loop is stopping: close whatever waits in it."""

    def make_room(self) -> None:  # noqa: B027 (a hook; no-op by default)
        """At capacity, before a new connection is turned away: free a place if it can."""

    def _accept_batch(self, listener: socket.socket, backoff: float) -> float:
        """Accept what is waiting; return the back-off to apply before the next try."""
        for _ in range(_ACCEPT_BATCH):
            if self._stopping.is_set():
                return 0.0
            try:
                conn = accept_connection(listener)
            except (BlockingIOError, InterruptedError):
                return 0.0
            except MemoryError:
                return self._accept_failed(errno.ENOMEM, backoff)
            except OSError as error:
                return self._accept_failed(error.errno or 0, backoff)
            backoff = 0.0
            self._admit(conn)
        return 0.0

    def _accept_failed(self, code: int, backoff: float) -> float:
        """Count a failed accept() and return the back-off before the next try."""
        name = errno.errorcode.get(code, str(code))
        self.stats.accept_errors.incr(name)
        backoff = next_backoff(code, backoff)
        self._warn.warning("accept failed with %s; backing off %.3f s", name, backoff)
        return backoff

    def _admit(self, conn: socket.socket) -> None:
        capacity = self.capacity
        try:
            if capacity is not None and self.stats.active_connections() >= capacity:
                self.make_room()
            admitted = self.stats.try_admit(capacity, parked=self.config.parks)
        except BaseException:
            conn.close()  # out of memory before it was counted: as if never accepted
            raise
        if not admitted:
            conn.close()  # counted as rejected{queue_full} or {at_cap}
            return
        try:
            with self._open_lock:
                self._open[conn] = time.monotonic()
            self.dispatch(conn)
        except MemoryError:
            self.reject(conn, "out_of_memory")
            self._warn.warning("out of memory while admitting a connection; closed it")
        except Exception:
            quietly(log.exception, "dispatch failed; closing the connection")
            self.reject(conn, "dispatch_failed")

    def reject(self, conn: socket.socket, reason: str) -> None:
        self.forget(conn)
        self.count(self._entry, self.stats.rejected[reason])

    def forget(self, conn: socket.socket) -> None:
        """Close a connection and drop it from the open set. Never raises."""
        try:
            with self._open_lock:
                self._open.pop(conn, None)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def finish(self, conn: socket.socket, state: SharedCounter, reason: str) -> None:
        """Close a connection counted in `state` and count it as closed{reason}."""
        self.forget(conn)  # first: if memory has run out, counting may fail, closing rarely does
        if self._stopping.is_set() and reason in ("eof", "reset", "error"):
            reason = "shutdown"
        self.count(state, self.stats.closed[reason])

    def count(self, source: SharedCounter, target: SharedCounter) -> None:
        """Move one connection between counters; never raises (a worker must not die of
        a count it could not make, though the count is then lost and said so)."""
        try:
            persist(self.stats.move, source, target)
        except MemoryError:
            self._warn.warning("out of memory while counting a connection; a count is lost")

    def handle_connection(self, conn: socket.socket) -> None:
        """Run one connection to its end on the calling worker thread. Never raises:
        whatever happens on the way, the connection is closed and counted once."""
        state = self.stats.queued
        reason = "error"
        try:
            persist(self.stats.on_start)
            state = self.stats.busy
            if self._stopping.is_set():
                reason = "shutdown"
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reason = echo(
                conn,
                idle_timeout=self.config.idle_timeout,
                send_timeout=self.config.send_timeout,
                on_traffic=partial(persist, self.stats.on_traffic),
                waited=time.monotonic() - self.accepted_at(conn),
            )
        except OSError as error:
            reason = close_reason_for(error)
            quietly(log.debug, "connection ended: %s", error)
        except MemoryError:
            self._warn.warning("out of memory while serving a connection; closed it")
        except Exception:
            quietly(log.exception, "unexpected error while serving a connection")
        finally:
            self.finish(conn, state, reason)

    def accepted_at(self, conn: socket.socket) -> float:
        with self._open_lock:
            return self._open.get(conn, time.monotonic())

    def _shutdown(self, listener: socket.socket) -> bool:
        """Stop accepting, give open connections a moment, then cut them and join workers."""
        listener.close()
        log.info("stopped accepting; %d connection(s) open", self.stats.busy.value)
        deadline = time.monotonic() + _DRAIN
        while self.stats.busy.value and time.monotonic() < deadline:
            self._stopped.wait(0.05)
        with self._open_lock:
            still_open = list(self._open)
        for conn in still_open:
            with contextlib.suppress(OSError):  # closed by its worker in the meantime
                conn.shutdown(socket.SHUT_RDWR)
        finished = self.stop_workers(time.monotonic() + _WORKERS_GRACE)
        if not finished:
            log.error("workers did not finish within the shutdown deadline")
        return finished
