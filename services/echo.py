"""The echo loop every model runs for one connection, and why a connection ended."""

from __future__ import annotations

import socket
from collections.abc import Callable

READ_SIZE = 64 * 1024


def echo(
    conn: socket.socket,
    idle_timeout: float | None,
    send_timeout: float | None,
    on_received: Callable[[int], None],
    on_sent: Callable[[int], None],
) -> str:
    """Echo until the client stops; return the close reason.

    Returns "eof" when the client closes or half-closes (everything it sent has
    been echoed by then), "idle" when it sent nothing for `idle_timeout`, and
    "slow_reader" when one echo could not be handed to the kernel within
    `send_timeout` because the client does not read. Socket errors propagate.
    """
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    same = idle_timeout == send_timeout
    conn.settimeout(idle_timeout)
    while True:
        try:
            received = conn.recv_into(buffer)
        except TimeoutError:
            return "idle"
        if received == 0:
            return "eof"
        on_received(received)
        if not same:
            conn.settimeout(send_timeout)
        try:
            # Since Python 3.5 the timeout bounds the whole sendall, not each chunk.
            conn.sendall(view[:received])
        except TimeoutError:
            return "slow_reader"
        on_sent(received)
        if not same:
            conn.settimeout(idle_timeout)


def close_reason_for(error: OSError) -> str:
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    return "error"
