"""What `make bench` prints: each server's medians, and its ratios to the references."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import locks, memory

REFERENCES = ("uvloop-streams", "c-epoll")  # the rate ratio columns
PROTOCOL = "uvloop-protocol"  # the CPU ratio column of the peer client's table
BASELINE = "@base"  # the suffix of a server run from the baseline checkout


def format_ab(data: dict[str, Any]) -> str:
    """Each server against its baseline: medians (min-max) of the per-round ratios."""
    lines = []
    for key, per_server in data["configs"].items():
        lines.append(f"\n{key}: this checkout / baseline, per round")
        lines.append(f"  {'server':<26}{'req/s':<20}{'CPU us each':<20}{'p99':<20}")
        for server in per_server:
            if server.endswith(BASELINE) or server + BASELINE not in per_server:
                continue
            cells = [
                ratio_cell(per_server, server, server + BASELINE, field)
                for field in ("rate", "server_cpu_us", "p99_ms")
            ]
            lines.append(f"  {server:<26}{cells[0]:<20}{cells[1]:<20}{cells[2]:<20}")
    return "\n".join(lines)


def ratios(
    per_round: dict[str, list[dict[str, float]]], server: str, reference: str, field: str = "rate"
) -> tuple[float, float, float] | None:
    """Median, min and max of server/reference over the rounds (each round pairs up)."""
    if reference not in per_round:
        return None
    values = [
        a[field] / b[field]
        for a, b in zip(per_round[server], per_round[reference], strict=True)
        if b[field]
    ]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def ratio_cell(
    per_round: dict[str, list[dict[str, float]]], server: str, reference: str, field: str = "rate"
) -> str:
    """`ratios` as a table's cell: "median x (min-max)", or "-" without the reference."""
    r = ratios(per_round, server, reference, field)
    return f"{r[0]:5.2f}x ({r[1]:.2f}-{r[2]:.2f})" if r else "-"


def cpus_text(cpus: list[int]) -> str:
    return ",".join(map(str, cpus)) or "any"


def median(rows: list[dict[str, float]], field: str) -> float:
    return statistics.median(row[field] for row in rows)


def format_throughput(data: dict[str, Any]) -> str:
    lines = []
    for key, per_server in data["configs"].items():
        lines.append(f"\n{key}")
        lines.append(
            f"  {'server':<26}{'req/s':>9}{'unstalled':>11}{'CPU us':>8}{'switch':>8}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'p999 ms':>9}   {'vs uvloop streams':<20}{'vs C epoll':<20}"
        )
        for server, rows in per_server.items():
            cells = [ratio_cell(per_server, server, reference) for reference in REFERENCES]
            rate, unstalled = median(rows, "rate"), median(rows, "unstalled_rate")
            cpu = median(rows, "server_cpu_us")
            switched = [r["switches_per_request"] for r in rows if "switches_per_request" in r]
            lines.append(
                f"  {server:<26}{rate:>9.0f}{unstalled:>11.0f}{cpu:>8.1f}"
                f"{f'{statistics.median(switched):.2f}' if switched else '-':>8}"
                f"{median(rows, 'p50_ms'):>8.2f}{median(rows, 'p99_ms'):>8.2f}"
                f"{median(rows, 'p999_ms'):>9.2f}   {cells[0]:<20}{cells[1]:<20}"
            )
        if fastest := per_server.get("c-epoll"):
            lines.append(client_ceiling(fastest, data["client_processes"]))
    return "\n".join(lines)


def client_ceiling(rows: list[dict[str, float]], processes: int, unit: str = "process(es)") -> str:
    """What the client could drive at most, from its own CPU time per round trip, against
    what the fastest server got out of it: a client near its ceiling measures itself."""
    client_us = median(rows, "client_cpu_us")
    ceiling = processes * 1e6 / client_us if client_us else float("inf")
    return (
        f"  client: {client_us:.1f} us CPU per round trip against c-epoll, so at most"
        f" {ceiling:.0f} round trips/s on {processes} {unit}:"
        f" {ceiling / median(rows, 'rate'):.1f}x what the C server took"
    )


