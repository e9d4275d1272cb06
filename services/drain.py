"""How connections with an event reach the pool's workers (`ready` dispatch): leader and
followers.

One of the pool's workers at a time leads: it waits on the parked set itself, takes
what has an event (`take`, up to a batch), queues it, those that keep to the minimum
rate first (`connection.served_first`), and serves the queue one turn after another
before it waits again. So a message costs the kernel's wake-up of the leader and
nothing more: no hand-over from the event loop's thread to a worker and back, which
cost two thread wake-ups and the GIL passed between three threads per message
(docs/history/performance.md, "leader and followers").

One leader, not every idle worker waiting on the set: a turn never blocks but to
linger, and each of its system calls lets go of the GIL, so a second thread serving
turns only takes the GIL in turns with the first, and waits for it behind the
interpreter's switch interval: two or four waiting on the set raised the p99 by 4-14
ms (docs/history/performance.md, "leader and followers").

The others follow, idle in the pool, until the leader is about to block: a turn that
lingers (waits for its client's next message while nothing else waits) first hands
the lead to a follower (`linger`); when its turn ends it leads again if no one does,
else its job ends.

What must stay true (`_lock` held to read or change `_leader` and `_jobs`): while the
pool runs, a job leads or has been submitted to, unless every worker has a job (each
lingering turn then ends at its next message, as `followed()` turns false, and leads),
or the pool refused the job (`call_workers` says so, and the loop calls again at its
next pass). Only the leader puts and takes queued items (`take_all` aside: the loop,
once it has ended).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

Item = TypeVar("Item")
# While items put `first` and others both wait, this many of the first are taken, then one
# of the others: the first never wait behind the whole queue, and the others are never
# starved (a busy client that fell behind because it waited must not wait for good).
FIRST_RUN = 4
WAIT = 1.0  # seconds the leader waits on the set before it looks at `stopping()` again


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
        *,
        take: Callable[[float], Item | None],
        stopping: Callable[[], bool],
        unlead: Callable[[], None],
    ) -> None:
        self._first: deque[Item] = deque()  # served ahead of `_items` (FIRST_RUN)
        self._items: deque[Item] = deque()
        self._first_run = 0  # first items taken in a row while `_items` waited
        self._lock = threading.Lock()
        self._workers = workers
        self._jobs = 0  # submitted and not ended
        self._leader = False  # a job leads, or has been submitted to
        # The watchdog's leader lane: turns the leaders have begun, and whether the
        # leader is in one (a turn that lingers is the leader's no more).
        self.turns = 0
        self.in_turn = False
        self._submit = submit
        self._serve = serve  # never raises; True if the turn called `linger()`
        # Wait up to so many seconds for events and put() them; or return one to serve
        # at once (a lone event, with nothing queued).
        self._take = take
        self._stopping = stopping
        self._unlead = unlead  # a job stops leading: whatever it kept, it settles (never raises)

    def __len__(self) -> int:
        return len(self._first) + len(self._items)

    @property
    def jobs(self) -> int:
        return self._jobs

    @property
    def led(self) -> bool:
        """Whether a job leads, or has been submitted to (a glance, without the lock)."""
        return self._leader

    def followed(self, lingering: bool) -> bool:
        """Whether a turn may linger, or go on lingering (`lingering`), as far as the
        lead goes: nothing the leader took waits, and a follower is free to take the
        lead (to start) or has taken it (to go on). A glance, without the lock: one a
        step behind costs a turn, nothing more."""
        if self._first or self._items:
            return False
        return self._leader if lingering else self._jobs < self._workers

    def put(self, item: Item, first: bool = False) -> None:
        """Queue an item (by the leader); one put `first` goes ahead of the others,
        FIRST_RUN at a time."""
        (self._first if first else self._items).append(item)

    def call_workers(self) -> bool:
        """Submit a job to lead if none leads and a worker is free. False if the pool
        refused it (stopped, or out of memory): the caller calls again later."""
        with self._lock:
            if self._leader or self._jobs >= self._workers:
                return True
            self._leader = True
            self._jobs += 1
        claim: list[object] = [self]
        try:
            self._submit(partial(self._lead, claim))
        except Exception:  # MemoryError included
            # The pool may have queued the job and then failed (queue.Queue.put counts
            # its task after appending it): the first to take the claim decides whether
            # it runs.
            if won(claim):
                with self._lock:
                    self._leader = False
                    self._jobs -= 1
                return False
        return True

    def linger(self) -> None:
        """Called by a turn before it first waits for its client's next message: it
        hands the lead to a follower (a refusal is retried by the loop's next call)."""
        with self._lock:
            self._leader = False
            self.in_turn = False
        self.call_workers()

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

    def _next(self) -> Item:
        """The next item to serve; IndexError when none waits."""
        first, items = self._first, self._items
        if first and (not items or self._first_run < FIRST_RUN):
            self._first_run += 1 if items else 0
            return first.popleft()
        self._first_run = 0
        return items.popleft()

    def _lead(self, claim: list[object]) -> None:
        if not won(claim):
            return  # counted as never submitted
        leading = True
        try:
            while not self._stopping():
                if self._first or self._items:
                    item = self._next()
                else:
                    taken = self._take(WAIT)
                    if taken is None:
                        continue
                    item = taken
                self.turns += 1  # only the leader: no lock needed
                self.in_turn = True
                if not self._serve(item):
                    self.in_turn = False
                    continue
                with self._lock:  # it lingered, and handed the lead on: take it back?
                    if self._leader:
                        leading = False
                        return
                    self._leader = True
        finally:
            if leading:
                self.in_turn = False
                self._unlead()
            with self._lock:
                self._jobs -= 1
                if leading:
                    self._leader = False
