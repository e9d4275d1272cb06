"""The peer client: uvloop's examples/bench/echoclient.py, a client no one here wrote.

`make bench` drives the servers with it as well as with its own client, so that every
rate ratio is also measured by someone else's code (where the copy comes from, its
licence and checksum: bench/peer/README.md). It reports a rate only: no latencies.

The script submits one job per connection to a process pool and never asks for their
results, so a connection the server dropped would go unseen and its unsent messages
would still be counted in the rate. `python -m bench.peer_client ARGS` runs the script
unchanged (`runpy`), with a pool that, on the way out, asks every job for its result:
a failed connection fails the run.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import resource
import runpy
import signal
import subprocess
import sys
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

SCRIPT = Path(__file__).resolve().parent / "peer" / "uvloop_echoclient.py"
_RATE = re.compile(r"^(\d+) in ([0-9.e+-]+)$", re.MULTILINE)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class PeerResult:
    messages: int  # round trips, all connections together
    seconds: float  # the script's own wall time, its processes' start-up included
    rate: float
    client_cpu_us: float  # the script and its processes, per round trip


class PeerClientError(RuntimeError):
    """The peer client failed, or a connection of it did."""


def run(
    address: tuple[str, int],
    *,
    connections: int,
    size: int,
    messages: int,
    timeout: float,
    cpus: Set[int] | None = None,
) -> PeerResult:
    """`connections` processes, each sending `messages` messages of `size` bytes in turn."""
    command = [
        sys.executable,
        "-m",
        "bench.peer_client",
        f"--addr={address[0]}:{address[1]}",
        f"--workers={connections}",
        f"--msize={size}",
        f"--num={messages}",
    ]
    before = _children_cpu()
    process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=SCRIPT.parents[2],
        start_new_session=True,  # one group: a timeout ends its worker processes too
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # noqa: PLW1509
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:  # the timeout, or the bench stopped (SIGTERM, Ctrl-C)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            raise PeerClientError(f"the peer client took over {timeout:g} s") from None
        raise
    if process.returncode != 0:
        raise PeerClientError(f"the peer client exited with {process.returncode}: {stderr[-500:]}")
    match = _RATE.search(stdout)
    if match is None:
        raise PeerClientError(f"the peer client printed no rate: {stdout[-500:]}")
    total, seconds = int(match[1]), float(match[2])
    return PeerResult(
        messages=total,
        seconds=seconds,
        rate=total / seconds,
        client_cpu_us=1e6 * (_children_cpu() - before) / max(total, 1),
    )


def _children_cpu() -> float:
    """CPU seconds of the children waited for, theirs included (the pool waits for its)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _CheckedPool(concurrent.futures.ProcessPoolExecutor):
    """The script's pool, but leaving it re-raises the first job's failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: list[concurrent.futures.Future[Any]] = []

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        job = super().submit(fn, *args, **kwargs)
        self._jobs.append(job)
        return job

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> bool | None:
        handled = super().__exit__(kind, error, trace)
        for job in self._jobs:
            # The script ends a cut connection with a bare SystemExit (status 0): any
            # failure, that one included, becomes an exit with a message.
            try:
                job.result()
            except BaseException as failure:  # SystemExit among them
                raise SystemExit(f"peer client: a connection failed: {failure!r}") from None
        return handled


def main(argv: list[str]) -> None:
    concurrent.futures.ProcessPoolExecutor = _CheckedPool  # type: ignore[misc]
    sys.argv = [str(SCRIPT), *argv]
    runpy.run_path(str(SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
