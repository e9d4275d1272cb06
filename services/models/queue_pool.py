"""`queue`: the hand-rolled pool, a bounded `queue.Queue` and N worker threads.

Each worker loops on `get()` for the life of the server (the recipe's worker
served one connection and died). The queue holds what the workers have not
picked up yet; the base admits at most `workers + queue_size` connections, so
a burst that arrives faster than idle workers call `get()` is not turned away.
A full pool means the connection is closed at once and counted as rejected.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

from services.base import PoolServer


class QueueServer(PoolServer):
    model = "queue"

    def start_workers(self) -> None:
        self._queue: queue.Queue[socket.socket | None] = queue.Queue(maxsize=self.capacity)
        self._workers = [
            threading.Thread(target=self._work, name=f"echo-queue-{n}", daemon=True)
            for n in range(self.config.workers)
        ]
        for worker in self._workers:
            worker.start()
            self.stats.worker_threads.incr()

    def dispatch(self, conn: socket.socket) -> None:
        try:
            self._queue.put_nowait(conn)
        except queue.Full:
            self.reject(conn, "queue_full")

    def _work(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            self.serve(conn)

    def stop_workers(self, deadline: float) -> bool:
        try:
            for _ in self._workers:
                # Behind any queued connection, which serve() closes while stopping.
                self._queue.put(None, timeout=max(0.001, deadline - time.monotonic()))
        except queue.Full:
            return False  # workers are not draining the queue: hung
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)
