"""The echo loop every model runs for one connection, and why a connection ended."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from services.states import Closed, Wait

READ_SIZE = 64 * 1024
# The kernel's buffers per connection (it doubles what it is given), set on the listener
# so that every accepted socket inherits them. Left to autotuning, the send buffer grows
# to 4 MiB on loopback, and a client that never reads makes the server read and echo
# that much before its echo stalls; the receive buffer grows to megabytes while a
# stalled writer's client goes on sending. Both hold at least a whole read's echo.
# Measured per stalled writer: docs/design.md, "Echoes held back in the kernel".
SEND_BUFFER = READ_SIZE
RECEIVE_BUFFER = READ_SIZE
_DONTWAIT = int(socket.MSG_DONTWAIT)  # an int, not the enum: it is or-ed on every message
_PEEK = int(socket.MSG_PEEK)
FLUSH_INTERVAL = 0.25  # seconds of traffic a connection counts locally before publishing
_buffers = threading.local()


def worker_buffer() -> memoryview:
    """The calling thread's read buffer (`echo_turn`): one per worker, not per connection."""
    buffer: memoryview | None = getattr(_buffers, "view", None)
    if buffer is None:
        buffer = _buffers.view = memoryview(bytearray(READ_SIZE))
    return buffer


def echo(
    conn: socket.socket,
    *,
    idle_timeout: float | None,
    send_timeout: float | None,
    on_traffic: Callable[[int, int, int], None],
    waited: float = 0.0,
) -> Closed:
    """Echo until the client stops; return the close reason.

    Returns EOF when the client closes or half-closes (everything it sent has
    been echoed by then), IDLE when it sent nothing for `idle_timeout`, and
    SLOW_READER when one echo could not be handed to the kernel within
    `send_timeout` because the client does not read. Socket errors propagate.

    The timeouts are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO) on a blocking
    socket: a Python socket timeout would add a poll() before every recv and
    send, which cost a third of the throughput here.

    `waited` is how long the connection sat in the queue before this worker
    took it. The idle clock runs from accept, not from here: otherwise every
    queued idle connection holds a worker for a further full timeout, and an
    idle flood lasts (1 + queue/workers) timeouts instead of one. Whatever the
    client sent while queued is already readable, so the shortened first wait
    only ever ends connections that really are idle.

    Traffic is counted locally and handed to `on_traffic(received, sent,
    messages)` at most every `FLUSH_INTERVAL` and when the connection ends:
    taking the shared counters' locks on every message made the workers
    contend for them and halved throughput.
    """
    buffer = bytearray()  # 64 KiB, allocated on the first message: idle costs no buffer
    view = memoryview(buffer)
    conn.settimeout(None)
    first_wait = None if idle_timeout is None else max(idle_timeout - waited, 0.001)
    set_kernel_timeout(conn, socket.SO_RCVTIMEO, first_wait)
    set_kernel_timeout(conn, socket.SO_SNDTIMEO, send_timeout)
    received_total = sent_total = messages = 0
    next_flush = time.monotonic() + FLUSH_INTERVAL
    try:
        while True:
            try:
                if buffer:
                    received = conn.recv_into(buffer)
                else:
                    first = conn.recv(READ_SIZE)
                    received = len(first)
                    buffer = bytearray(READ_SIZE)
                    view = memoryview(buffer)
                    view[:received] = first
            except BlockingIOError:  # SO_RCVTIMEO expired
                return Closed.IDLE
            if received == 0:
                return Closed.EOF
            received_total += received
            if first_wait != idle_timeout:
                first_wait = idle_timeout
                set_kernel_timeout(conn, socket.SO_RCVTIMEO, idle_timeout)
            now = time.monotonic()  # the echo's send timeout runs from here
            try:  # one send() takes a whole echo unless the client has stopped reading
                sent = conn.send(view[:received])
            except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
                return Closed.SLOW_READER
            if sent < received:
                sent += _send_rest(conn, view[sent:received], send_timeout, now)
            sent_total += sent  # all of it, or what a slow reader took before it stalled
            if sent < received:
                return Closed.SLOW_READER
            messages += 1
            if now >= next_flush:
                on_traffic(received_total, sent_total, messages)
                received_total = sent_total = messages = 0
                next_flush = now + FLUSH_INTERVAL
    finally:
        if messages or received_total:
            on_traffic(received_total, sent_total, messages)


def _send_rest(conn: socket.socket, rest: memoryview, timeout: float | None, started: float) -> int:
    """Send the rest of an echo that the kernel took only part of (the client reads
    slowly), by `timeout` after `started` (monotonic), when the echo's first send()
    began; the bytes sent, fewer than `rest` if the client did not read them in time."""
    if timeout is None:
        conn.sendall(rest)
        return len(rest)
    deadline = started + timeout
    total = 0
    try:
        while total < len(rest):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            set_kernel_timeout(conn, socket.SO_SNDTIMEO, remaining)
            try:
                total += conn.send(rest[total:])
            except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
                break
        return total
    finally:
        set_kernel_timeout(conn, socket.SO_SNDTIMEO, timeout)


def set_kernel_timeout(conn: socket.socket, option: int, seconds: float | None) -> None:
    """Set SO_RCVTIMEO or SO_SNDTIMEO; None (or 0) means wait forever."""
    seconds = seconds or 0.0
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if seconds and not (whole or micro):
        micro = 1  # a tiny positive timeout must not turn into "forever"
    conn.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, micro))


def close_reason_for(error: OSError) -> Closed:
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Closed.RESET
    return Closed.ERROR


