"""`threads`: one new thread per connection, with a reduced stack. Deliberately unbounded.

This is the control group: nothing limits how many threads an attacker makes
it start. The reduced stack (64 KiB by default) saves address space, not
resident memory. When the OS refuses a thread, the connection is closed and
counted, and the server keeps accepting.

Threads are started with `_thread.start_new_thread`, not `threading.Thread`:
`Thread.start()` waits for the new thread to report in, and under memory
exhaustion a new thread can die before it does, which hangs the accept loop
for good (seen in this project's address-space test). The low-level call
returns as soon as the OS has made the thread, or raises when it refuses.
"""

from __future__ import annotations

import _thread
import logging
import socket
import threading
import time

from services.base import Server
from services.config import Config
from services.logs import RateLimitedLog
from services.stats import persist

log = logging.getLogger("echo.threads")


class ThreadPerConnectionServer(Server):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._previous_stack_size = 0  # the stack size is process-wide: put it back on stop
        self._refusals = RateLimitedLog(log)

    def start_workers(self) -> None:
        self._previous_stack_size = threading.stack_size(self.config.stack_size)

    def dispatch(self, conn: socket.socket) -> None:
        try:
            _thread.start_new_thread(self._run, (conn,))
        except (RuntimeError, MemoryError) as error:  # out of threads or address space
            self.stats.thread_start_failures.incr()
            self._refusals.warning("cannot start a thread for a new connection: %s", error)
            self.reject(conn, "thread_start_failed")

    def _run(self, conn: socket.socket) -> None:
        try:
            persist(self.stats.worker_threads.incr)
        except MemoryError:  # the thread runs but cannot be counted: close and count that
            self.finish(conn, self.stats.queued, "error")
            return
        try:
            self.handle_connection(conn)  # never raises
        finally:
            persist(self.stats.worker_threads.decr)

    def stop_workers(self, deadline: float) -> bool:
        threading.stack_size(self._previous_stack_size)
        while self.stats.worker_threads.value and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.worker_threads.value
