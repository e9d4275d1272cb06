"""How fast idle executor workers pick up a burst of jobs: the stock
`ThreadPoolExecutor` against the executor model's `_PromptExecutor`, on one CPU.

The stock executor's `SimpleQueue` wakes one waiting worker at a time, each once
the previous one has had its turn at the GIL; a `queue.Queue` wakes a worker per
item (services/models/executor.py). Reported as the stock/prompt ratio of the
time from submitting a burst to the last job starting, over interleaved rounds.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from services.models.executor import _PromptExecutor

_DEADLINE = 60.0


@dataclass(frozen=True)
class BurstResult:
    workers: int
    stock_seconds: list[float]
    prompt_seconds: list[float]

    @property
    def ratios(self) -> list[float]:
        return [s / p for s, p in zip(self.stock_seconds, self.prompt_seconds, strict=True)]


def pickup_seconds(executor_class: type[ThreadPoolExecutor], workers: int) -> float:
    """Seconds for idle, already started workers to pick up a burst of `workers` jobs
    while other threads keep handing the GIL around (as busy connections do)."""
    pool = executor_class(max_workers=workers, thread_name_prefix="burst", initializer=lambda: None)
    everyone = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(everyone.wait, _DEADLINE)
    everyone.wait(_DEADLINE)
    stop, hold, all_started = threading.Event(), threading.Event(), threading.Event()
    started: list[float] = []
    lock = threading.Lock()

    def churn() -> None:
        a, b = socket.socketpair()
        with a, b:
            for _ in range(10_000_000):  # bounded; stops when the burst is picked up
                if stop.is_set():
                    return
                a.send(b"x")
                b.recv(1)

    def job() -> None:
        with lock:
            started.append(time.monotonic())
            if len(started) == workers:
                all_started.set()
        hold.wait(_DEADLINE)

    churners = [threading.Thread(target=churn) for _ in range(8)]
    try:
        for thread in churners:
            thread.start()
        submitted = time.monotonic()
        for _ in range(workers):
            pool.submit(job)
        if not all_started.wait(_DEADLINE):
            raise RuntimeError(f"a burst of {workers} jobs did not start in {_DEADLINE:g} s")
        return max(started) - submitted
    finally:
        hold.set()
        stop.set()
        for thread in churners:
            thread.join(_DEADLINE)
        pool.shutdown()


def run(rounds: int, workers: int = 64) -> BurstResult:
    """Interleaved rounds of both executors, every thread on one CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # threads started from here on inherit it
    stock, prompt = [], []
    try:
        for _ in range(rounds):
            stock.append(pickup_seconds(ThreadPoolExecutor, workers))
            prompt.append(pickup_seconds(_PromptExecutor, workers))
    finally:
        os.sched_setaffinity(0, before)
    return BurstResult(workers, stock, prompt)


def format_burst(result: BurstResult) -> str:
    ratios = result.ratios
    return (
        f"\n  burst of {result.workers} jobs to idle workers, one CPU: stock executor "
        f"{statistics.median(result.stock_seconds) * 1000:.0f} ms, the executor model's "
        f"{statistics.median(result.prompt_seconds) * 1000:.0f} ms (medians); stock/model "
        f"{statistics.median(ratios):.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}x)"
    )