class Turn:
    """What one worker turn on a parked connection did (`ready` dispatch)."""

    __slots__ = ("_published", "lingered", "messages", "received", "sent")

    def __init__(self) -> None:
        self.received = self.sent = self.messages = 0
        self.lingered = False  # it waited for a message at least once (`on_linger`)
        self._published = (0, 0, 0)

    def add(self, received: int, sent: int, messages: int) -> None:
        self.received += received
        self.sent += sent
        self.messages += messages

    def unpublished(
        self, received: int = 0, sent: int = 0, messages: int = 0
    ) -> tuple[int, int, int]:
        """What the turn has done and the shared counters have not been given, taken as
        given now; `received`, `sent` and `messages` are counts not yet `add`ed."""
        before = self._published
        self._published = (self.received + received, self.sent + sent, self.messages + messages)
        return (
            self._published[0] - before[0],
            self._published[1] - before[1],
            self._published[2] - before[2],
        )


def echo_turn(  # noqa: PLR0912, PLR0915 (the per-message loop stays in one frame, for speed)
    conn: socket.socket,
    buffer: memoryview,
    unsent: bytes,
    *,
    max_messages: int,
    linger: bool,
    no_one_waiting: Callable[[], bool],
    turn: Turn,
    hold_back: bool = False,
    publish: Callable[[int, int, int], None] | None = None,
    on_linger: Callable[[], None] | None = None,
) -> tuple[Wait | Closed, bytes]:
    """Echo what the client has sent without ever blocking on a send.

    First hands the kernel what an earlier turn could not (`unsent`), then reads and
    echoes until a read comes back short of the buffer (the kernel held no more then:
    asking again would cost a system call to hear so) or the client closes. Every
    `max_messages` it yields the connection if another one waits for a worker
    (`no_one_waiting()` says no), so that one busy client cannot keep a worker from
    the others.

    With `linger`, while no one waits for a worker, it waits for the next message
    itself, for as long as the socket's receive timeout (SO_RCVTIMEO, the caller's):
    for a ping-pong client that saves parking it and waking a worker again, and the
    blocking recv() costs one system call, where polling first cost two and an
    exception. The socket is in blocking mode for that; every other call passes
    MSG_DONTWAIT. A lingering turn may last as long as the client talks, so it hands
    its traffic to `publish(received, sent, messages)` every `FLUSH_INTERVAL`, as
    `echo` does (`turn.unpublished()` is the rest, for the caller). The first time it
    decides to wait it calls `on_linger()`, then sets `turn.lingered`.

    With `hold_back` (the server's memory for unsent echoes is running short) it takes
    from the kernel only what it could echo: it peeks, sends, and then reads exactly
    what was sent, so an echo the client does not take stays in the kernel's buffers
    and TCP's window stops the client; nothing is returned as unsent. It costs a
    system call more per message, so only under that pressure.

    Returns what the connection waits for next and the echo the client has not taken
    yet: (Wait.READ, b""), (Wait.WRITE, rest), or (Closed.EOF, b""). Every
    byte read is echoed or returned as unsent before this returns. Socket errors
    propagate.
    """
    if unsent:
        sent = _send_some(conn, unsent)
        turn.sent += sent
        if sent < len(unsent):
            return Wait.WRITE, unsent[sent:]
    # The loop runs once per message, most of a worker's time when it lingers: what it
    # looks up is bound to locals, and it counts in locals (written to `turn` on the way
    # out).
    recv_into, send, clock = conn.recv_into, conn.send, time.monotonic
    peek = _PEEK if hold_back else 0
    flags = peek | _DONTWAIT
    size = len(buffer)
    received_total = sent_total = messages = 0
    next_flush = 0.0  # set when the turn first lingers: a turn that does not pays nothing
    try:
        while True:
            try:
                received = recv_into(buffer, 0, flags)
            except BlockingIOError:  # nothing more for now, or not within the linger
                return Wait.READ, b""
            if received == 0:
                return Closed.EOF, b""
            drained = received < size  # a stream socket returns all it holds, up to size
            try:
                sent = send(buffer[:received], _DONTWAIT)
            except BlockingIOError:
                sent = 0
            stalled = sent < received
            if peek:
                if sent:  # take from the kernel what went out: it is there, peeked
                    recv_into(buffer, sent, _DONTWAIT)
                received = sent
            if received:
                received_total += received
                sent_total += sent
                messages += 1
            if stalled:
                return Wait.WRITE, bytes(buffer[sent:received])
            at_cap = messages % max_messages == 0
            wait = False  # block (up to the linger) for the next message
            if at_cap or linger:
                free = no_one_waiting()
                if at_cap and not free:
                    return Wait.READ, b""
                wait = linger and free
                if wait and not turn.lingered and on_linger is not None:
                    on_linger()
                    turn.lingered = True
                if wait and publish is not None:
                    now = clock()
                    if not next_flush:
                        next_flush = now + FLUSH_INTERVAL
                    elif now >= next_flush:
                        publish(*turn.unpublished(received_total, sent_total, messages))
                        next_flush = now + FLUSH_INTERVAL
            if drained and not wait:
                # Asking again would cost a system call and an exception to hear "nothing
                # yet"; the loop's selector says when there is more.
                return Wait.READ, b""
            flags = peek | (0 if wait else _DONTWAIT)
    finally:
        turn.add(received_total, sent_total, messages)


def _send_some(conn: socket.socket, data: bytes | memoryview) -> int:
    try:
        return conn.send(data, _DONTWAIT)
    except BlockingIOError:
        return 0
