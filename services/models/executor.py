"""`executor`: each connection runs on a bounded `concurrent.futures.ThreadPoolExecutor`.

The executor caps threads but its work queue is unbounded, so admission is
capped in front of it: a semaphore of `workers + queue_size` slots. A
connection that finds no free slot is closed at once and counted, instead of
piling up (with its file descriptor) behind busy workers.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from services.base import Server


class ExecutorServer(Server):
    model = "executor"

    def start_workers(self) -> None:
        self._slots = threading.BoundedSemaphore(self.config.workers + self.config.queue_size)
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.workers,
            thread_name_prefix="echo-executor",
            initializer=self.stats.worker_threads.incr,
        )

    @property
    def queue_capacity(self) -> int:
        return self.config.queue_size

    def dispatch(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            self.reject(conn, "queue_full")
            return
        try:
            self._pool.submit(self._run, conn)
        except RuntimeError:  # the executor could not start a thread, or is shut down
            self._slots.release()
            raise

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        finally:
            self._slots.release()

    def stop_workers(self, deadline: float) -> bool:
        # Queued jobs still run, but `serve()` closes them at once while stopping.
        self._pool.shutdown(wait=False)
        while self.stats.active_connections() and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.active_connections()
