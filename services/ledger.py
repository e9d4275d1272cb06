"""Every open connection, and the one way to close one: closed, dropped from the open
set and counted together, from whichever thread ends it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from services.concurrency import SharedCounter
from services.logs import RateLimitedLog
from services.states import Closed, Rejected, State
from services.stats import ServerStats, retrying

# While stopping, a connection that ends this way was most likely cut by the shutdown.
_CUT_SHORT = frozenset({Closed.EOF, Closed.RESET, Closed.ERROR})


class Ledger:
    def __init__(self, stats: ServerStats, stopping: Callable[[], bool], warn: RateLimitedLog):
        self._stats = stats
        self.stopping = stopping  # whether the server is stopping (closes become "shutdown")
        self._warn = warn
        # Open connections and when each was accepted (monotonic seconds).
        self._open: dict[socket.socket, float] = {}
        self._lock = threading.Lock()

    def add(self, conn: socket.socket) -> None:
        with self._lock:
            self._open[conn] = time.monotonic()

    def accepted_at(self, conn: socket.socket) -> float:
        with self._lock:
            return self._open.get(conn, time.monotonic())

    def still_open(self) -> list[socket.socket]:
        with self._lock:
            return list(self._open)

    def forget(self, conn: socket.socket) -> None:
        """Close a connection and drop it from the open set. Never raises."""
        try:
            with self._lock:
                self._open.pop(conn, None)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def finish(self, conn: socket.socket, state: State, reason: Closed) -> None:
        """Close a connection counted in `state` and count it as closed{reason}. Never
        raises."""
        self.forget(conn)  # first: if memory has run out, counting may fail, closing rarely does
        if reason in _CUT_SHORT and self.stopping():
            reason = Closed.SHUTDOWN
        self._count(state, self._stats.closed[reason])

    def reject(self, conn: socket.socket, state: State, reason: Rejected) -> None:
        """Close an admitted connection counted in `state` that no worker will serve, and
        count it as rejected{reason}. Never raises."""
        self.forget(conn)
        self._count(state, self._stats.rejected[reason])

    def _count(self, state: State, target: SharedCounter) -> None:
        """Move one connection between counters; never raises (a worker must not die of
        a count it could not make, though the count is then lost and said so)."""
        try:
            retrying(self._stats.move, self._stats.counter(state), target)
        except MemoryError:
            self._warn.warning("out of memory while counting a connection; a count is lost")
