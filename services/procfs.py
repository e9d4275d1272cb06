"""The one reader of /proc: CPU time, context switches, memory and threads of a process.

The server reads its own thread count for /metrics; the launcher, the tests and
the bench read their children's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

Pid = int | str  # a process id, or "self"


def cpu_seconds(pid: Pid) -> float:
    """User + system CPU time of a process, all its threads (the ended ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ticks(pid: Pid) -> float:
    """When a process started, in clock ticks since boot: a new value is a new process."""
    return float(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def context_switches(pid: Pid) -> dict[int, int]:
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


def status(pid: Pid) -> dict[str, int]:
    """VmRSS, VmSize (bytes) and Threads of a process."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmSize"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


def thread_count(pid: Pid = "self") -> int | None:
    """Threads the kernel sees (low-level `_thread` ones included); None without /proc."""
    try:
        return status(pid)["Threads"]
    except (OSError, KeyError):
        return None


def pid_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The most tasks (processes and threads) this process's cgroup may hold: `pids.max`
    of cgroup v2, or of v1's pids controller; None where there is no such limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = cgroup_root  # v2: the unified hierarchy
        elif "pids" in controllers.split(","):
            base = cgroup_root / "pids"
        else:
            continue
        # A container usually sees its own cgroup at the mount's root, whatever the path says.
        for directory in (base / path.lstrip("/"), base):
            with contextlib.suppress(OSError, ValueError):
                value = (directory / "pids.max").read_text().strip()
                return None if value == "max" else int(value)
    return None


def listen_overflows() -> int | None:
    """Times an accept queue in this process's network namespace was full and a
    completed handshake was dropped (TcpExt ListenOverflows); None where /proc has no
    such counter. In a container that is the container's own listeners."""
    try:
        lines = Path("/proc/self/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and "ListenOverflows" in names.split():
            return int(values.split()[names.split().index("ListenOverflows")])
    return None
