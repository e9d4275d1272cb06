"""What keeping a counter exact costs: four ways to count from several threads at once.

- `SharedCounter`: the recipe's per-instance `threading.Lock` (what the servers use);
- class-level `RLock`: one re-entrant lock shared by every instance of the class;
- prometheus-client's `Counter.inc()` (its own lock inside);
- unlocked `+=`: fast, and exact only as long as the interpreter never switches
  threads in the middle of the read-modify-write.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from services.concurrency import SharedCounter


class ClassLockCounter:
    _lock = threading.RLock()  # shared by all instances: less memory, more contention

    def __init__(self) -> None:
        self.value = 0

    def incr(self) -> None:
        with ClassLockCounter._lock:
            self.value += 1


class UnlockedCounter:
    def __init__(self) -> None:
        self.value = 0

    def incr(self) -> None:
        self.value += 1


@dataclass(frozen=True)
class LockResult:
    strategy: str
    threads: int
    ops_per_second: float
    expected: int
    counted: int

    @property
    def lost(self) -> int:
        return self.expected - self.counted


def _strategies() -> dict[str, tuple[Callable[[], Callable[[], None]], Callable[[], int]]]:
    shared, classy, unlocked = SharedCounter(), ClassLockCounter(), UnlockedCounter()
    registry = CollectorRegistry()
    prom = Counter("bench_ops", "ops", registry=registry)
    return {
        "SharedCounter (Lock)": (lambda: shared.incr, lambda: shared.value),
        "class-level RLock": (lambda: classy.incr, lambda: classy.value),
        "prometheus Counter": (
            lambda: prom.inc,
            lambda: int(registry.get_sample_value("bench_ops_total") or 0),
        ),
        "unlocked +=": (lambda: unlocked.incr, lambda: unlocked.value),
    }


def run(total_ops: int, thread_counts: tuple[int, ...] = (1, 4, 16)) -> list[LockResult]:
    results = []
    # A short switch interval makes thread switches, and so lost updates, likelier:
    # the unlocked counter's correctness is tested, not assumed.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for threads in thread_counts:
            for name, (make, read) in _strategies().items():
                incr = make()
                per_thread = total_ops // threads

                def work(incr: Callable[[], None] = incr, n: int = per_thread) -> None:
                    for _ in range(n):
                        incr()

                workers = [threading.Thread(target=work) for _ in range(threads)]
                started = time.perf_counter()
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                seconds = time.perf_counter() - started
                expected = per_thread * threads
                results.append(LockResult(name, threads, expected / seconds, expected, read()))
    finally:
        sys.setswitchinterval(old_interval)
    return results
