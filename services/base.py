"""What every model shares: the listener, admission, accounting and shutdown.

A model decides only what runs connections (its workers) and so how a connection
reaches one (`self.dispatch`, `services/dispatch.py` or `services/ready.py`); the
base owns the rest, on one event loop (`services/loop.py`), so the three models
differ in nothing but threading.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial

from services.config import Config
from services.dispatch import Dispatch
from services.echo import RECEIVE_BUFFER, SEND_BUFFER
from services.ledger import Ledger
from services.logs import RateLimitedLog, quietly
from services.loop import EventLoop
from services.states import Closed, Rejected
from services.stats import ServerStats

log = logging.getLogger("echo.server")

_TICK = 1.0  # the loop waits at most this long (the watchdog's heartbeat)
_TCP_INFO_SIZE = 32  # enough of struct tcp_info for accept_queue()
_DRAIN = 1.0  # seconds open connections get to finish after a stop request
_WORKERS_GRACE = 2.0  # then seconds for workers to end once their connections are cut
# The promise (README): a stop request ends the process within this many seconds, a hung
# worker included. The drain, the workers' grace and one loop tick must fit inside it
# with a second to spare for the last log lines and the exit.
SHUTDOWN_DEADLINE = 5.0


class PortInUseError(OSError):
    pass


def bind_listener(
    host: str, port: int, what: str, backlog: int, *, buffers: bool = True
) -> socket.socket:
    """A listening, non-blocking socket; `PortInUseError` names the address. With
    `buffers`, accepted sockets get the echo's buffer sizes: set before listen(), since
    they inherit them and the window scale offered in the handshake follows them."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if buffers:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(
                error.errno, f"{what} port {host}:{port} is already in use"
            ) from None
        raise
    listener.setblocking(False)
    return listener


class Server(ABC):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self._warn = RateLimitedLog(log)
        self.loop = EventLoop(
            _TICK, partial(self._warn.warning, "out of memory in the event loop; carrying on")
        )
        self.loop.after_each_wait(lambda _now: self.stats.accept_loop_ticks.incr())
        self.ledger = Ledger(self.stats, lambda: self.loop.stopping, self._warn)
        self._stopped = threading.Event()
        self._accepting = threading.Event()
        self._listener: socket.socket | None = None
        self.dispatch = self.build_dispatch()

    # -- what a model provides -------------------------------------------------

    @abstractmethod
    def build_dispatch(self) -> Dispatch:
        """How an admitted connection reaches a worker; called once, while building."""

    @abstractmethod
    def start_workers(self) -> None:
        """Start whatever runs connections; called once, before accepting."""

    @abstractmethod
    def stop_workers(self, deadline: float) -> bool:
        """Let workers finish by `deadline` (monotonic); True when all did."""

    @property
    def queue_capacity(self) -> int:
        """How many connections may wait for a worker (0 when none ever wait)."""
        return self.dispatch.queue_capacity

    @property
    def capacity(self) -> int | None:
        """Connections admitted at once (served or waiting); None for no limit."""
        return self.config.capacity

    # -- lifecycle --------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Open the listening socket; raise `PortInUseError` naming the address."""
        self._listener = bind_listener(
            self.config.host, self.config.port, "echo", self.config.backlog
        )
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
        self.dispatch.close_all(Closed.SHUTDOWN)
        self.loop.close()

    def stop(self) -> None:
        """Ask the loop to stop. Safe from signal handlers and other threads."""
        self.loop.stop()

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    def wait_accepting(self, timeout: float | None = None) -> bool:
        return self._accepting.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def run(self, on_ready: Callable[[], None] | None = None) -> bool:
        """Accept until `stop()`, then shut down; True when every worker finished in time.
        `on_ready` is called once the workers run and the loop is about to accept."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        if listener is None:
            raise RuntimeError("bind() did not open a listener")
        try:
            self.start_workers()
            self.loop.listen(listener, self._admit, self._accept_failed)
            self._accepting.set()
            if on_ready is not None:
                on_ready()
            try:
                self.loop.run()
            finally:
                self.dispatch.close_all(Closed.SHUTDOWN)
            return self._shutdown(listener)
        finally:
            self.loop.close()
            self._stopped.set()

    # -- admission, on the loop's thread -----------------------------------------------

    def _accept_failed(self, code: int, backoff: float) -> None:
        name = errno.errorcode.get(code, str(code))
        self.stats.accept_errors.incr(name)
        self._warn.warning("accept failed with %s; backing off %.3f s", name, backoff)

    def _admit(self, conn: socket.socket) -> None:
        capacity = self.capacity
        try:
            if capacity is not None and self.stats.active_connections() >= capacity:
                self.dispatch.make_room(time.monotonic())
            admitted = self.stats.try_admit(capacity, ready_dispatch=self.config.ready_dispatch)
        except BaseException:
            conn.close()  # out of memory before it was counted: as if never accepted
            raise
        if not admitted:
            conn.close()  # counted as rejected{queue_full} or {at_cap}
            return
        try:
            self.ledger.add(conn)
            self.dispatch.admit(conn)
        except MemoryError:
            self.ledger.reject(conn, self.dispatch.entry, Rejected.OUT_OF_MEMORY)
            self._warn.warning("out of memory while admitting a connection; closed it")
        except Exception:
            quietly(log.exception, "dispatch failed; closing the connection")
            self.ledger.reject(conn, self.dispatch.entry, Rejected.DISPATCH_FAILED)

    def _shutdown(self, listener: socket.socket) -> bool:
        """Stop accepting, give open connections a moment, then cut them and join workers."""
        listener.close()
        log.info("stopped accepting; %d connection(s) open", self.stats.busy.value)
        deadline = time.monotonic() + _DRAIN
        while self.stats.busy.value and time.monotonic() < deadline:
            self._stopped.wait(0.05)
        for conn in self.ledger.still_open():
            with contextlib.suppress(OSError):  # closed by its worker in the meantime
                conn.shutdown(socket.SHUT_RDWR)
        finished = self.stop_workers(time.monotonic() + _WORKERS_GRACE)
        if not finished:
            log.error("workers did not finish within the shutdown deadline")
        return finished
