"""What an idle connection costs each model, and how many the threads model holds under
an address-space limit with small versus default stacks."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass

from bench.servers import model_command, proc_status, start, stop
from loadtest.observe import Sampler

# Run the server under RLIMIT_AS = what it maps at start-up + a budget (MiB, argv[1]).
UNDER_AS_LIMIT = """
import resource, sys
from pathlib import Path
from services.app import main
mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@dataclass(frozen=True)
class IdleCost:
    server: str
    connections: int
    threads_before: int
    threads_after: int
    rss_growth_mb: float
    vsz_growth_mb: float

    @property
    def rss_per_connection_kb(self) -> float:
        return self.rss_growth_mb * 1024 / self.connections

    @property
    def vsz_per_connection_kb(self) -> float:
        return self.vsz_growth_mb * 1024 / self.connections


@dataclass(frozen=True)
class Capacity:
    stack: str
    budget_mb: int
    held: int  # peak connection threads alive at once
    refused: int


def _open(address: tuple[str, int], count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(30)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            break
        socks.append(sock)
    return socks


def _settle(pid: int, seconds: float = 1.5) -> dict[str, int]:
    """Wait until the thread count stops changing (or `seconds`), then read /proc."""
    deadline = time.monotonic() + 15
    last, stable_since = proc_status(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < seconds:
        time.sleep(0.1)
        now = proc_status(pid)
        if now["Threads"] != last["Threads"]:
            stable_since = time.monotonic()
        last = now
    return last


def idle_cost(name: str, command: list[str], connections: int) -> IdleCost:
    server = start(name, command)
    try:
        before = _settle(server.process.pid)
        socks = _open(server.address, connections)
        try:
            after = _settle(server.process.pid)
        finally:
            for sock in socks:
                sock.close()
        return IdleCost(
            server=name,
            connections=len(socks),
            threads_before=before["Threads"],
            threads_after=after["Threads"],
            rss_growth_mb=(after["VmRSS"] - before["VmRSS"]) / 2**20,
            vsz_growth_mb=(after["VmSize"] - before["VmSize"]) / 2**20,
        )
    finally:
        stop(server)


def idle_costs(connections: int, bounded_connections: int) -> list[IdleCost]:
    models = {
        "executor": (model_command("executor"), bounded_connections),
        "queue": (model_command("queue"), bounded_connections),
        "threads 64 KiB": (model_command("threads", "--stack-size", "65536"), connections),
        "threads default": (model_command("threads", "--stack-size", "0"), connections),
    }
    return [idle_cost(name, command, count) for name, (command, count) in models.items()]


def capacity(stack_size: int, budget_mb: int, attempts: int) -> Capacity:
    """Open connections in batches until the server refuses threads (or `attempts` run out)."""
    command = [
        sys.executable,
        "-c",
        UNDER_AS_LIMIT,
        str(budget_mb),
        *model_command("threads", "--stack-size", str(stack_size))[3:],
    ]
    server = start(f"threads-as-{stack_size}", command)
    sampler = Sampler(("127.0.0.1", server.metrics_port or 0), time.monotonic())
    held = refused = 0
    socks: list[socket.socket] = []
    try:
        while len(socks) < attempts and not refused:
            socks += _open(server.address, 50)
            _settle(server.process.pid, 0.3)
            sample = sampler.scrape_once()
            if sample.ok:
                held = max(held, int(sample.values.get("active", 0)))
                refused = int(sample.values.get("thread_start_failures", 0))
        label = "default (8 MiB)" if stack_size == 0 else f"{stack_size // 1024} KiB"
        return Capacity(label, budget_mb, held, refused)
    finally:
        for sock in socks:
            sock.close()
        stop(server)
