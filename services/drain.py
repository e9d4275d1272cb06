"""How ready connections reach the pool's workers (`ready` dispatch): one queue, and a
job on the pool only for a connection that no worker is free to take.

A job takes connections from the queue until it is empty, so under load a worker goes
from one turn to the next without being woken for each, and the loop hands the pool
a job per connection only when the pool is idle. Submitting a job per connection
cost a future, a lock and a thread wake-up for every message, and at the cap that was
most of a turn (docs/performance.md, "The loop's system calls").

What must stay true, with `_lock` held whenever it is read or changed: every queued
connection has a job not serving anything that will take it, unless every worker has
a job (`call_workers`). A job that takes a connection counts itself as serving in the
same step, so the loop never counts on a job that is about to be busy.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

Item = TypeVar("Item")


def won(claim: list[object]) -> bool:
    """Take the one item of `claim`: True for the first caller only (list.pop() is
    atomic, and allocates nothing on success)."""
    try:
        claim.pop()
    except IndexError:
        return False
    return True


class ReadyQueue(Generic[Item]):
    def __init__(
        self,
        workers: int,
        submit: Callable[[Callable[[], None]], None],
        serve: Callable[[Item], None],
    ) -> None:
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._workers = workers
        self._jobs = 0  # submitted and not ended
        self._serving = 0  # of them, those serving a connection now
        self._submit = submit
        self._serve = serve  # never raises

    def __len__(self) -> int:
        return len(self._items)

    @property
    def jobs(self) -> int:
        return self._jobs

    def put(self, item: Item) -> None:
        """Queue an item; `call_workers()` then, once for a batch."""
        self._items.append(item)

    def call_workers(self) -> bool:
        """Submit jobs until every queued item has a job free to take it, or every
        worker has a job. False if the pool refused one (stopped, or out of memory):
        the items wait for the next call."""
        while True:
            with self._lock:
                free = self._jobs - self._serving
                if self._jobs >= self._workers or len(self._items) <= free:
                    return True
                self._jobs += 1
            claim: list[object] = [self]
            try:
                self._submit(partial(self._drain, claim))
            except Exception:  # MemoryError included
                # The pool may have queued the job and then failed (queue.Queue.put
                # counts its task after appending it): the first to take the claim
                # decides whether it runs.
                if won(claim):
                    with self._lock:
                        self._jobs -= 1
                    return False

    def take_all(self) -> list[Item]:
        """Everything queued, for whoever closes them (the loop has ended)."""
        taken = []
        while True:
            try:
                taken.append(self._items.popleft())
            except IndexError:
                return taken

    def _drain(self, claim: list[object]) -> None:
        if not won(claim):
            return  # counted as never submitted
        lock, items, serving = self._lock, self._items, 0
        while True:
            with lock:
                self._serving -= serving
                try:
                    item = items.popleft()
                except IndexError:
                    self._jobs -= 1
                    return
                self._serving += 1
                serving = 1
            try:
                self._serve(item)
            except BaseException:
                with lock:
                    self._serving -= 1
                    self._jobs -= 1
                raise
