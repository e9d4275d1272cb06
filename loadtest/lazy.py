"""One socket per thread, opened on first use: the Cookbook's `LazyConnection` (recipe 12.6), fixed.

Under locust's gevent, `threading.local` is per greenlet, so each simulated
user gets its own connection; in the flood tool's probe it is per real thread.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class LazyConnection:
    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        # The recipe took the family as an argument that no caller passed, so an IPv6
        # address failed; the address says which it is.
        self.family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._local = threading.local()

    @property
    def connected(self) -> bool:
        return getattr(self._local, "sock", None) is not None

    def get(self) -> socket.socket:
        """This thread's socket, connecting first if it has none."""
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(self.address)
            except BaseException:
                sock.close()
                raise
            self._local.sock = sock
        return sock

    def discard(self) -> None:
        """Close this thread's socket; the next `get()` reconnects."""
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None:
            del self._local.sock
            sock.close()

    # The recipe's shape: `with conn as sock:` for one connection per use.

    def __enter__(self) -> socket.socket:
        if self.connected:
            raise RuntimeError("already connected in this thread")
        return self.get()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()
