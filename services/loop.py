"""The event loop both ports run on: one thread, one selector, and nothing that can stop it
but `stop()`.

What it owns, so that neither the echo server nor the metrics endpoint writes it again:
- a coalesced wake-up (`wake()`: at most one byte in flight, from any thread);
- listeners that back off when accept() fails (descriptors and memory run out under the
  floods) and never lose a descriptor they were given (`accept_connection`);
- deadlines: each wait lasts at most until the earliest one its users ask for;
- running out of memory: a pass that fails to allocate pauses as accept does, a callback
  that fails is reported, and the loop goes on.
Everything registered with it runs on its thread: callbacks for events (`watch`), and
what runs after every wait (`after_each_wait`), in the order registered.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from services.accepting import accept_connection, next_backoff
from services.logs import RateLimitedLog, quietly

log = logging.getLogger("echo.loop")

Callback = Callable[[Any, int], None]  # (the registered file object, the event mask)
ACCEPT_BATCH = 64  # accepts per event, so the rest of the loop is not kept waiting


class _Listener:
    """A listening socket, what it does with each connection, and its back-off."""

    __slots__ = ("admit", "backoff", "on_error", "paused_until", "sock")

    def __init__(
        self,
        sock: socket.socket,
        admit: Callable[[socket.socket], None],
        on_error: Callable[[int, float], None],
    ) -> None:
        self.sock = sock
        self.admit = admit
        self.on_error = on_error  # (errno, the back-off it causes)
        self.backoff = 0.0  # seconds, the pause after the last failed accept
        self.paused_until = 0.0  # monotonic; 0 while it is watched


class EventLoop:
    def __init__(self, tick: float, out_of_memory: Callable[[], None]) -> None:
        """`tick`: the longest wait for events; `out_of_memory`: told each time running
        out of memory cost the loop a pass or a callback (it must not raise)."""
        self._tick = tick
        self._out_of_memory = out_of_memory
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._on_wake)
        self._stopping = threading.Event()
        self._woken = False
        self._on_wake_calls: list[Callable[[], None]] = []
        self._after_wait: list[Callable[[float], None]] = []
        self._deadlines: list[Callable[[float], float]] = []
        self._listeners: list[_Listener] = []
        self.woke_at = 0.0  # monotonic: when the last select() returned
        self._warn = RateLimitedLog(log)

    # -- what runs on the loop -----------------------------------------------------------

    def watch(self, fileobj: Any, events: int, callback: Callback) -> None:
        """Call `callback(fileobj, mask)` on the loop's thread for each of its events.
        OSError when the kernel refuses (epoll_ctl: ENOMEM, ENOSPC)."""
        self._selector.register(fileobj, events, callback)

    def rewatch(self, fileobj: Any, events: int, callback: Callback) -> None:
        self._selector.modify(fileobj, events, callback)

    def unwatch(self, fileobj: Any) -> None:
        """Stop watching; nothing happens if it was not watched (or is closed)."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fileobj)

    def after_each_wait(
        self,
        after: Callable[[float], None],
        deadline: Callable[[float], float] | None = None,
    ) -> None:
        """Call `after(now)` after every wait for events, woken or not; `deadline(now)`,
        if given, says when it must run next at the latest (monotonic)."""
        self._after_wait.append(after)
        if deadline is not None:
            self._deadlines.append(deadline)

    def on_wake(self, call: Callable[[], None]) -> None:
        """Call `call()` on the loop's thread after each `wake()`."""
        self._on_wake_calls.append(call)

    def listen(
        self,
        sock: socket.socket,
        admit: Callable[[socket.socket], None],
        on_error: Callable[[int, float], None],
    ) -> None:
        """Accept connections on a bound, listening, non-blocking `sock` and pass each to
        `admit`, which owns it from then on (it may raise OSError: then the listener
        backs off as for a failed accept). A failed accept is reported to
        `on_error(errno, backoff)`, and the listener is not watched for `backoff`
        seconds (see `next_backoff`)."""
        listener = _Listener(sock, admit, on_error)
        self._listeners.append(listener)
        self.watch(sock, selectors.EVENT_READ, partial(self._on_listener, listener))

    # -- from any thread -----------------------------------------------------------------

    def wake(self) -> None:
        """Wake the loop (at most one byte in flight). Never raises. The flag stays set
        only while a byte is in flight: a wake-up that sent nothing clears it, so the
        next one tries again (what runs after every wait runs woken or not)."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_writer.send(b"\0")
        except BlockingIOError:
            pass  # the pair is full: bytes are in flight, the loop will wake
        except Exception as error:  # closed (stopped), ENOBUFS, out of memory: nothing sent
            self._woken = False
            self._warn.warning("a wake-up was not sent (%r); the next pass takes it", error)

    def stop(self) -> None:
        """Ask the loop to end after its current pass. Safe from signal handlers and
        other threads."""
        self._stopping.set()
        # A full or closed wake-up socket means the loop is waking up already.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        """Pass after pass until `stop()`, outliving passes that run out of memory:
        select() and every callback allocate, so after such a pass the loop pauses as accept does
        (10 ms, doubling to 1 s while memory stays out), which leaves the CPU and the
        GIL to the threads whose ending frees memory: retrying at once kept the
        process starved."""
        pause = 0.0
        while not self._stopping.is_set():
            try:
                self._once()
                pause = 0.0
            except MemoryError:
                self._out_of_memory()
                pause = next_backoff(errno.ENOMEM, pause)
                time.sleep(pause)

    def close(self) -> None:
        """Release the selector and the wake-up pair (not the listeners: their owners')."""
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _once(self) -> None:
        now = time.monotonic()
        timeout = self._tick
        for listener in self._listeners:
            if listener.paused_until and now >= listener.paused_until:
                self._listen_again(listener, now)
            if listener.paused_until:
                timeout = min(timeout, listener.paused_until - now)
        for deadline in self._deadlines:
            timeout = min(timeout, deadline(now) - now)
        events = self._selector.select(max(timeout, 0.0))
        self.woke_at = time.monotonic()
        for key, mask in events:
            self._call(key.data, key.fileobj, mask)
        now = time.monotonic()
        for after in self._after_wait:
            try:
                after(now)
            except MemoryError:
                raise  # the loop pauses (`run`)
            except Exception:  # reported; the others still run, and the loop goes on
                quietly(log.exception, "unexpected error after a wait; carrying on")

    def _call(self, callback: Callback, fileobj: Any, mask: int) -> None:
        """One registration's callback. A failure is reported, and the loop goes on:
        everything waiting in the loop depends on this one thread."""
        try:
            callback(fileobj, mask)
        except MemoryError:
            self._out_of_memory()
        except Exception:
            quietly(log.exception, "unexpected error in the event loop; carrying on")

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
        for call in self._on_wake_calls:
            call()

    def _on_listener(self, listener: _Listener, _sock: socket.socket, _mask: int) -> None:
        """Accept what waits on `listener` (at most ACCEPT_BATCH); pause it on failure."""
        try:
            code = self._accept_batch(listener)
        except MemoryError:
            # Anything can fail to allocate when memory runs out. The connection in
            # hand, if any, is closed by its admitter or the GC; accept_connection()
            # closes one it could not wrap.
            code = errno.ENOMEM
        if code is None:
            return
        listener.backoff = next_backoff(code, listener.backoff)
        with contextlib.suppress(MemoryError):  # reporting may count, and counting allocates
            listener.on_error(code, listener.backoff)
        # Stop listening for a while; the rest of the loop goes on.
        self.unwatch(listener.sock)
        listener.paused_until = time.monotonic() + listener.backoff

    def _accept_batch(self, listener: _Listener) -> int | None:
        """Accept and admit; the errno of a failure, None when nothing failed."""
        for _ in range(ACCEPT_BATCH):
            if self._stopping.is_set():
                return None
            try:
                conn = accept_connection(listener.sock)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as error:
                return error.errno or 0
            listener.backoff = 0.0  # this accept worked: a failure after it starts afresh
            try:
                listener.admit(conn)
            except OSError as error:
                return error.errno or errno.ENOMEM
        return None

    def _listen_again(self, listener: _Listener, now: float) -> None:
        """Watch a paused listener again. epoll_ctl can fail (ENOMEM, ENOSPC arrive as
        OSError): then it stays paused a back-off longer, and the loop goes on."""
        try:
            self.watch(listener.sock, selectors.EVENT_READ, partial(self._on_listener, listener))
        except OSError as error:
            listener.backoff = next_backoff(error.errno or errno.ENOMEM, listener.backoff)
            listener.paused_until = now + listener.backoff
            self._warn.warning(
                "cannot listen again (%s); backing off %.3f s", error, listener.backoff
            )
            return
        listener.paused_until = 0.0
