"""The servers under test, each its own process on a free loopback port.

The models come from `python -m services`; the references are a stdlib asyncio
streams server and a C epoll server compiled here with the machine's cc. All are
started by `harness.launcher` and say where they listen in a ready file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from harness.launcher import ROOT, ServerProcess, launch, services_command

BUILD = ROOT / "build" / "bench"


def compile_c(name: str) -> Path | None:
    """Build bench/NAME.c (the epoll server, the pingpong client); None when no C
    compiler is here."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    BUILD.mkdir(parents=True, exist_ok=True)
    binary = BUILD / name
    source = ROOT / "bench" / f"{name}.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)  # noqa: S603
    return binary


def placement() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(server CPUs, client CPUs): the last CPU for the server, the others for the client,
    so that neither takes the other's CPU; (None, None) on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[-1:]), frozenset(cpus[:-1])


def peer_specs(*, hardened: bool = False) -> dict[str, list[str]]:
    """The echo servers the project did not design, each as a naive user writes it:
    stdlib asyncio streams, uvloop streams and protocol, and C epoll (when a compiler
    is here); with `hardened`, also asyncio with timeouts and a cap (`bench.hardened_echo`)."""
    python = [sys.executable, "-m"]
    specs = {
        "asyncio": [*python, "bench.asyncio_echo", "0"],
        "uvloop-streams": [*python, "bench.uvloop_echo", "streams", "0"],
        "uvloop-protocol": [*python, "bench.uvloop_echo", "protocol", "0"],
    }
    if (c_server := compile_c("epoll_echo")) is not None:
        specs["c-epoll"] = [str(c_server), "0"]
    if hardened:
        specs["asyncio-hardened"] = [*python, "bench.hardened_echo", "0"]
    return specs


def model_command(model: str, *extra: str) -> list[str]:
    return services_command("--model", model, "--port", "0", "--metrics-port", "0", *extra)


@contextlib.contextmanager
def started(specs: dict[str, Sequence[str]]) -> Iterator[dict[str, ServerProcess]]:
    """Launch every command (each honours --ready-file); stop them all on the way out."""
    running: dict[str, ServerProcess] = {}
    try:
        for name, command in specs.items():
            running[name] = launch(command)
        yield running
    finally:
        for server in running.values():
            server.stop()
            server.close()


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Keep every thread of a process to `cpus`; threads it starts later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)
