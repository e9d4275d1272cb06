"""accept() for a server that runs out of descriptors and memory on purpose.

Both listeners (the echo port and the metrics port) are flooded, so both share
how an accept that fails is backed off, and an accept that cannot lose the
descriptor it was given.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

# accept() fails with these when the process or the system runs out of descriptors or
# memory; retrying at once would spin a core, so back off.
EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST = 0.01
BACKOFF_FIRST_OTHER = 0.001  # any other error (it may not repeat)
BACKOFF_MAX = 1.0


def next_backoff(code: int, backoff: float) -> float:
    """The pause after an accept that failed with `code`, `backoff` being the last one.

    Every error backs off: out of descriptors or memory, retrying at once would spin
    a core, and so would any error that repeats (EPERM from a firewall or seccomp
    policy, say). One that does not repeat (a peer that gave up, ECONNABORTED) costs a
    millisecond, and the next accept that succeeds ends the back-off.
    """
    first = BACKOFF_FIRST if code in EXHAUSTION else BACKOFF_FIRST_OTHER
    return min(max(backoff * 2, first), BACKOFF_MAX)


def listen_again(
    register: Callable[[], object], backoff: float, warn: Callable[..., None], now: float
) -> tuple[float, float]:
    """Put a paused listener back in its selector (`register`): (paused until, back-off).
    epoll_ctl can fail (ENOMEM, ENOSPC arrive as OSError): then the listener stays
    paused a back-off longer, and the loop goes on (MemoryError is the loop's to take)."""
    try:
        register()
    except OSError as error:
        backoff = next_backoff(error.errno or errno.ENOMEM, backoff)
        warn("cannot listen again (%s); backing off %.3f s", error, backoff)
        return now + backoff, backoff
    return 0.0, backoff


def turn_until(
    stopped: Callable[[], bool], turn: Callable[[], None], out_of_memory: Callable[[], None]
) -> None:
    """Run a loop's `turn` until `stopped()`, outliving turns that run out of memory.

    select() and every hook allocate, so a loop that must outlive the floods cannot
    let MemoryError end it; after such a turn it pauses as accept does (10 ms, doubling
    to 1 s while memory stays out), which leaves the CPU and the GIL to the threads
    whose ending frees memory: retrying at once kept the process starved.
    """
    pause = 0.0
    while not stopped():
        try:
            turn()
            pause = 0.0
        except MemoryError:
            out_of_memory()
            pause = next_backoff(errno.ENOMEM, pause)
            time.sleep(pause)


def accept_connection(listener: socket.socket) -> socket.socket:
    """`listener.accept()` that never leaks the new descriptor.

    `socket.accept()` takes the descriptor from the kernel, then wraps it in a socket
    object; when memory runs out between the two, the descriptor is lost for good
    (the address-space flood leaked hundreds, until accept() failed with EMFILE).
    """
    fd, _peer = listener._accept()  # type: ignore[attr-defined]
    try:
        conn = socket.socket(listener.family, listener.type, listener.proto, fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    if socket.getdefaulttimeout() is None and listener.gettimeout():
        conn.setblocking(True)  # as socket.accept() does (CPython issue 7995)
    return conn
