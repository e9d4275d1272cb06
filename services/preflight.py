"""Checks of this machine's limits against a configuration, before anything starts.

What would otherwise end in a traceback at start-up, or in a crash-and-restart loop
under a supervisor, ends in one line and exit status 2: a thread stack the platform
refuses (glibc on aarch64 wants at least 128 KiB) or cannot start a thread with, a
ready file in a directory that is not there, a pool with more workers than the
pid limit allows threads, or one whose connections, metrics clients and own files do
not fit under the descriptor limit (services.budget).
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass

from services import procfs
from services.budget import METRICS_CLIENTS, OWN_DESCRIPTORS, RESERVED
from services.config import Config, ConfigError

# Besides the workers: main, metrics, watchdog and exit helper threads, and a healthcheck.
RESERVED_TASKS = 8


@dataclass(frozen=True)
class Limits:
    descriptors: int | None  # RLIMIT_NOFILE (soft); None for no limit
    tasks: int | None  # threads the process may have: cgroup pids.max, RLIMIT_NPROC

    @classmethod
    def here(cls) -> Limits:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        tasks = [procfs.pid_limit()]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if os.geteuid() != 0:  # root is not held to RLIMIT_NPROC
            tasks.append(None if nproc == resource.RLIM_INFINITY else nproc)
        known = [limit for limit in tasks if limit is not None]
        return cls(
            descriptors=None if nofile == resource.RLIM_INFINITY else nofile,
            tasks=min(known) if known else None,
        )


def _start_a_thread() -> None:
    thread = threading.Thread(target=lambda: None, name="preflight")
    thread.start()
    thread.join()


def check(
    config: Config,
    limits: Limits | None = None,
    set_stack_size: Callable[[int], int] = threading.stack_size,
    start_thread: Callable[[], None] = _start_a_thread,
) -> None:
    """Raise `ConfigError` (naming the flag) if this machine cannot run `config`."""
    limits = Limits.here() if limits is None else limits
    if config.ready_file:
        _check_ready_file(config.ready_file)
    if not config.bounded and config.stack_size:
        _check_stack_size(config.stack_size, set_stack_size, start_thread)
    if not config.bounded:
        return  # one thread per connection: running out is what this model demonstrates
    needed = config.workers + RESERVED_TASKS
    if limits.tasks is not None and needed > limits.tasks:
        raise ConfigError(
            f"--workers: {config.workers} workers need {needed} threads, over this "
            f"machine's limit of {limits.tasks} (the cgroup's pids.max or ulimit -u)"
        )
    _check_descriptors(config, limits.descriptors)


def _check_descriptors(config: Config, limit: int | None) -> None:
    """Every connection the pool admits (`capacity`), the metrics endpoint's clients and
    the server's own files fit under the descriptor limit (services.budget)."""
    connections = config.capacity or 0
    needed = connections + RESERVED
    if limit is None or needed <= limit:
        return
    if config.ready_dispatch:
        flag, what = "--max-connections", f"{connections} connections"
    else:
        flag, what = "--workers", f"{config.workers} workers and {config.queue_size} waiting"
    raise ConfigError(
        f"{flag}: {what} need {needed} file descriptors with the {METRICS_CLIENTS} metrics "
        f"clients and {OWN_DESCRIPTORS} of the server's own, over this process's limit of "
        f"{limit} (ulimit -n)"
    )


def _check_stack_size(
    size: int, set_stack_size: Callable[[int], int], start_thread: Callable[[], None]
) -> None:
    """Set the size, start one thread with it, then put the old size back."""
    try:
        previous = set_stack_size(size)
    except ValueError:
        raise ConfigError(
            f"--stack-size: {size} bytes is below this platform's minimum thread stack"
        ) from None
    try:
        start_thread()
    except RuntimeError as error:  # "can't start new thread": no room for such a stack
        raise ConfigError(
            f"--stack-size: no thread with a stack of {size} bytes could start here ({error})"
        ) from None
    finally:
        set_stack_size(previous)


def _check_ready_file(path: str) -> None:
    """Before any port is bound: a ready file that cannot be written fails at once."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"--ready-file: there is no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"--ready-file: cannot write in {directory}")
