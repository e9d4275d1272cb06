"""`executor`: each connection runs on a bounded `concurrent.futures.ThreadPoolExecutor`.

The executor caps threads but its work queue is unbounded, so admission is
capped in front of it by the base: at most `workers + queue_size` connections
in at once. One more is closed at once and counted, instead of piling up
(with its file descriptor) in the executor's queue behind busy workers.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

from services.base import PoolServer


class ExecutorServer(PoolServer):
    model = "executor"

    def start_workers(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.workers,
            thread_name_prefix="echo-executor",
            initializer=self.stats.worker_threads.incr,
        )

    def dispatch(self, conn: socket.socket) -> None:
        # Raises RuntimeError when no thread can be started; the base rejects then.
        self._pool.submit(self.serve, conn)

    def stop_workers(self, deadline: float) -> bool:
        # Queued jobs still run, but `serve()` closes them at once while stopping.
        self._pool.shutdown(wait=False)
        while self.stats.active_connections() and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.active_connections()
