"""How connections with an event reach the pool's workers (`ready` dispatch): one queue (those
that keep to the minimum rate first, `connection.served_first`), and a job on the pool
only for a connection that no worker is free to take.

A job takes connections from the queue until it is empty, so under load a worker goes
from one turn to the next without being woken for each, and the loop hands the pool
a job per connection only when the pool is idle. Submitting a job per connection
cost a future, a lock and a thread wake-up for every message, and at the cap that was
most of a turn (docs/history/performance.md, "the loop's system calls").

And no more jobs than the GIL can use: a turn never blocks except to linger (wait for
the client's next message while no one else needs the worker), so beyond RUNNABLE jobs
that do not linger, another job only passes the GIL to and fro: every system call of a
turn lets go of it, and 22 runnable workers spent more time handing it over through
the kernel than echoing (docs/history/performance.md, "the loop's system calls").

What must stay true, with `_lock` held whenever it is read or changed: every queued
connection has a job not serving anything that will take it, or RUNNABLE jobs that
do not linger will come back for it within a turn, unless every worker has a job
(`call_workers`). A job that takes a connection counts itself as serving in the same
step, so the loop never counts on a job that is about to be busy; a job that lingers
says so (`linger`) before it waits. Jobs called while others lingered end after their
turn once RUNNABLE others do not linger.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

Item = TypeVar("Item")
RUNNABLE = 4  # jobs that do not linger: enough to overlap their system calls on 2 cores
# While items put `first` and others both wait, this many of the first are taken, then one
# of the others: the first never wait behind the whole queue, and the others are never
# starved (a busy client that fell behind because it waited must not wait for good).
FIRST_RUN = 4


def won(claim: list[object]) -> bool:
    """Take the one item of `claim`: True for the first caller only (list.pop() is
    atomic, and allocates nothing on success)."""
    try:
        claim.pop()
    except IndexError:
        return False
    return True


class PoolQueue(Generic[Item]):
    def __init__(
        self,
        workers: int,
        submit: Callable[[Callable[[], None]], None],
        serve: Callable[[Item], bool],
    ) -> None:
        self._first: deque[Item] = deque()  # served ahead of `_items` (FIRST_RUN)
        self._items: deque[Item] = deque()
        self._first_run = 0  # first items taken in a row while `_items` waited
        self._lock = threading.Lock()
        self._workers = workers
        self._jobs = 0  # submitted and not ended
        self._serving = 0  # of them, those serving a connection now
        self._lingering = 0  # of those, the ones whose turn has lingered
        self._submit = submit
        self._serve = serve  # never raises; True if the turn called `linger()`

    def __len__(self) -> int:
        return len(self._first) + len(self._items)

    @property
    def jobs(self) -> int:
        return self._jobs

    def linger(self) -> None:
        """Called by a job's turn before it first waits for a client's next message: it
        may have been counted on for what is queued, so another job is called if need
        be (a refusal is retried by the loop's next call)."""
        with self._lock:
            self._lingering += 1
        self.call_workers()

    def put(self, item: Item, first: bool = False) -> None:
        """Queue an item; one put `first` goes ahead of the others, FIRST_RUN at a time.
        `call_workers()` then, once for a batch."""
        (self._first if first else self._items).append(item)

    def call_workers(self) -> bool:
        """Submit jobs until every queued item has a job free to take it, or RUNNABLE
        jobs do not linger, or every worker has a job. False if the pool refused one
        (stopped, or out of memory): the items wait for the next call."""
        while True:
            with self._lock:
                free = self._jobs - self._serving
                runnable = self._jobs - self._lingering
                if self._jobs >= self._workers or len(self) <= free or runnable >= RUNNABLE:
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

    def _next(self, first: deque[Item], items: deque[Item]) -> Item:
        """The next item to serve (`_lock` held); IndexError when none waits."""
        if first and (not items or self._first_run < FIRST_RUN):
            self._first_run += 1 if items else 0
            return first.popleft()
        self._first_run = 0
        return items.popleft()

    def take_all(self) -> list[Item]:
        """Everything queued, for whoever closes them (the loop has ended)."""
        taken = []
        for items in (self._first, self._items):
            while True:
                try:
                    taken.append(items.popleft())
                except IndexError:
                    break
        return taken

    def _drain(self, claim: list[object]) -> None:
        if not won(claim):
            return  # counted as never submitted
        lock, first, items, serving, lingered = self._lock, self._first, self._items, 0, False
        while True:
            with lock:
                self._serving -= serving
                self._lingering -= lingered
                if self._jobs - 1 - self._lingering >= RUNNABLE:
                    # Jobs called while others lingered: enough of the rest do not linger
                    # now, and will come back for what is queued.
                    self._jobs -= 1
                    return
                try:
                    item = self._next(first, items)
                except IndexError:
                    self._jobs -= 1
                    return
                self._serving += 1
                serving = 1
            try:
                lingered = self._serve(item)
            except BaseException:  # it must not: then whether it lingered is unknown
                with lock:
                    self._serving -= 1
                    self._jobs -= 1
                raise
