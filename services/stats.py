"""The server's statistics: lock-protected counters that move together.

Every connection walks one path, and each step moves its counters at once (a
`concurrency.Step`, holding all their locks) so a scrape never sees a connection
counted twice or not at all.
With `connection` dispatch a connection owns a worker for its whole life:

    accepted ──> queued ──> busy ──> closed{reason}
                   └──────────────> rejected{reason}

With `ready` dispatch it waits in the event loop and gets a worker only while
it has bytes to echo, so it goes round:

    accepted ──> waiting ──> queued ──> busy ──> closed{reason}
                  ^  └────> closed{idle, evicted}  │
                  ├────────────────────────────────┤ (read everything there was)
    writing <─────────────────────────────────────-┘ (the client does not read)
      └──> queued, or closed{slow_reader}

so at any instant `accepted == active + rejected + closed` and
`active == waiting + queued + busy + writing`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from services.concurrency import SharedCounter, Step, adjust, locked, snapshot
from services.states import Closed, Rejected, State

# Latency buckets from 100 us: where a healthy pool's dispatch wait and a loopback echo
# are (prometheus-client's default buckets start at 5 ms).
SUB_MS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


_COUNT_TRIES = 3
T = TypeVar("T")


def retrying(step: Callable[..., T], *args: Any) -> T:
    """Run a counting step, trying again if memory runs out meanwhile.

    Counting allocates (integers, lock bookkeeping), and under an address-space limit
    it can fail where the server just freed a connection's buffers; a count that is
    skipped would be wrong for the rest of the process's life. Every step is all or
    nothing (`Step`, `adjust()`), so a retry never counts twice. Raises after the last try.
    """
    for _ in range(_COUNT_TRIES - 1):
        try:
            return step(*args)
        except MemoryError:
            pass
    return step(*args)


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


class Tally:
    """Counts one thread keeps for a while and adds to the shared counters in one step
    (`flush`): the pool's leader, which would otherwise take a counting step (a few
    locks through `acquire()`) for every message (docs/performance.md)."""

    __slots__ = ("_deltas",)

    def __init__(self) -> None:
        self._deltas: dict[SharedCounter, int] = {}

    def __bool__(self) -> bool:
        return bool(self._deltas)

    def add(self, counter: SharedCounter, delta: int) -> None:
        self._deltas[counter] = self._deltas.get(counter, 0) + delta

    def flush(self) -> None:
        """Add everything kept, as one step; on MemoryError nothing is added or lost,
        and a later flush tries again."""
        if self._deltas:
            adjust(*self._deltas.items())
            self._deltas.clear()


class Histogram:
    """Observations counted into fixed buckets under one lock (Prometheus's cumulative
    form is made at scrape time)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def take(self) -> tuple[list[int], float]:
        """The counts per bucket (the last is +Inf) and the sum, and start again from zero:
        what a load worker sends its master with each report."""
        with self._lock:
            taken = (self._counts, self._sum)
            self._counts, self._sum = [0] * (len(self.bounds) + 1), 0.0
        return taken

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's `take()`, over the same bounds."""
        if len(counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(counts)} bucket counts for {len(self.bounds) + 1} buckets")
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """[(upper bound, observations at or below it), ... ("+Inf", all)] and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total


@dataclass(frozen=True)
class StatsSnapshot:
    accepted: int
    queued: int
    busy: int
    waiting: int
    writing: int
    rejected: dict[str, int]
    closed: dict[str, int]
    received_bytes: int
    sent_bytes: int
    messages: int

    @property
    def active(self) -> int:
        return self.waiting + self.queued + self.busy + self.writing


class ServerStats:
    def __init__(self) -> None:
        self.accepted = SharedCounter()
        self.queued = SharedCounter()
        self.busy = SharedCounter()
        self.waiting = SharedCounter()  # parked in the event loop until readable
        self.writing = SharedCounter()  # parked until the client takes its echo
        self.started = SharedCounter()
        self.pending_output = SharedCounter()  # bytes of echoes the clients have not taken
        # Seconds from the leader taking a connection's event to its turn (ready dispatch).
        self.dispatch_wait = Histogram(SUB_MS_BUCKETS)
        # Seconds from the event loop's wake-up to the end of its pass (ready dispatch):
        # accepting, timeouts and eviction, what a newcomer's accept waits behind.
        self.loop_lag = Histogram(SUB_MS_BUCKETS)
        self.rejected = LabeledCounter(Rejected)
        self.closed = LabeledCounter(Closed)
        self.received_bytes = SharedCounter()
        self.sent_bytes = SharedCounter()
        self.messages = SharedCounter()
        self.accept_errors = OpenLabeledCounter()
        self.thread_start_failures = SharedCounter()
        self.worker_threads = SharedCounter()
        self.accept_loop_ticks = SharedCounter()
        self._counters = {
            State.WAITING: self.waiting,
            State.QUEUED: self.queued,
            State.BUSY: self.busy,
            State.WRITING: self.writing,
            State.RESTING: self.writing,  # parked as a writer, only not watched yet
        }
        # The steps every turn takes, their locks put in order once (see Step).
        self._moves: dict[tuple[SharedCounter, SharedCounter], Step] = {}
        traffic = (self.received_bytes, self.sent_bytes, self.messages)
        self._traffic = Step(*traffic)
        # A turn is counted busy from its start (connection dispatch) or from when it
        # lingers (ready: a turn on the leader that does not linger is counted in the
        # leader's tally, `leader.Leader.count_turn`).
        parked = (self.waiting, self.writing)
        self._begins = {
            source: Step(source, self.busy, self.started) for source in (self.queued, *parked)
        }
        self._hand_backs = {to: Step(self.busy, to, *traffic) for to in parked}

    def counter(self, state: State) -> SharedCounter:
        """The counter of connections in `state` (KeyError for CLOSED: closed{reason})."""
        return self._counters[state]

    def try_admit(self, capacity: int | None, ready_dispatch: bool = False) -> bool:
        """Count an accepted connection and admit it (queued for a worker, or with
        `ready_dispatch` waiting in the loop for bytes), unless `capacity` are already in."""
        full = self.rejected[Rejected.AT_CAP if ready_dispatch else Rejected.QUEUE_FULL]
        states = (self.queued, self.busy, self.waiting, self.writing)
        with locked(self.accepted, full, *states):
            self.accepted.add_locked(1)
            if capacity is not None and sum(s.value_locked() for s in states) >= capacity:
                full.add_locked(1)
                return False
            (self.waiting if ready_dispatch else self.queued).add_locked(1)
            return True

    def move(self, source: SharedCounter, target: SharedCounter, count: int = 1) -> None:
        """Connections from one state (or reason) to another, as one step."""
        step = self._moves.get((source, target))
        if step is None:  # the first such move; two threads may both make one, harmlessly
            step = self._moves.setdefault((source, target), Step(source, target))
        step(-count, count)

    def on_start(self) -> None:
        self.begin_turn(self.queued)

    def begin_turn(self, source: SharedCounter) -> None:
        """A turn goes on the books as busy (started), from where it was counted."""
        self._begins[source](-1, 1, 1)

    def on_traffic(self, received: int, sent: int, messages: int) -> None:
        self._traffic(received, sent, messages)

    def hand_back(self, parked: SharedCounter, received: int, sent: int, messages: int) -> None:
        """A turn that went busy ends with its connection parked (`waiting` or
        `writing`): the move and the turn's traffic as one step, where they were two."""
        self._hand_backs[parked](-1, 1, received, sent, messages)

    def active_connections(self) -> int:
        return sum(snapshot(self.queued, self.busy, self.waiting, self.writing))

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
            self.waiting,
            self.writing,
            self.received_bytes,
            self.sent_bytes,
            self.messages,
            *rejected.values(),
            *closed.values(),
        )
        fixed, rest = values[:8], values[8:]
        return StatsSnapshot(
            accepted=fixed[0],
            queued=fixed[1],
            busy=fixed[2],
            waiting=fixed[3],
            writing=fixed[4],
            received_bytes=fixed[5],
            sent_bytes=fixed[6],
            messages=fixed[7],
            rejected=dict(zip(rejected, rest[: len(rejected)], strict=True)),
            closed=dict(zip(closed, rest[len(rejected) :], strict=True)),
        )
