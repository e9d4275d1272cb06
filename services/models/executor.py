"""`executor`: each connection runs on a bounded `concurrent.futures.ThreadPoolExecutor`.

The executor caps threads but its work queue is unbounded, so admission is
capped in front of it by the base: at most `workers + queue_size` connections
in at once (`connection` dispatch). One more is closed at once and counted,
instead of piling up (with its file descriptor) in the executor's queue behind
busy workers.

Two changes to the stock executor, so that a burst of connections is picked up
by all idle workers together (docs/design.md, "The executor under a burst"):

- Every worker is started up front. Left to itself the executor starts a thread
  inside `submit()`, and `Thread.start()` waits until the new thread has run: the
  event loop must never wait for a worker to get the GIL.
- Its work queue is a `queue.Queue`, not the stock `queue.SimpleQueue`: a
  Queue's `put()` wakes a worker per item, where a SimpleQueue's woken worker
  wakes the next only once it has had the GIL.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from services.config import Config
from services.pool import PoolServer

_START_TIMEOUT = 60.0  # seconds for every worker to start; generous, this machine freezes


class _PromptExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose idle workers are all woken by a burst (see above)."""

    def __init__(
        self, max_workers: int, thread_name_prefix: str, initializer: Callable[[], object]
    ) -> None:
        super().__init__(max_workers, thread_name_prefix, initializer)
        # Same put()/get()/get_nowait() as the SimpleQueue the executor uses; set before
        # any worker starts, since each worker is handed the queue when it starts.
        self._work_queue = queue.Queue()  # type: ignore[assignment]


class ExecutorServer(PoolServer):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._pool = _PromptExecutor(  # starts no thread until start_workers()
            max_workers=config.workers,
            thread_name_prefix="echo-executor",
            initializer=self.stats.worker_threads.incr,
        )

    def start_workers(self) -> None:
        # The executor starts a thread for a job only when no thread is idle: jobs that
        # wait for each other are each given a new one, until all `workers` run.
        everyone = threading.Barrier(self.config.workers + 1)
        try:
            for _ in range(self.config.workers):
                self._pool.submit(everyone.wait, _START_TIMEOUT)
            everyone.wait(_START_TIMEOUT)
        except BaseException:
            everyone.abort()  # release the ones that did start
            self._pool.shutdown(wait=False)
            raise

    def submit(self, job: Callable[[], None]) -> None:
        # Every worker runs already: this queues the job for the next idle one and
        # never starts a thread (RuntimeError only once the pool is shut down).
        self._pool.submit(job)

    def stop_workers(self, deadline: float) -> bool:
        # Queued jobs still run, but a job closes its connection at once while stopping.
        self._pool.shutdown(wait=False)
        while self.stats.active_connections() and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.active_connections()
