"""Connections ordered by a time of their own: which one's deadline comes first.

`ready` dispatch keeps two: writers by when their send timeout started (`stalled_since`),
and waiting connections by when they stop being worth their place at the cap. Neither
order is the order connections were parked in, so a heap, not the parking order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item", bound=Hashable)


class Deadlines(Generic[Item]):
    """Items by a time given when each is added. A heap of (time, entry, item), with the
    live entry of each item in a dict; an entry that is not live (the item was removed,
    or added again) is dropped when it reaches the top or when dead entries outnumber the
    live ones, as asyncio drops cancelled timers. One thread only."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Item]] = []
        self._live: dict[Item, int] = {}
        self._entries = itertools.count(1)

    def __len__(self) -> int:
        return len(self._live)

    def add(self, item: Item, when: float) -> None:
        """Order `item` by `when` (again, if it was added before). All or nothing."""
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if self._is_live(entry)]
            heapq.heapify(self._heap)
        entry = next(self._entries)
        heapq.heappush(self._heap, (when, entry, item))
        try:
            self._live[item] = entry
        except BaseException:  # MemoryError: the pushed entry stays dead
            self._live.pop(item, None)
            raise

    def remove(self, item: Item) -> None:
        self._live.pop(item, None)

    def first(self) -> tuple[float, Item] | None:
        """The earliest (time, item)."""
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        return (heap[0][0], heap[0][2]) if heap else None

    def in_order(self) -> Iterator[Item]:
        """Every item, the earliest first."""
        heap = list(self._heap)  # already a heap
        while heap:
            entry = heapq.heappop(heap)
            if self._is_live(entry):
                yield entry[2]

    def _is_live(self, entry: tuple[float, int, Item]) -> bool:
        return self._live.get(entry[2]) == entry[1]
