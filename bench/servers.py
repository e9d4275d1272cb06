"""The servers under test, each its own process on a free loopback port.

The three models come from `python -m services`; the references are a stdlib
asyncio streams server and a C epoll server compiled here with the machine's cc.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
_READY_MODEL = re.compile(r"ready model=\w+ echo=[\d.]+:(\d+) metrics=[\d.]+:(\d+)")
_READY_PLAIN = re.compile(r"ready (\d+)")


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


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


def model_command(model: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services",
        "--model",
        model,
        "--port",
        "0",
        "--metrics-port",
        "0",
        *extra,
    ]


def start(name: str, command: Sequence[str], timeout: float = 60.0) -> Running:
    log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (our own commands)
            list(command), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if match := _READY_MODEL.search(text):
            return Running(name, process, int(match[1]), int(match[2]), log)
        if match := _READY_PLAIN.search(text):
            return Running(name, process, int(match[1]), None, log)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def stop(server: Running) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    server.log.unlink(missing_ok=True)


@contextlib.contextmanager
def started(specs: dict[str, Sequence[str]]) -> Iterator[dict[str, Running]]:
    running: dict[str, Running] = {}
    try:
        for name, command in specs.items():
            running[name] = start(name, command)
        yield running
    finally:
        for server in running.values():
            stop(server)


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Keep every thread of a process to `cpus`; threads it starts later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (the ended ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> dict[int, int]:
    """Context switches (voluntary and not) of each live thread of a process, by thread id.
    A thread that has ended is not counted: /proc has no total for a whole process."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            status = (task / "status").read_text()
            counts[int(task.name)] = sum(
                int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
            )
    return counts


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmSize (bytes) and Threads of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmSize"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values
