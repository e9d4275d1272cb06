"""The server's statistics: lock-protected counters that move together.

Every connection walks one path, and each step moves its counters in a single
`adjust()` so a scrape never sees a connection counted twice or not at all:

    accepted ──> queued ──> busy ──> closed{reason}
                   └──────────────> rejected{reason}

so at any instant `accepted == active + rejected + closed` and
`active == queued + busy`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from services.concurrency import SharedCounter, adjust, locked, snapshot

REJECT_REASONS = ("queue_full", "thread_start_failed", "out_of_memory", "dispatch_failed")
CLOSE_REASONS = ("eof", "idle", "slow_reader", "reset", "error", "shutdown")


class LabeledCounter:
    """One `SharedCounter` per label value; the label values are fixed up front."""

    def __init__(self, labels: Iterable[str]) -> None:
        self._counters = {label: SharedCounter() for label in labels}

    def __getitem__(self, label: str) -> SharedCounter:
        return self._counters[label]

    def counters(self) -> dict[str, SharedCounter]:
        return dict(self._counters)


class OpenLabeledCounter:
    """Like `LabeledCounter`, for label values not known in advance (errno names)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dict; each counter has its own
        self._counters: dict[str, SharedCounter] = {}

    def incr(self, label: str) -> None:
        with self._lock:
            counter = self._counters.get(label)
            if counter is None:
                counter = self._counters[label] = SharedCounter()
        counter.incr()

    def values(self) -> dict[str, int]:
        with self._lock:
            counters = dict(self._counters)
        return {label: counter.value for label, counter in counters.items()}


@dataclass(frozen=True)
class StatsSnapshot:
    accepted: int
    queued: int
    busy: int
    rejected: dict[str, int]
    closed: dict[str, int]
    received_bytes: int
    sent_bytes: int
    messages: int

    @property
    def active(self) -> int:
        return self.queued + self.busy


class ServerStats:
    def __init__(self) -> None:
        self.accepted = SharedCounter()
        self.queued = SharedCounter()
        self.busy = SharedCounter()
        self.started = SharedCounter()
        self.rejected = LabeledCounter(REJECT_REASONS)
        self.closed = LabeledCounter(CLOSE_REASONS)
        self.received_bytes = SharedCounter()
        self.sent_bytes = SharedCounter()
        self.messages = SharedCounter()
        self.accept_errors = OpenLabeledCounter()
        self.thread_start_failures = SharedCounter()
        self.worker_threads = SharedCounter()
        self.accept_loop_ticks = SharedCounter()

    def try_admit(self, capacity: int | None) -> bool:
        """Count an accepted connection and admit it, unless `capacity` are already in."""
        full = self.rejected["queue_full"]
        with locked(self.accepted, self.queued, self.busy, full):
            self.accepted.add_locked(1)
            if (
                capacity is not None
                and self.queued.value_locked() + self.busy.value_locked() >= capacity
            ):
                full.add_locked(1)
                return False
            self.queued.add_locked(1)
            return True

    def on_reject(self, reason: str) -> None:
        adjust((self.queued, -1), (self.rejected[reason], 1))

    def on_start(self) -> None:
        adjust((self.queued, -1), (self.busy, 1), (self.started, 1))

    def on_close(self, reason: str) -> None:
        adjust((self.busy, -1), (self.closed[reason], 1))

    def on_traffic(self, received: int, sent: int, messages: int) -> None:
        adjust((self.received_bytes, received), (self.sent_bytes, sent), (self.messages, messages))

    def active_connections(self) -> int:
        return sum(snapshot(self.queued, self.busy))

    def progress(self) -> int:
        """A number that grows whenever a worker gets anything done."""
        return sum(snapshot(self.messages, self.started, *self.closed.counters().values()))

    def snapshot(self) -> StatsSnapshot:
        rejected = self.rejected.counters()
        closed = self.closed.counters()
        values = snapshot(
            self.accepted,
            self.queued,
            self.busy,
            self.received_bytes,
            self.sent_bytes,
            self.messages,
            *rejected.values(),
            *closed.values(),
        )
        fixed, rest = values[:6], values[6:]
        return StatsSnapshot(
            accepted=fixed[0],
            queued=fixed[1],
            busy=fixed[2],
            received_bytes=fixed[3],
            sent_bytes=fixed[4],
            messages=fixed[5],
            rejected=dict(zip(rejected, rest[: len(rejected)], strict=True)),
            closed=dict(zip(closed, rest[len(rejected) :], strict=True)),
        )
