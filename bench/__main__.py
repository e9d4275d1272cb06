"""`make bench`: throughput, latency and memory of each threading model, as ratios from one run.

    python -m bench [--quick] [--rounds N] [--seconds S] [--json PATH] [--chart PATH]
    python -m bench --baseline DIR   (A/B: the pools of another checkout beside these)

Absolute numbers on a shared, oversubscribed machine swing 5-30x between runs,
so every server is measured in the same run, interleaved (A B C A B C ...,
rotated each round), and each is reported as the median of its per-round
ratios to the references, with the spread (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import burst, client, locks, memory
from bench.servers import compile_c, model_command, peer_specs, pin, placement, started
from harness.launcher import ServerProcess
from services.models import MODELS
from services.procfs import context_switches as switches
from services.procfs import cpu_seconds

# Pools sized to the largest connection count, so nothing is turned away: the bench
# measures what serving a connection costs, not admission control.
POOL = ("--workers", "256", "--queue-size", "64", "--idle-timeout", "30", "--send-timeout", "30")


def throughput(
    configs: list[tuple[int, int, bool]],
    rounds: int,
    seconds: float,
    processes: int | None,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """Each (connections, size, pinned) configuration, every server, interleaved rounds.

    Pinned: every server on the same one CPU and the client on the others, so that they
    do not compete and every server gets the same CPU. Unpinned: all of them anywhere.
    With a `baseline` checkout: its pools beside these, and no references (`ab_specs`).
    """
    c_client = compile_c("pingpong")
    specs = ab_specs(baseline) if baseline is not None else server_specs(full=len(configs) > 1)
    server_cpus, client_cpus = placement()
    everywhere = frozenset(os.sched_getaffinity(0))
    processes = processes or len(client_cpus or everywhere)
    names = list(specs)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}

    def measure(
        name: str, server: ServerProcess, setup: tuple[int, int, bool], duration: float
    ) -> dict[str, float]:
        connections, size, pinned = setup
        pin(server.process.pid, server_cpus if pinned and server_cpus else everywhere)
        before, switches_before = cpu_seconds(server.process.pid), switches(server.process.pid)
        result = client.run(
            server.address,
            connections=connections,
            size=size,
            duration=duration,
            processes=processes,
            binary=c_client,
            cpus=client_cpus if pinned else None,
        )
        used = cpu_seconds(server.process.pid) - before
        switched = sum(
            count - switches_before.get(tid, 0)
            for tid, count in switches(server.process.pid).items()
        )
        completions = max(result.completions, 1)
        row = asdict(result) | {"server_cpu_us": 1e6 * used / completions}
        # The threads model's threads end with their connections and take their counts
        # with them: no number rather than a wrong one.
        if name not in MODELS or MODELS[name].bounded:
            row["switches_per_request"] = switched / completions
        return row

    with started(specs) as servers:
        for name in names:  # warm-up, not recorded: first connections, caches, lazy pools
            measure(name, servers[name], configs[0], 0.5)
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for connections, size, pinned in configs:
                key = config_name(connections, size, pinned and server_cpus is not None)
                for name in order:
                    row = measure(name, servers[name], (connections, size, pinned), seconds)
                    results.setdefault(key, {}).setdefault(name, []).append(row)
                    print(
                        f"  round {round_ + 1}/{rounds} {key:<30} {name:<9} "
                        f"{row['rate']:9.0f} req/s ({row['unstalled_rate']:9.0f} unstalled, "
                        f"{row['server_cpu_us']:6.1f} us server CPU each)",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "configs": results,
        "servers": names,
        "c_baseline": "c-epoll" in names,
        "client": "c-epoll" if c_client else "python",
        "client_processes": processes,
        "server_cpus": sorted(server_cpus or []),
        "client_cpus": sorted(client_cpus or []),
    }


REFERENCES = ("uvloop-streams", "c-epoll")  # the ratio columns


def server_specs(full: bool) -> dict[str, Sequence[str]]:
    """Every model in every dispatch mode, pools of 256; in a full run also the pools with
    the containers' 32 workers (does parking serve 256 connections with 32?); and the
    references: stdlib asyncio, uvloop streams and protocol, and C."""
    specs: dict[str, Sequence[str]] = {}
    for spec in MODELS.values():
        for mode in spec.dispatch_modes:
            name = spec.name if len(spec.dispatch_modes) == 1 else f"{spec.name}/{mode}"
            specs[name] = model_command(spec.name, "--dispatch", mode, *POOL)
        if "ready" in spec.dispatch_modes:  # what lingering is worth, in the same rounds
            specs[f"{spec.name}/ready/no-linger"] = model_command(
                spec.name, "--dispatch", "ready", *POOL, "--linger", "0"
            )
        if full and "ready" in spec.dispatch_modes:
            small = (*POOL, "--workers", "32")  # the last --workers wins
            specs[f"{spec.name}/ready/32w"] = model_command(
                spec.name, "--dispatch", "ready", *small
            )
    return {**specs, **peer_specs()}


BASELINE = "@base"  # the suffix of a server run from the baseline checkout
# `python -c` with the checkout first on the path: its `services`, not this one's.
_FROM_CHECKOUT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from services.app import main; sys.exit(main(sys.argv[1:]))"
)


def ab_specs(baseline: Path) -> dict[str, Sequence[str]]:
    """The bounded models in every dispatch mode (and ready without lingering), each
    twice: from this checkout, and from `baseline` (NAME@base), for an A/B in one run."""
    if not (baseline / "services" / "app.py").is_file():
        raise SystemExit(f"python -m bench: error: --baseline {baseline}: not a checkout")
    specs: dict[str, Sequence[str]] = {}
    for name, command in server_specs(full=False).items():
        model = name.partition("/")[0]
        if model not in MODELS or not MODELS[model].bounded:
            continue
        args = command[command.index("services") + 1 :]
        specs[name] = command
        specs[name + BASELINE] = [sys.executable, "-c", _FROM_CHECKOUT, str(baseline), *args]
    return specs


def format_ab(data: dict[str, Any]) -> str:
    """Each server against its baseline: medians (min-max) of the per-round ratios."""
    lines = []
    for key, per_server in data["configs"].items():
        lines.append(f"\n{key}: this checkout / baseline, per round")
        lines.append(f"  {'server':<26}{'req/s':<20}{'CPU us each':<20}{'p99':<20}")
        for server in per_server:
            if server.endswith(BASELINE) or server + BASELINE not in per_server:
                continue
            cells = []
            for field in ("rate", "server_cpu_us", "p99_ms"):
                r = ratios(per_server, server, server + BASELINE, field)
                cells.append(f"{r[0]:5.2f}x ({r[1]:.2f}-{r[2]:.2f})" if r else "-")
            lines.append(f"  {server:<26}{cells[0]:<20}{cells[1]:<20}{cells[2]:<20}")
    return "\n".join(lines)


def config_name(connections: int, size: int, pinned: bool) -> str:
    return f"{connections} conn x {size // 1024} KiB" + ("" if pinned else ", unpinned")


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


def _cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus)) or "any"


def _median(rows: list[dict[str, float]], field: str) -> float:
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
            cells = []
            for reference in REFERENCES:
                r = ratios(per_server, server, reference)
                cells.append(f"{r[0]:5.2f}x ({r[1]:.2f}-{r[2]:.2f})" if r else "-")
            rate, unstalled = _median(rows, "rate"), _median(rows, "unstalled_rate")
            cpu = _median(rows, "server_cpu_us")
            switched = [r["switches_per_request"] for r in rows if "switches_per_request" in r]
            lines.append(
                f"  {server:<26}{rate:>9.0f}{unstalled:>11.0f}{cpu:>8.1f}"
                f"{f'{statistics.median(switched):.2f}' if switched else '-':>8}"
                f"{_median(rows, 'p50_ms'):>8.2f}{_median(rows, 'p99_ms'):>8.2f}"
                f"{_median(rows, 'p999_ms'):>9.2f}   {cells[0]:<20}{cells[1]:<20}"
            )
        if fastest := per_server.get("c-epoll"):
            lines.append(client_ceiling(fastest, data["client_processes"]))
    return "\n".join(lines)


def client_ceiling(rows: list[dict[str, float]], processes: int) -> str:
    """What the client could drive at most, from its own CPU time per round trip, against
    what the fastest server got out of it: a client near its ceiling measures itself."""
    client_us = _median(rows, "client_cpu_us")
    ceiling = processes * 1e6 / client_us if client_us else float("inf")
    return (
        f"  client: {client_us:.1f} us CPU per round trip against c-epoll, so at most"
        f" {ceiling:.0f} round trips/s on {processes} process(es):"
        f" {ceiling / _median(rows, 'rate'):.1f}x what the C server took"
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
        values = [_median(data["configs"][k][server], "unstalled_rate") for k in keys]
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


def stack_capacities(quick: bool) -> list[memory.Capacity]:
    """The first unbounded model under an address-space limit, small stacks vs default."""
    unbounded = next(spec.name for spec in MODELS.values() if not spec.bounded)
    budget, attempts = (128, 1500) if quick else (256, 5000)
    return [memory.capacity(unbounded, stack, budget, attempts) for stack in (65536, 0)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (CI): one config")
    parser.add_argument("--rounds", type=int, help="interleaved rounds [5, quick 3]")
    parser.add_argument("--seconds", type=float, help="seconds per measurement [2, quick 1]")
    parser.add_argument("--processes", type=int, help="client processes [one per client CPU]")
    parser.add_argument("--json", type=Path, default=Path("reports/bench.json"))
    parser.add_argument("--chart", type=Path, default=Path("reports/bench.png"))
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit (git worktree add DIR REV): an A/B of the pools "
        "at 32 and 256 x 1 KiB, interleaved in the same rounds; throughput only",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.baseline is not None:
        return ab_main(args.baseline, args.rounds or 5, args.seconds or 2.0, args.processes)
    # Many short rounds rather than a few long ones: this machine's speed drifts over
    # seconds, and a median over more interleaved pairs sees through more of it.
    rounds = args.rounds or (3 if quick else 5)
    seconds = args.seconds or (1.0 if quick else 2.0)
    configs = [(32, 1024, True)]
    if not quick:
        configs += [(256, 1024, True), (32, 65536, True), (256, 65536, True), (32, 1024, False)]
    started_at = time.monotonic()

    print("== throughput and latency (ping-pong, loopback)", file=sys.stderr)
    data = throughput(configs, rounds, seconds, args.processes)
    print("== memory per idle connection", file=sys.stderr)
    costs = memory.idle_costs(300 if quick else 2000, 1000 if quick else 10_000)
    capacities = stack_capacities(quick)
    print("== counters", file=sys.stderr)
    lock_results = locks.run(100_000 if quick else 400_000)
    print("== executor wake-up on a burst", file=sys.stderr)
    burst_result = burst.run(rounds)

    print(
        f"\n== echo cluster bench ({'quick' if quick else 'full'}: {rounds} rounds x {seconds:g} s;"
        f" client: {data['client']} x {data['client_processes']} on CPUs"
        f" {_cpus(data['client_cpus'])}; servers pinned to CPU {_cpus(data['server_cpus'])})"
    )
    print(format_throughput(data))
    print(format_memory(costs, capacities))
    print(format_locks(lock_results))
    print(burst.format_burst(burst_result))
    report = {
        "quick": quick,
        "rounds": rounds,
        "seconds": seconds,
        "throughput": data,
        "idle_costs": [
            asdict(c)
            | {
                "rss_per_connection_kb": c.rss_per_connection_kb,
                "vsz_per_connection_kb": c.vsz_per_connection_kb,
            }
            for c in costs
        ],
        "capacity_under_as_limit": [asdict(c) for c in capacities],
        "locks": [asdict(r) | {"lost": r.lost} for r in lock_results],
        "burst": asdict(burst_result) | {"ratios": burst_result.ratios},
        "elapsed_seconds": time.monotonic() - started_at,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    write_chart(data, costs, args.chart)
    print(f"\nwrote {args.json} and {args.chart} in {time.monotonic() - started_at:.0f} s")
    return 0


def ab_main(baseline: Path, rounds: int, seconds: float, processes: int | None) -> int:
    started_at = time.monotonic()
    configs = [(32, 1024, True), (256, 1024, True)]
    print(f"== A/B against {baseline} (ping-pong, loopback)", file=sys.stderr)
    data = throughput(configs, rounds, seconds, processes, baseline=baseline.resolve())
    print(f"\n== echo cluster A/B ({rounds} rounds x {seconds:g} s) against {baseline}")
    print(format_throughput(data))
    print(format_ab(data))
    print(f"\nin {time.monotonic() - started_at:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
