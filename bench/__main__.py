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
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import burst, client, locks, memory, peer_client, report
from bench.report import BASELINE
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
    *,
    baseline: Path | None = None,
    peer: Collection[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Each (connections, size, pinned) configuration, every server, interleaved rounds.

    Pinned: every server on the same one CPU and the client on the others, so that they
    do not compete and every server gets the same CPU. Unpinned: all of them anywhere.
    With a `baseline` checkout: its pools beside these, and no references (`ab_specs`).
    Then, for each pinned (connections, size) in `peer`, the peer client's rounds.
    """
    c_client = compile_c("pingpong")
    specs = ab_specs(baseline) if baseline is not None else server_specs(full=len(configs) > 1)
    server_cpus, client_cpus = placement()
    everywhere = frozenset(os.sched_getaffinity(0))
    processes = processes or len(client_cpus or everywhere)
    names = list(specs)

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

    setups = {
        config_name(n, size, pinned and server_cpus is not None): (n, size, pinned)
        for n, size, pinned in configs
    }
    with started(specs) as servers:
        for name in names:  # warm-up, not recorded: first connections, caches, lazy pools
            measure(name, servers[name], configs[0], 0.5)
        results = interleaved(
            names,
            rounds,
            setups,
            lambda name, setup: measure(name, servers[name], setup, seconds),
            lambda row: (
                f"{row['rate']:9.0f} req/s ({row['unstalled_rate']:9.0f} unstalled, "
                f"{row['server_cpu_us']:6.1f} us server CPU each)"
            ),
        )
        peer_results: Rounds = {}
        if peer:
            peer_setups = {k: v for k, v in setups.items() if (v[0], v[1]) in peer and v[2]}
            peer_results = peer_rounds(
                servers,
                names,
                peer_setups,
                rounds=min(rounds, PEER_ROUNDS),
                seconds=seconds,
                own=results,
            )
    return {
        "configs": results,
        "peer_client": peer_results,
        "servers": names,
        "c_baseline": "c-epoll" in names,
        "client": "c-epoll" if c_client else "python",
        "client_processes": processes,
        "server_cpus": sorted(server_cpus or []),
        "client_cpus": sorted(client_cpus or []),
    }


Row = dict[str, float]
Rounds = dict[str, dict[str, list[Row]]]  # configuration -> server -> a row per round
Setup = tuple[int, int, bool]  # connections, message size, pinned


def interleaved(
    names: list[str],
    rounds: int,
    setups: dict[str, Setup],
    measure: Callable[[str, Setup], Row],
    describe: Callable[[Row], str],
) -> Rounds:
    """Every setup for every server, round after round, the servers' order rotated each
    round so that none is always first after another."""
    results: Rounds = {}
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for key, setup in setups.items():
            for name in order:
                row = measure(name, setup)
                results.setdefault(key, {}).setdefault(name, []).append(row)
                print(
                    f"  round {round_ + 1}/{rounds} {key:<30} {name:<9} {describe(row)}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# The peer client starts a process per connection, so its runs are longer: fewer rounds.
PEER_ROUNDS = 3


def peer_rounds(
    servers: dict[str, ServerProcess],
    names: list[str],
    setups: dict[str, Setup],
    *,
    rounds: int,
    seconds: float,
    own: Rounds,
) -> Rounds:
    """The same servers and pinned setups driven by the peer client (`bench.peer_client`),
    each connection sending as many messages as uvloop streams served in `seconds` with
    the bench's own client (same for every server, so each run does the same work)."""
    server_cpus, client_cpus = placement()
    print("== the peer client (uvloop's examples/bench/echoclient.py)", file=sys.stderr)

    def measure(name: str, setup: Setup, messages: int) -> Row:
        connections, size, _ = setup
        server = servers[name]
        if server_cpus:
            pin(server.process.pid, server_cpus)
        before = cpu_seconds(server.process.pid)
        result = peer_client.run(
            server.address,
            connections=connections,
            size=size,
            messages=messages,
            timeout=120 + 30 * seconds,
            cpus=client_cpus,
        )
        used = cpu_seconds(server.process.pid) - before
        return asdict(result) | {"server_cpu_us": 1e6 * used / max(result.messages, 1)}

    results: Rounds = {}
    for key, setup in setups.items():
        paced = own[key].get("uvloop-streams") or next(iter(own[key].values()))
        messages = max(100, int(report.median(paced, "rate") * seconds / setup[0]))
        results |= interleaved(
            names,
            rounds,
            {key: setup},
            functools.partial(measure, messages=messages),
            lambda row: (
                f"{row['rate']:9.0f} req/s ({row['server_cpu_us']:6.1f} us server CPU each, "
                f"{row['seconds']:.1f} s)"
            ),
        )
    return results


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


def config_name(connections: int, size: int, pinned: bool) -> str:
    return f"{connections} conn x {size // 1024} KiB" + ("" if pinned else ", unpinned")


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
    # Stopped (make's SIGTERM, kill): unwind as Ctrl-C does, so that every server and
    # client the bench started is stopped on the way out, not left running.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    for flag, value in (("rounds", args.rounds), ("seconds", args.seconds)):
        if value is not None and value <= 0:
            parser.error(f"--{flag} must be positive, got {value}")
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
    peer = [] if quick else [(32, 1024), (256, 1024)]
    data = throughput(configs, rounds, seconds, args.processes, peer=peer)
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
        f" {report.cpus_text(data['client_cpus'])};"
        f" servers pinned to CPU {report.cpus_text(data['server_cpus'])})"
    )
    print(report.format_throughput(data))
    print(report.format_peer(data))
    print(report.format_memory(costs, capacities))
    print(report.format_locks(lock_results))
    print(burst.format_burst(burst_result))
    saved = {
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
    args.json.write_text(json.dumps(saved, indent=1) + "\n")
    report.write_chart(data, costs, args.chart)
    print(f"\nwrote {args.json} and {args.chart} in {time.monotonic() - started_at:.0f} s")
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def ab_main(baseline: Path, rounds: int, seconds: float, processes: int | None) -> int:
    started_at = time.monotonic()
    configs = [(32, 1024, True), (256, 1024, True)]
    print(f"== A/B against {baseline} (ping-pong, loopback)", file=sys.stderr)
    data = throughput(configs, rounds, seconds, processes, baseline=baseline.resolve())
    print(f"\n== echo cluster A/B ({rounds} rounds x {seconds:g} s) against {baseline}")
    print(report.format_throughput(data))
    print(report.format_ab(data))
    print(f"\nin {time.monotonic() - started_at:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
