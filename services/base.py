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
import threading
import time
from abc import ABC, abstractmethod

from services.config import Config
from services.echo import close_reason_for, echo
from services.stats import ServerStats

log = logging.getLogger("echo.server")

# accept() fails with these when the process or the system runs out of
# descriptors or memory; retrying at once would spin a core, so back off.
_EXHAUSTION = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0
_ACCEPT_BATCH = 64  # accepts per wake-up, so the loop still notices a stop request
_TICK = 1.0  # the accept loop wakes at least this often (watchdog heartbeat)
_DRAIN = 1.0  # seconds open connections get to finish after a stop request


class PortInUseError(OSError):
    pass


class RateLimitedLog:
    """Log a repeating problem at most once per interval, with the count suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
        self._logger.warning(message + suffix, *args)


class Server(ABC):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._accepting = threading.Event()
        self._listener: socket.socket | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        # Open connections and when each was accepted (monotonic seconds).
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self._warn = RateLimitedLog(log)

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

    def run(self) -> bool:
        """Accept until `stop()`, then shut down; True when every worker finished in time."""
        listener = self._listener
        if listener is None:
            self.bind()
            listener = self._listener
        if listener is None:
            raise RuntimeError("bind() did not open a listener")
        try:
            self.start_workers()
            self._accept_loop(listener)
            return self._shutdown(listener)
        finally:
            self._wake_reader.close()
            self._wake_writer.close()
            self._stopped.set()

    def _accept_loop(self, listener: socket.socket) -> None:
        backoff = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            self._accepting.set()
            while not self._stopping.is_set():
                self.stats.accept_loop_ticks.incr()
                if backoff:
                    self._stopping.wait(backoff)
                if not selector.select(_TICK):
                    continue
                try:
                    backoff = self._accept_batch(listener, backoff)
                except MemoryError:
                    # Anything can fail to allocate when memory runs out (the
                    # threads model under an address-space limit does this).
                    # The connection in hand, if any, is closed by the GC.
                    backoff = self._accept_failed(errno.ENOMEM, backoff)

    def _accept_batch(self, listener: socket.socket, backoff: float) -> float:
        """Accept what is waiting; return the back-off to apply before the next try."""
        for _ in range(_ACCEPT_BATCH):
            if self._stopping.is_set():
                return 0.0
            try:
                conn, _peer = listener.accept()
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
        name = errno.errorcode.get(code, str(code))
        self.stats.accept_errors.incr(name)
        if code in _EXHAUSTION:
            backoff = min(max(backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
            self._warn.warning("accept failed with %s; backing off %.2f s", name, backoff)
            return backoff
        # The peer gave up before we accepted (ECONNABORTED and the like): not our problem.
        log.debug("accept failed with %s", name)
        return 0.0

    def _admit(self, conn: socket.socket) -> None:
        if not self.stats.try_admit(self.capacity):
            conn.close()  # counted as rejected{queue_full}
            return
        try:
            with self._open_lock:
                self._open[conn] = time.monotonic()
            self.dispatch(conn)
        except MemoryError:
            self.reject(conn, "out_of_memory")
            self._warn.warning("out of memory while admitting a connection; closed it")
        except Exception:
            log.exception("dispatch failed; closing the connection")
            self.reject(conn, "dispatch_failed")

    def reject(self, conn: socket.socket, reason: str) -> None:
        self.stats.on_reject(reason)
        self._forget(conn)

    def _forget(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.pop(conn, None)
        conn.close()

    def handle_connection(self, conn: socket.socket) -> None:
        """Run one connection to its end on the calling worker thread. Never raises."""
        self.stats.on_start()
        reason = "error"
        try:
            if self._stopping.is_set():
                reason = "shutdown"
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reason = echo(
                conn,
                idle_timeout=self.config.idle_timeout,
                send_timeout=self.config.send_timeout,
                on_traffic=self.stats.on_traffic,
                waited=time.monotonic() - self._accepted_at(conn),
            )
        except OSError as error:
            reason = close_reason_for(error)
            log.debug("connection ended: %s", error)
        except Exception:
            log.exception("unexpected error while serving a connection")
        finally:
            # Close first: if memory has run out, counting may fail, closing rarely does.
            self._forget(conn)
            if self._stopping.is_set() and reason in ("eof", "reset", "error"):
                reason = "shutdown"
            self.stats.on_close(reason)

    def _accepted_at(self, conn: socket.socket) -> float:
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
        finished = self.stop_workers(time.monotonic() + 3.0)
        if not finished:
            log.error("workers did not finish within the shutdown deadline")
        return finished


class PoolServer(Server):
    """A model with a fixed pool: `workers` serve, `queue_size` more may wait, the rest are
    turned away at once."""

    @property
    def queue_capacity(self) -> int:
        return self.config.queue_size

    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.queue_size
