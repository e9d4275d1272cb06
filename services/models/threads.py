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
`CLAIM_DEADLINE` is taken back by the event loop, closed and counted as a
thread that could not start. Whoever pops it first owns it; a thread that
starts later finds nothing and ends.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import threading
import time

from services.base import Server
from services.config import Config
from services.dispatch import ConnectionDispatch, Dispatch, Job
from services.logs import RateLimitedLog
from services.states import Closed, Rejected
from services.stats import retrying

log = logging.getLogger("echo.threads")

CLAIM_DEADLINE = 5.0  # seconds a new thread has to claim its connection


class ThreadPerConnectionServer(Server):
    def __init__(self, config: Config) -> None:
        self._previous_stack_size = 0  # the stack size is process-wide: put it back on stop
        self._refusals = RateLimitedLog(log)
        # Connections handed to a thread that has not started yet, and by when it must.
        self._unclaimed: dict[Job, float] = {}
        super().__init__(config)
        self.loop.after_each_wait(self._take_back_unclaimed)

    def build_dispatch(self) -> Dispatch:
        return ConnectionDispatch(
            self.config, self.stats, self.ledger, self._start_thread, queue_capacity=0
        )

    def start_workers(self) -> None:
        self._previous_stack_size = threading.stack_size(self.config.stack_size)

    def _start_thread(self, job: Job) -> None:
        self._unclaimed[job] = time.monotonic() + CLAIM_DEADLINE
        try:
            _thread.start_new_thread(self._run, (job,))
        except (RuntimeError, MemoryError) as error:  # out of threads or address space
            if self._unclaimed.pop(job, None) is not None:
                self._refuse(job, error)

    def _refuse(self, job: Job, error: BaseException | str) -> None:
        job.refuse(Rejected.THREAD_START_FAILED)  # first: it never raises
        with contextlib.suppress(MemoryError):
            retrying(self.stats.thread_start_failures.incr)
        self._refusals.warning("cannot start a thread for a new connection: %s", error)

    def _take_back_unclaimed(self, now: float) -> None:
        for job, deadline in list(self._unclaimed.items()):
            if deadline <= now and self._unclaimed.pop(job, None) is not None:
                self._refuse(job, f"its thread did not start in {CLAIM_DEADLINE:g} s")

    def _run(self, job: Job) -> None:
        if self._unclaimed.pop(job, None) is None:
            return  # too late: the loop has closed it and counted the refusal
        try:
            retrying(self.stats.worker_threads.incr)
        except MemoryError:  # the thread runs but cannot be counted: close and count that
            job.close(Closed.ERROR)
            return
        try:
            job()  # never raises
        finally:
            retrying(self.stats.worker_threads.decr)

    def stop_workers(self, deadline: float) -> bool:
        threading.stack_size(self._previous_stack_size)
        for job in list(self._unclaimed):  # no thread will claim these now
            if self._unclaimed.pop(job, None) is not None:
                job.close(Closed.SHUTDOWN)
        while self.stats.worker_threads.value and time.monotonic() < deadline:
            self.wait_stopped(0.05)
        return not self.stats.worker_threads.value