def format_memory(costs: list[memory.IdleCost], capacities: list[memory.Capacity]) -> str:
    lines = [
        f"\n  {'server':<17}{'conns':>7}{'threads':>15}{'RSS growth':>12}{'RSS/conn':>10}"
        f"{'VSZ/conn':>11}"
    ]
    for c in costs:
        lines.append(
            f"  {c.server:<17}{c.connections:>7}{c.threads_before:>7} ->{c.threads_after:>5}"
            f"{c.rss_growth_mb:>9.1f} MB{c.rss_per_connection_kb:>7.1f} KB"
            f"{c.vsz_per_connection_kb / 1024:>8.2f} MB"
        )
    lines.append(f"\n  threads model under RLIMIT_AS (start-up + {capacities[0].budget_mb} MiB):")
    for cap in capacities:
        lines.append(
            f"    stack {cap.stack:<16} holds {cap.held:>5} connections "
            f"(threads refused: {cap.refused})"
        )
    if len(capacities) == 2 and capacities[1].held:
        lines.append(
            f"    64 KiB stacks hold {capacities[0].held / capacities[1].held:.1f}x "
            "as many connections"
        )
    return "\n".join(lines)


def format_locks(results: list[locks.LockResult]) -> str:
    lines = [f"\n  {'strategy':<22}{'threads':>8}{'ops/s':>12}{'lost updates':>14}"]
    for r in results:
        lines.append(f"  {r.strategy:<22}{r.threads:>8}{r.ops_per_second:>12.0f}{r.lost:>14}")
    return "\n".join(lines)


def write_chart(data: dict[str, Any], costs: list[memory.IdleCost], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (slow to import; only for the chart)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(data["configs"])
    servers = data["servers"]
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        values = [median(data["configs"][k][server], "unstalled_rate") for k in keys]
        left.bar([k + i * width for k in range(len(keys))], values, width, label=server)
    labels = [k.replace(" x ", "\nx ").replace(", ", "\n") for k in keys]
    left.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], labels, fontsize=8)
    left.set_ylabel("round trips/s (unstalled, median)")
    left.legend(fontsize=8)
    left.set_title("throughput")
    right.bar([c.server for c in costs], [c.rss_per_connection_kb for c in costs])
    right.set_ylabel("RSS per idle connection (KB)")
    right.set_title("memory")
    right.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def format_peer(data: dict[str, Any]) -> str:
    """The peer client's rates and server CPU, as ratios to the references' in each round."""
    lines = []
    for key, per_server in data["peer_client"].items():
        messages = next(iter(per_server.values()))[0]["messages"]
        lines.append(f"\n{key}, the peer client (uvloop's echoclient, {messages} messages a run)")
        lines.append(
            f"  {'server':<26}{'req/s':>9}{'CPU us':>8}{'client':>8}   {'vs uvloop streams':<20}"
            f"{'vs C epoll':<20}{'CPU vs uvloop protocol':<20}"
        )
        for server, rows in per_server.items():
            cells = [ratio_cell(per_server, server, reference) for reference in REFERENCES]
            cells.append(ratio_cell(per_server, server, PROTOCOL, "server_cpu_us"))
            lines.append(
                f"  {server:<26}{median(rows, 'rate'):>9.0f}{median(rows, 'server_cpu_us'):>8.1f}"
                f"{median(rows, 'client_cpu_us'):>8.1f}   "
                f"{cells[0]:<20}{cells[1]:<20}{cells[2]:<20}"
            )
        if fastest := per_server.get("c-epoll"):
            lines.append(client_ceiling(fastest, len(data["client_cpus"]) or 1, unit="CPU(s)"))
    return "\n".join(lines)
