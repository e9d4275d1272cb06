"""The /metrics endpoint: one thread, one selector, and no client that can hold it.

A thread per request is what a thread-exhaustion attack breaks, and one thread
serving one request at a time (wsgiref) is blinded by ten clients that send a
byte a second. So, like the echo servers' `ready` dispatch, every connection
waits in a selector and costs a descriptor:
- a request must arrive whole (request line and headers, at most 8 KiB) within
  `REQUEST_DEADLINE` of its accept, or it is closed;
- at most `MAX_CONNECTIONS` are open; a new one pushes out the oldest that has
  not sent a whole request yet (it has had longest to, and has not), and only when
  every client has, the oldest of all;
- `accept()` errors back off (descriptors run out under the floods), and a
  descriptor is never lost when memory runs out while accepting;
- running out of memory anywhere drops at most the request in hand;
- `stop()` never waits on a client.
A response is never destroyed by a reset: closing a socket with unread bytes makes
the kernel send RST and discard what it has not transmitted, so after the response
the server shuts its side down and reads to the client's end (a lingering close, as
Apache and nginx do) for at most `LINGER_CLOSE`.
The registry is rendered only for a complete request, and a rendering is reused for
`BODY_REUSE`: it walks every collector (and /proc/self/fd, which grows with the
connections) on a thread that shares the GIL with the echo loop, and a client that
scrapes back to back must not make the echo port pay for each scrape.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.base import bind_listener
from services.budget import METRICS_CLIENTS
from services.logs import RateLimitedLog, quietly
from services.loop import Callback, EventLoop

log = logging.getLogger("echo.metrics")

REQUEST_DEADLINE = 5.0  # seconds from accept for the whole request
MAX_REQUEST = 8192  # bytes of request line and headers
MAX_CONNECTIONS = METRICS_CLIENTS  # counted in the descriptor budget
LINGER_CLOSE = 2.0  # seconds a served client has to close its end before it is closed
BODY_REUSE = 0.5  # seconds a rendered registry is served again
_TICK = 0.5
# The end of the head: a blank line. RFC 9112 (2.2) lets a recipient take a bare LF for
# CRLF, and some clients send one.
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class _Client:
    __slots__ = ("deadline", "lingering", "on_event", "request", "response", "sock")

    def __init__(
        self, sock: socket.socket, deadline: float, handler: Callable[[_Client, Any, int], None]
    ) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = b""
        self.response = b""  # set once the request is complete, emptied as it is sent
        self.lingering = False  # served: waiting for the client's end (LINGER_CLOSE)
        self.on_event: Callback = partial(handler, self)  # what the loop calls for its events

    @property
    def reading(self) -> bool:
        """Still waiting for a whole request."""
        return not self.response and not self.lingering


class MetricsServer:
    """Serves /metrics (and /) from one daemon thread, on its own event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._listener = bind_listener(host, port, "metrics", backlog=1024, buffers=False)
        self._clients: OrderedDict[socket.socket, _Client] = OrderedDict()  # oldest first
        # The loop must outlive running out of memory, or Prometheus goes blind just when a
        # flood makes it worth watching; counted here, logged when the loop ends.
        self.memory_errors = 0
        self._warn = RateLimitedLog(log)
        self._body = b""  # the last rendering of the registry (BODY_REUSE)
        self._body_until = 0.0  # when it goes stale (monotonic)
        try:
            self._loop = EventLoop(_TICK, self._out_of_memory)
        except BaseException:
            self._listener.close()
            raise
        self._loop.after_each_wait(self._expire)
        self._thread = threading.Thread(target=self._loop.run, name="echo-metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._loop.listen(self._listener, self._accept, self._accept_failed)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving; waits at most `timeout` (the loop never blocks on a client)."""
        self._loop.stop()
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
        self._loop.close()

    def _out_of_memory(self) -> None:
        with contextlib.suppress(MemoryError):  # counting past 256 allocates
            self.memory_errors += 1

    def _accept_failed(self, code: int, backoff: float) -> None:
        if code == errno.ENOMEM:
            self._out_of_memory()
        name = errno.errorcode.get(code, str(code))
        self._warn.warning("metrics accept failed with %s; backing off %.3f s", name, backoff)

    def _accept(self, sock: socket.socket) -> None:
        """A new client; OSError (the loop backs off) when it cannot be watched."""
        if len(self._clients) >= MAX_CONNECTIONS:
            self._drop(self._to_push_out())
        try:
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + REQUEST_DEADLINE, self._on_client)
            self._clients[sock] = client
            self._loop.watch(sock, selectors.EVENT_READ, client.on_event)
        except BaseException:  # epoll_ctl: ENOMEM, ENOSPC; memory
            self._clients.pop(sock, None)
            sock.close()
            raise

    def _to_push_out(self) -> _Client:
        """The client to close for a newcomer: the oldest still sending its request, or
        the oldest of all when every client has sent one."""
        return next(
            (client for client in self._clients.values() if client.reading),
            next(iter(self._clients.values())),
        )

    def _on_client(self, client: _Client, _sock: socket.socket, mask: int) -> None:
        try:
            if client.sock not in self._clients:  # dropped earlier, or half-dropped
                self._drop(client)
            elif client.lingering:
                self._discard(client)
            elif mask & selectors.EVENT_READ:
                self._read(client)
            elif client.response:
                self._write(client)
        except OSError:
            self._drop(client)
        except MemoryError:  # out of memory (the floods do this): drop it
            self._drop(client)
            self._out_of_memory()

    def _watch_for(self, client: _Client, events: int) -> None:
        self._loop.rewatch(client.sock, events, client.on_event)

    def _read(self, client: _Client) -> None:
        data = client.sock.recv(MAX_REQUEST)
        if not data:
            self._drop(client)
            return
        client.request += data
        end = _HEAD_END.search(client.request)
        if end is None:
            if len(client.request) >= MAX_REQUEST:
                client.response = _response(431, b"request header fields too large\n")
                self._watch_for(client, selectors.EVENT_WRITE)
            return
        client.response = self._respond(client.request[: end.start()])
        client.request = b""
        self._watch_for(client, selectors.EVENT_WRITE)
        self._write(client)

    def _respond(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b"\n")[0].partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return _response(405, b"only GET\n")
        if path not in (b"/", b"/metrics"):
            return _response(404, b"not found: try /metrics\n")
        try:
            body = self._rendered(time.monotonic())
        except MemoryError:
            raise  # the client is dropped and counted
        except Exception:
            quietly(log.exception, "collecting the metrics failed")
            return _response(500, b"collecting the metrics failed\n")
        return _response(200, body, CONTENT_TYPE_LATEST.encode())

    def _rendered(self, now: float) -> bytes:
        if now >= self._body_until:
            self._body = generate_latest(self._registry)
            self._body_until = now + BODY_REUSE
        return self._body

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.response)
        except BlockingIOError:
            return
        client.response = client.response[sent:]
        if not client.response:  # all of it is the kernel's: close without a reset
            client.sock.shutdown(socket.SHUT_WR)
            client.lingering = True
            client.deadline = time.monotonic() + LINGER_CLOSE
            self._watch_for(client, selectors.EVENT_READ)

    def _discard(self, client: _Client) -> None:
        """Read and drop what a served client still sends, until its end."""
        if not client.sock.recv(MAX_REQUEST):
            self._drop(client)

    def _expire(self, now: float) -> None:
        # A served client's deadline is later than those accepted after it: look at all
        # of them (at most MAX_CONNECTIONS, twice a second).
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        self._loop.unwatch(client.sock)
        client.sock.close()


def _response(status: int, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 431: b"Too Large"}
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason.get(status, b"Error"), content_type, len(body))
    ) + body
