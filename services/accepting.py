"""accept() for a server that runs out of descriptors and memory on purpose: how an
accept that fails is backed off, and an accept that cannot lose the descriptor it
was given. Both listeners (the echo port and the metrics port) are flooded; the event
loop (`services/loop.py`) uses both for each.
"""

from __future__ import annotations

import errno
import os
import socket

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
