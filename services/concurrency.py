"""Lock-protected counters and deadlock-free acquisition of several locks.

The shapes come from the Python Cookbook's recipes 12.4 and 12.5, with the
recipe's bugs fixed: the lock-order check runs *before* the held list is
touched, locks are released in reverse order, and a failed acquisition leaves
the held list exactly as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol


class LockOrderError(RuntimeError):
    """A thread asked for a lock that sorts below one it already holds."""


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...


_held = threading.local()


def held_locks() -> tuple[_Lock, ...]:
    """The locks the calling thread holds through `acquire()`, in acquisition order."""
    return tuple(_held_list())


def _held_list() -> list[_Lock]:
    try:
        held: list[_Lock] = _held.locks
    except AttributeError:
        held = _held.locks = []
    return held


class acquire:  # lowercase: used like a function, `with acquire(a, b):`
    """Take every lock in one global order (by `id()`), so no two callers deadlock.

    Nesting is allowed only upwards in that order: asking for a lock that sorts
    at or below one already held by this thread raises `LockOrderError` at once
    instead of risking a deadlock later.

    A class, not a generator-based context manager: every counter update takes this
    path, and the generator's machinery was most of its cost (a third of the event
    loop's time under a 10,000-connection slowloris flood).
    """

    __slots__ = ("_count", "_held", "_ordered", "_start")

    def __init__(self, *locks: _Lock) -> None:
        self._set_order(in_lock_order(locks))

    @classmethod
    def in_order(cls, ordered: tuple[_Lock, ...]) -> acquire:
        """For locks already put in order by `in_lock_order()`: a step taken on every
        turn of every connection works its order out once, not on every call."""
        taking = cls.__new__(cls)
        taking._set_order(ordered)
        return taking

    def _set_order(self, ordered: tuple[_Lock, ...]) -> None:
        self._ordered = ordered
        self._count = len(ordered)  # counted here: __exit__ calls nothing that allocates
        self._held: list[_Lock] = []  # both set again by __enter__
        self._start = 0

    def __enter__(self) -> None:
        ordered = self._ordered
        if not ordered:
            return
        held = _held_list()
        if held and id(ordered[0]) <= id(held[-1]):
            raise LockOrderError(
                f"lock order violation in thread {threading.current_thread().name!r}: "
                f"asked for {len(ordered)} lock(s) starting at id {id(ordered[0]):#x} while "
                f"holding id {id(held[-1]):#x}; nest acquire() calls only in increasing "
                "lock order"
            )
        # Nothing on the way out may allocate: under an exhausted address space (one of
        # the floods) a failing release would leave a lock held for good, and every thread
        # after it deadlocked or told of a lock-order violation that never happened. The
        # held list is extended before any lock is taken (if that fails, nothing is held);
        # releasing counts down over `ordered`, and small integers are preallocated.
        start = len(held)
        held.extend(ordered)
        taken = 0
        try:
            for lock in ordered:
                lock.acquire()
                taken += 1
        except BaseException:
            _release(ordered, taken, held, start)
            raise
        self._held, self._start = held, start

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._count:
            _release(self._ordered, self._count, self._held, self._start)


def in_lock_order(locks: Iterable[_Lock]) -> tuple[_Lock, ...]:
    """Each lock once, in the one global order every `acquire()` takes locks in."""
    return tuple(sorted({id(lock): lock for lock in locks}.values(), key=id))


def _release(ordered: tuple[_Lock, ...], taken: int, held: list[_Lock], start: int) -> None:
    """Release the first `taken` of `ordered`, last first, and forget them as held."""
    while taken:
        taken -= 1
        ordered[taken].release()
    del held[start:]


class SharedCounter:
    """An integer that threads change only while holding its own `threading.Lock`."""

    __slots__ = ("_value", "lock")

    def __init__(self, initial: int = 0) -> None:
        self._value = initial
        self.lock = threading.Lock()

    def incr(self, delta: int = 1) -> None:
        with self.lock:
            self._value += delta

    def decr(self, delta: int = 1) -> None:
        with self.lock:
            self._value -= delta

    @property
    def value(self) -> int:
        with self.lock:
            return self._value

    @property
    def glance(self) -> int:
        """The value without taking the lock, so perhaps a step behind an update under
        way: for a heuristic read on every message, never for a count that must add up."""
        return self._value

    # For multi-counter transactions inside `locked()`: the caller holds the lock.

    def add_locked(self, delta: int) -> None:
        if not self.lock.locked():
            raise RuntimeError("add_locked() outside locked()")
        self._value += delta

    def value_locked(self) -> int:
        if not self.lock.locked():
            raise RuntimeError("value_locked() outside locked()")
        return self._value

    def __repr__(self) -> str:
        return f"SharedCounter({self.value})"


def locked(*counters: SharedCounter) -> AbstractContextManager[None]:
    """Hold every counter's lock (through `acquire()`) for a read-decide-write step."""
    return acquire(*(counter.lock for counter in counters))


def adjust(*changes: tuple[SharedCounter, int]) -> None:
    """Apply several counter deltas as one step: no reader sees half of them.

    Readers that need a consistent view take the same locks through
    `snapshot()`; both go through `acquire()`, so they cannot deadlock.
    """
    Step(*(counter for counter, _ in changes))(*(delta for _, delta in changes))


class Step:
    """`adjust()` for a fixed list of counters, with their locks' order worked out once:
    the server takes the same few steps on every turn of every connection, and sorting
    the locks was a third of a step's cost."""

    __slots__ = ("_counters", "_locks")

    def __init__(self, *counters: SharedCounter) -> None:
        self._counters = counters
        self._locks = in_lock_order(counter.lock for counter in counters)

    def __call__(self, *deltas: int) -> None:
        """Add `deltas` to the counters, in their order, as one step."""
        counters = self._counters
        with acquire.in_order(self._locks):
            # Every new value first: adding can allocate, and a MemoryError then must
            # leave every counter as it was, so that the caller may simply try again.
            values = [
                counter._value + delta for counter, delta in zip(counters, deltas, strict=True)
            ]
            for counter, value in zip(counters, values, strict=True):
                counter._value = value


def snapshot(*counters: SharedCounter) -> tuple[int, ...]:
    """Read several counters at one instant, holding all their locks."""
    with acquire(*(counter.lock for counter in counters)):
        return tuple(counter._value for counter in counters)
