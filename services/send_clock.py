"""The send timeout's clock for `ready` dispatch: which writer has stalled longest."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Stalled(Protocol):
    stalled_since: float  # monotonic: the writer's last progress
    clock: int  # its live entry in the clock; 0 while not timed


Connection = TypeVar("Connection", bound=Stalled)


class SendClock(Generic[Connection]):
    """The writers in the order their send timeouts fall due: by `stalled_since`, which
    is not the order they were parked in (a writer that rested, or was woken and sent
    nothing, comes back with its old stall). A heap of (stalled_since, entry, conn);
    an entry is live while it is the connection's `clock`, and dead ones are dropped
    when they reach the top or outnumber the live ones (as asyncio drops cancelled
    timers). Only the loop's thread touches it."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Connection]] = []
        self._entries = itertools.count(1)

    def add(self, conn: Connection, writers: int) -> None:
        """Start timing `conn`, one of `writers` parked now; its `stalled_since` must not
        change until `remove`."""
        if len(self._heap) > 2 * writers + 64:
            self._heap = [item for item in self._heap if item[1] == item[2].clock]
            heapq.heapify(self._heap)
        entry = next(self._entries)
        heapq.heappush(self._heap, (conn.stalled_since, entry, conn))
        conn.clock = entry

    @staticmethod
    def remove(conn: Connection) -> None:
        conn.clock = 0

    def first(self) -> Connection | None:
        """The writer stalled longest."""
        heap = self._heap
        while heap and heap[0][1] != heap[0][2].clock:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def by_stall(self) -> Iterator[Connection]:
        """Every writer, the longest stalled first."""
        heap = list(self._heap)  # already a heap
        while heap:
            _, entry, conn = heapq.heappop(heap)
            if entry == conn.clock:
                yield conn
