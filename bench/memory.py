"""What an idle connection costs each model, and how many the threads model holds under
an address-space limit with small versus default stacks."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from bench.servers import model_command
from harness.launcher import UNDER_AS_LIMIT, launch, services_command
from harness.scrape import metric, scrape
from services.models import MODELS
from services.procfs import status


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
    last, stable_since = status(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < seconds:
        time.sleep(0.1)
        now = status(pid)
        if now["Threads"] != last["Threads"]:
            stable_since = time.monotonic()
        last = now
    return last


def idle_cost(name: str, command: list[str], connections: int) -> IdleCost:
    with launch(command) as server:
        before = _settle(server.pid)
        socks = _open(server.address, connections)
        try:
            after = _settle(server.pid)
        finally:
            for sock in socks:
                sock.close()
        server.stop()
        return IdleCost(
            server=name,
            connections=len(socks),
            threads_before=before["Threads"],
            threads_after=after["Threads"],
            rss_growth_mb=(after["VmRSS"] - before["VmRSS"]) / 2**20,
            vsz_growth_mb=(after["VmSize"] - before["VmSize"]) / 2**20,
        )


def idle_costs(connections: int, bounded_connections: int) -> list[IdleCost]:
    """Every model; the unbounded ones with a small and the default stack, and as many
    connections as `connections` (the bounded ones close what they cannot admit)."""
    runs: dict[str, tuple[list[str], int]] = {}
    for spec in MODELS.values():
        if spec.bounded:
            runs[spec.name] = (model_command(spec.name), bounded_connections)
            continue
        for label, stack in (("64 KiB", "65536"), ("default", "0")):
            command = model_command(spec.name, "--stack-size", stack)
            runs[f"{spec.name} {label}"] = (command, connections)
    return [idle_cost(name, command, count) for name, (command, count) in runs.items()]


def capacity(model: str, stack_size: int, budget_mb: int, attempts: int) -> Capacity:
    """Open connections in batches until the server refuses threads (or `attempts` run out)."""
    command = services_command(
        str(budget_mb),
        *model_command(model, "--stack-size", str(stack_size))[3:],
        code=UNDER_AS_LIMIT,
    )
    held = refused = 0
    socks: list[socket.socket] = []
    with launch(command) as server:
        metrics = server.metrics_address
        try:
            while len(socks) < attempts and not refused:
                socks += _open(server.address, 50)
                _settle(server.pid, 0.3)
                try:
                    scraped = scrape(metrics)
                except OSError:
                    continue
                held = max(held, int(metric(scraped, "echo_connections_active")))
                refused = int(metric(scraped, "echo_thread_start_failures_total"))
        finally:
            for sock in socks:
                sock.close()
    label = "default (8 MiB)" if stack_size == 0 else f"{stack_size // 1024} KiB"
    return Capacity(label, budget_mb, held, refused)
