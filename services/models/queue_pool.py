"""`queue`: the hand-rolled pool, a bounded `queue.Queue` and N worker threads.

Each worker loops on `get()` for the life of the server (the recipe's worker
served one connection and died). The queue holds what the workers have not
picked up yet; the base admits at most `workers + queue_size` connections, so
a burst that arrives faster than idle workers call `get()` is not turned away.
A full pool means the connection is closed at once and counted as rejected.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from services.config import Config
from services.logs import quietly
from services.pool import PoolServer

log = logging.getLogger("echo.queue")


class QueueServer(PoolServer):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # Bounded as a backstop: admission already caps it at `capacity`, and the room
        # beyond that is for the stop signals, one per worker.
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(
            maxsize=(self.capacity or 0) + config.workers
        )
        self._workers = [
            threading.Thread(target=self._work, name=f"echo-queue-{n}", daemon=True)
            for n in range(config.workers)
        ]

    def start_workers(self) -> None:
        for worker in self._workers:
            worker.start()
            self.stats.worker_threads.incr()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put_nowait(job)

    def _work(self) -> None:
        # A job closes and counts its own connection whatever happens (it never raises);
        # the guard is so that nothing, not even a MemoryError on the way in or out of
        # get(), can end a worker and shrink the pool for good.
        while True:
            try:
                job = self._queue.get()
                if job is None:
                    return
                job()
            except Exception:
                quietly(log.exception, "a queue worker's job failed; the worker goes on")

    def stop_workers(self, deadline: float) -> bool:
        for _ in self._workers:
            # Behind any queued job; a connection's job closes it while stopping.
            self._queue.put_nowait(None)
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)
