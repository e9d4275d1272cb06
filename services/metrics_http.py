"""The /metrics endpoint: one thread, one selector, and no client that can hold it.

A thread per request is what a thread-exhaustion attack breaks, and one thread
serving one request at a time (wsgiref) is blinded by ten clients that send a
byte a second. So, like the echo servers' `ready` dispatch, every connection
waits in a selector and costs a descriptor:
- a request must arrive whole (request line and headers, at most 8 KiB) within
  `REQUEST_DEADLINE` of its accept, or it is closed;
- at most `MAX_CONNECTIONS` are open; a new one pushes out the oldest, which has
  had longest to send a request and has not;
- `accept()` errors back off (descriptors run out under the floods), and a
  descriptor is never lost when memory runs out while accepting;
- running out of memory anywhere drops at most the request in hand;
- `stop()` never waits on a client.
The registry is rendered at most once per request, only when the request is
complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.accepting import accept_connection, listen_again, next_backoff, turn_until
from services.base import PortInUseError
from services.logs import RateLimitedLog, quietly

log = logging.getLogger("echo.metrics")

REQUEST_DEADLINE = 5.0  # seconds from accept for the whole request
MAX_REQUEST = 8192  # bytes of request line and headers
MAX_CONNECTIONS = 256
_TICK = 0.5


class _Client:
    __slots__ = ("deadline", "request", "response", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = b""
        self.response = b""


class MetricsServer:
    """Serves /metrics (and /) from one daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1024)
        except OSError as error:
            self._listener.close()
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    error.errno, f"metrics port {host}:{port} is already in use"
                ) from None
            raise
        self._listener.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._stop = threading.Event()
        self._clients: OrderedDict[socket.socket, _Client] = OrderedDict()  # oldest first
        self._thread = threading.Thread(target=self._serve, name="echo-metrics", daemon=True)
        # The loop must outlive running out of memory, or Prometheus goes blind just when a
        # flood makes it worth watching; counted here, logged when the loop ends.
        self.memory_errors = 0
        self._warn = RateLimitedLog(log)
        self._backoff = 0.0  # the accept back-off in force (seconds)
        self._paused_until = 0.0  # when the listener is watched again (monotonic)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving; waits at most `timeout` (the loop never blocks on a client)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_everything()

    def _close_everything(self) -> None:
        if self.memory_errors:
            log.warning("metrics: %d request(s) dropped for lack of memory", self.memory_errors)
        for client in list(self._clients.values()):
            client.sock.close()
        self._clients.clear()
        self._listener.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            turn_until(self._stop.is_set, partial(self._turn, selector), self._out_of_memory)

    def _turn(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            register = partial(selector.register, self._listener, selectors.EVENT_READ)
            self._paused_until, self._backoff = listen_again(
                register, self._backoff, self._warn.warning, now
            )
        timeout = min(_TICK, self._paused_until - now) if self._paused_until else _TICK
        for key, mask in selector.select(max(timeout, 0.0)):
            if key.fileobj is self._listener:
                try:
                    self._backoff = self._accept(selector, self._backoff)
                except MemoryError:  # back off as for running out of descriptors
                    self._backoff = next_backoff(errno.ENOMEM, self._backoff)
                    self._out_of_memory()
                if self._backoff:
                    selector.unregister(self._listener)
                    self._paused_until = time.monotonic() + self._backoff
            elif key.fileobj is not self._wake_reader:
                try:
                    self._on_client(selector, key.data, mask)
                except MemoryError:  # out of memory (the floods do this): drop it
                    self._drop(selector, key.data)
                    self._out_of_memory()
        self._expire(selector, time.monotonic())

    def _out_of_memory(self) -> None:
        with contextlib.suppress(MemoryError):  # counting past 256 allocates
            self.memory_errors += 1

    def _accept(self, selector: selectors.BaseSelector, backoff: float) -> float:
        for _ in range(64):
            try:
                sock = accept_connection(self._listener)
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError as error:  # every error backs off, as on the echo port
                self._warn.warning("metrics accept failed: %s", error)
                return next_backoff(error.errno or 0, backoff)
            if len(self._clients) >= MAX_CONNECTIONS:
                self._drop(selector, next(iter(self._clients.values())))
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + REQUEST_DEADLINE)
            self._clients[sock] = client
            try:
                selector.register(sock, selectors.EVENT_READ, client)
            except OSError as error:  # epoll_ctl: ENOMEM, ENOSPC; drop it, back off
                self._drop(selector, client)
                self._warn.warning("metrics: cannot watch a client: %s", error)
                return next_backoff(error.errno or errno.ENOMEM, backoff)
        return 0.0

    def _on_client(self, selector: selectors.BaseSelector, client: _Client, mask: int) -> None:
        if client.sock not in self._clients:  # dropped earlier, or half-dropped: finish it
            self._drop(selector, client)
            return
        try:
            if mask & selectors.EVENT_READ:
                self._read(selector, client)
            elif client.response:
                self._write(selector, client)
        except OSError:
            self._drop(selector, client)

    def _read(self, selector: selectors.BaseSelector, client: _Client) -> None:
        data = client.sock.recv(MAX_REQUEST)
        if not data:
            self._drop(selector, client)
            return
        client.request += data
        end = client.request.find(b"\r\n\r\n")
        if end < 0:
            if len(client.request) >= MAX_REQUEST:
                client.response = _response(431, b"request header fields too large\n")
                selector.modify(client.sock, selectors.EVENT_WRITE, client)
            return
        client.response = self._respond(client.request[:end])
        selector.modify(client.sock, selectors.EVENT_WRITE, client)
        self._write(selector, client)

    def _respond(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return _response(405, b"only GET\n")
        if path not in (b"/", b"/metrics"):
            return _response(404, b"not found: try /metrics\n")
        try:
            body = generate_latest(self._registry)
        except MemoryError:
            raise  # the client is dropped and counted
        except Exception:
            quietly(log.exception, "collecting the metrics failed")
            return _response(500, b"collecting the metrics failed\n")
        return _response(200, body, CONTENT_TYPE_LATEST.encode())

    def _write(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            sent = client.sock.send(client.response)
        except BlockingIOError:
            return
        client.response = client.response[sent:]
        if not client.response:
            self._drop(selector, client)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        while self._clients:
            client = next(iter(self._clients.values()))
            if client.deadline > now:
                break
            self._drop(selector, client)

    def _drop(self, selector: selectors.BaseSelector, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(client.sock)
        client.sock.close()


def _response(status: int, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 431: b"Too Large"}
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason.get(status, b"Error"), content_type, len(body))
    ) + body
