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

A thread the OS made can still die before its first line runs: the interpreter
allocates the thread's frame stack then, and under an exhausted address space
that fails where no code of ours can catch it. So a connection is handed over
through `_unclaimed`: the new thread claims it, and one not claimed within
`CLAIM_DEADLINE` is taken back by the accept loop, closed and counted as a
thread that could not start. Whoever pops it first owns it; a thread that
starts later finds nothing and ends.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import socket
import threading
import time

from services.base import Server
from services.config import Config
from services.logs import RateLimitedLog
from services.stats import persist

log = logging.getLogger("echo.threads")

CLAIM_DEADLINE = 5.0  # seconds a new thread has to claim its connection


class ThreadPerConnectionServer(Server):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._previous_stack_size = 0  # the stack size is process-wide: put it back on stop
        self._refusals = RateLimitedLog(log)
        # Connections handed to a thread that has not started yet, and by when it must.
        self._unclaimed: dict[socket.socket, float] = {}

    def start_workers(self) -> None:
        self._previous_stack_size = threading.stack_size(self.config.stack_size)

    def dispatch(self, conn: socket.socket) -> None:
        self._unclaimed[conn] = time.monotonic() + CLAIM_DEADLINE
        try:
            _thread.start_new_thread(self._run, (conn,))
        except (RuntimeError, MemoryError) as error:  # out of threads or address space
            if self._unclaimed.pop(conn, None) is not None:
                self._refuse(conn, error)

    def _refuse(self, conn: socket.socket, error: BaseException | str) -> None:
        self.reject(conn, "thread_start_failed")  # first: it never raises
        with contextlib.suppress(MemoryError):
            persist(self.stats.thread_start_failures.incr)
        self._refusals.warning("cannot start a thread for a new connection: %s", error)

    def on_loop_tick(self, now: float) -> None:
        for conn, deadline in list(self._unclaimed.items()):
            if deadline <= now and self._unclaimed.pop(conn, None) is not None:
                self._refuse(conn, f"its thread did not start in {CLAIM_DEADLINE:g} s")

    def _run(self, conn: socket.socket) -> None:
        if self._unclaimed.pop(conn, None) is None:
            return  # too late: the accept loop has closed it and counted the refusal
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
        for conn in list(self._unclaimed):  # no thread will claim these now
            if self._unclaimed.pop(conn, None) is not None:
                self.finish(conn, self.stats.queued, "shutdown")
        while self.stats.worker_threads.value and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.worker_threads.value
