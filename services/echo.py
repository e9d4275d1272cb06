"""The echo loop every model runs for one connection, and why a connection ended."""

from __future__ import annotations

import socket
from collections.abc import Callable

READ_SIZE = 64 * 1024


def echo(
    conn: socket.socket,
    *,
    idle_timeout: float | None,
    send_timeout: float | None,
    on_received: Callable[[int], None],
    on_sent: Callable[[int], None],
    waited: float = 0.0,
) -> str:
    """Echo until the client stops; return the close reason.

    Returns "eof" when the client closes or half-closes (everything it sent has
    been echoed by then), "idle" when it sent nothing for `idle_timeout`, and
    "slow_reader" when one echo could not be handed to the kernel within
    `send_timeout` because the client does not read. Socket errors propagate.

    `waited` is how long the connection sat in the queue before this worker
    took it. The idle clock runs from accept, not from here: otherwise every
    queued idle connection holds a worker for a further full timeout, and an
    idle flood lasts (1 + queue/workers) timeouts instead of one. Whatever the
    client sent while queued is already readable, so the shortened first wait
    only ever ends connections that really are idle.
    """
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    current = idle_timeout if idle_timeout is None else max(idle_timeout - waited, 0.001)
    conn.settimeout(current)
    while True:
        try:
            received = conn.recv_into(buffer)
        except TimeoutError:
            return "idle"
        if received == 0:
            return "eof"
        on_received(received)
        if current != send_timeout:  # settimeout only when it changes: a syscall saved
            current = send_timeout
            conn.settimeout(current)
        try:
            # Since Python 3.5 the timeout bounds the whole sendall, not each chunk.
            conn.sendall(view[:received])
        except TimeoutError:
            return "slow_reader"
        on_sent(received)
        if current != idle_timeout:
            current = idle_timeout
            conn.settimeout(current)


def close_reason_for(error: OSError) -> str:
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    return "error"
