"""Flood echo servers with connections and judge whether they held.

    python -m loadtest.flood --targets executor,queue --scenarios idle --connections 5000

For each target and scenario: sample the target's metrics and probe it as a
legitimate client for a baseline, attack, let go, watch it recover, then give a
verdict (held / degraded / down), a table, JSON and charts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from harness import dashboard
from loadtest.attacks import SCENARIOS, AttackRefused, ensure_descriptors
from loadtest.botnet import check_attacker_image
from loadtest.breaking import (
    LIMIT_STEPS,
    find_limit,
    parse_steps,
    report_limits,
    step_settings,
)
from loadtest.floodrun import NEED_METRICS, FloodRun, RunSettings, Target, flood
from loadtest.targets import LOOPBACK, VIAS, targets_from
from loadtest.verdict import DEFAULT_SETTLE, VERDICTS, Limits
from services.cli import OneLineParser

__all__ = ["FloodRun", "RunSettings", "Target", "flood", "main"]
from services.models import MODELS

WATCHED_NOTE = {
    "process": "no /metrics: threads, RSS and descriptors from /proc; nothing is known of "
    "its rejections and closes",
    "probes only": "neither /metrics nor a process: judged on its clients alone, not on "
    "threads, memory or liveness",
}


def format_flood_table(runs: Sequence[FloodRun]) -> str:
    width = max([10, *(len(run.target) + 2 for run in runs)])  # the peers' longer names
    header = (
        f"{'scenario':<18}{'server':<{width}}{'verdict':<10}{'threads':>13}{'RSS MiB':>15}"
        f"{'fds':>7}"
        f"{'probe ok':>10}{'probe p99':>11}{'estab ok':>10}{'cut':>5}{'back in':>9}"
        f"{'replaced':>10}  turned away / cut off"
    )
    lines = [header, "-" * (len(header) + 10)]
    for run in runs:
        s = run.summary
        cut = {
            **{f"rejected {k}": v for k, v in s.rejected.items()},
            **{f"closed {k}": v for k, v in s.closed.items() if k != "eof"},
        }
        if s.listen_overflows:  # never reached the server: dropped by the kernel
            cut["accept queue full"] = s.listen_overflows
        cut_text = ", ".join(f"{k} {v:.0f}" for k, v in cut.items()) or "-"
        back = "never" if s.recovered_after is None else f"{s.recovered_after:.1f}s"
        lines.append(
            f"{run.scenario:<18}{run.target:<{width}}{s.verdict:<10}"
            f"{s.baseline_threads:>6.0f} ->{s.peak_threads:>5.0f}"
            f"{s.baseline_rss_mb:>7.1f} ->{s.peak_rss_mb:>6.1f}{s.peak_open_fds:>7.0f}"
            f"{s.probe_success:>10.1%}{s.probe_p99_ms:>9.1f}ms"
            f"{s.established_success:>10.1%}{s.established_cuts:>5}{back:>9}"
            f"{run.counts.replaced:>10}"
            f"  {cut_text}"
        )
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m loadtest.flood",
        description="Connection floods against the echo servers (on loopback or the project's "
        "containers), with an independent availability probe and a metrics sampler; prints a "
        "verdict per run.",
    )
    add = parser.add_argument
    add(
        "--targets",
        default=",".join(MODELS),
        help=f"comma-separated services ({', '.join(MODELS)}) [%(default)s]",
    )
    add(
        "--target",
        action="append",
        metavar="NAME=HOST:PORT[,pid=N|container=NAME][,metrics=PORT]",
        help="any TCP echo server instead of --targets (repeat it): threads, RSS and "
        "descriptors from its /metrics, its process or its container's (in /proc), else "
        "judged on its clients alone",
    )
    add("--host", help=f"loopback address of the services [{LOOPBACK}]")
    add(
        "--via",
        choices=VIAS,
        default="auto",
        help="network: each service's container at its own address (Docker's port proxy "
        "is not what is measured); published: --host and the published ports; auto: "
        "network where the compose project's container runs (unless --host or --port is "
        "given), else published [%(default)s]",
    )
    add(
        "--docker-project",
        default="echo-cluster",
        help="compose project of the containers, for --via [%(default)s]",
    )
    add("--port", type=int, help="echo port, overriding the service's default (one target only)")
    add("--metrics-port", type=int, help="metrics port, likewise")
    add("--scenarios", default="idle", help=f"comma-separated, or 'all': {', '.join(SCENARIOS)}")
    add(
        "--connections",
        type=int,
        default=1000,
        help="connections to hold (not churn) [%(default)s]",
    )
    add(
        "--rate",
        type=float,
        default=1000.0,
        help="new connections per second, churn included [%(default)s]",
    )
    add("--duration", type=float, default=20.0, help="seconds of attack [%(default)s]")
    add(
        "--recovery",
        type=float,
        default=RunSettings.recovery,
        help="seconds watched after the attack [%(default)s]",
    )
    add(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        help="seconds after the attack starts before the probe is judged; fixed, never the "
        "server's own timeouts [%(default)s]",
    )
    add(
        "--trickle-interval",
        type=float,
        default=2.0,
        help="slowloris: seconds between bytes on a connection [%(default)s]",
    )
    add(
        "--established",
        type=int,
        default=RunSettings.established,
        help="legitimate clients that keep their connections, judged beside the newcomer "
        "probe [%(default)s]",
    )
    add(
        "--think",
        type=float,
        default=RunSettings.think,
        help="seconds between an established client's messages; keep it under half the "
        "server's idle timeout [%(default)s]",
    )
    add(
        "--polite",
        action="store_true",
        help="never replace a connection the server drops (real attack tools do replace them)",
    )
    add(
        "--find-limit",
        action="store_true",
        help="step the attack size up (--limit-steps) for each scenario and server and report "
        "the largest size held; churn steps its rate",
    )
    add(
        "--limit-steps",
        default=",".join(map(str, LIMIT_STEPS)),
        help="sizes for --find-limit [%(default)s]",
    )
    add("--max-rss-growth-mb", type=float, default=30.0, help="held needs less [%(default)s]")
    add("--expect", choices=VERDICTS, help="exit 1 unless every run gets this verdict")
    add("--json", type=Path, help="write every run (summary and timelines) to this file")
    add("--charts", type=Path, help="write one PNG per scenario into this directory")
    add("--quiet", action="store_true", help="no progress lines")
    return parser


def settings_from(args: argparse.Namespace) -> RunSettings:
    settings = RunSettings(
        connections=args.connections,
        rate=args.rate,
        duration=args.duration,
        recovery=args.recovery,
        settle=args.settle,
        trickle_interval=args.trickle_interval,
        polite=args.polite,
        established=args.established,
        think=args.think,
        limits=Limits(max_rss_growth_bytes=args.max_rss_growth_mb * 2**20),
    )
    settings.check()
    return settings


def check_plans(scenarios: list[str], targets: list[Target], settings: RunSettings) -> None:
    """Refuse a bad plan before any traffic."""
    plans = [settings.plan(scenario, target) for scenario, target in runs_of(scenarios, targets)]
    if any(plan.sources > 1 and not plan.from_loopback_sources for plan in plans):
        check_attacker_image()
    ensure_descriptors(settings.connections)


def runs_of(scenarios: list[str], targets: list[Target]) -> list[tuple[str, Target]]:
    """Each scenario against each target, but those of the metrics port only against a
    target that has one."""
    return [
        (scenario, target)
        for scenario in scenarios
        for target in targets
        if scenario not in NEED_METRICS or target.metrics is not None
    ]


def skipped(scenarios: list[str], targets: list[Target]) -> list[str]:
    kept = runs_of(scenarios, targets)
    return [
        f"{scenario} skipped for {target.name}: it has no metrics port to attack"
        for scenario in scenarios
        for target in targets
        if (scenario, target) not in kept
    ]


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    try:
        settings = settings_from(args)
        targets = targets_from(args)
        steps = parse_steps(args.limit_steps) if args.find_limit else []
        check_plans(scenarios, targets, settings)
        for step in steps:
            check_plans(scenarios, targets, step_settings(settings, "idle", step))
    except AttackRefused as error:
        print(f"python -m loadtest.flood: error: {error}", file=sys.stderr)
        return 2
    progress = None if args.quiet else _progress_printer()
    for target in [] if args.quiet else targets:
        how = "its container's own address" if target.container else "as given"
        print(
            f"{target.name}: {target.address[0]}:{target.address[1]} ({how}; "
            f"watched: {target.watched})",
            file=sys.stderr,
        )
    for line in [] if args.quiet else skipped(scenarios, targets):
        print(line, file=sys.stderr)
    if args.find_limit:
        points = [
            find_limit(target, scenario, settings, steps, progress)
            for scenario, target in runs_of(scenarios, targets)
        ]
        report_limits(points, args, out)
        if args.charts:
            from loadtest.charts import write_limit_chart  # noqa: PLC0415 (slow import)

            print(f"wrote {write_limit_chart(points, args.charts)}", file=out)
        return 0
    # With the stack up, its Prometheus watches the attack: the page, live and afterwards.
    watched = not args.quiet and dashboard.prometheus_answers()
    if watched:
        print(f"watch it on one screen: {dashboard.page_url()}", file=sys.stderr)
    started = time.time()
    runs = []
    for scenario, target in runs_of(scenarios, targets):
        runs.append(flood(target, scenario, settings, progress))
        if progress is not None:
            progress("")
    ended = time.time()
    status = report(runs, args, out)
    if watched:
        print(f"the page over this flood: {dashboard.attack_url(started, ended)}", file=out)
    return status


def report(runs: list[FloodRun], args: argparse.Namespace, out: TextIO) -> int:
    """Print the table and reasons, write JSON and charts; the exit status for --expect."""
    print(format_flood_table(runs), file=out)
    for run in runs:
        for reason in run.summary.reasons:
            print(f"  {run.scenario} / {run.target}: {reason}", file=out)
    for name, watched in {r.target: r.summary.watched for r in runs}.items():
        if watched != "metrics":
            print(f"  {name}: {WATCHED_NOTE[watched]}", file=out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([run.to_json() for run in runs], indent=1) + "\n")
        print(f"wrote {args.json}", file=out)
    if args.charts:
        from loadtest.charts import write_charts  # noqa: PLC0415 (matplotlib is slow to import)

        for path in write_charts(runs, args.charts):
            print(f"wrote {path}", file=out)
    if args.expect and any(run.summary.verdict != args.expect for run in runs):
        print(f"expected every run to be {args.expect}", file=out)
        return 1
    return 0


def _progress_printer() -> Callable[[str], None]:
    interactive = sys.stderr.isatty()
    last = [0.0]

    def show(line: str) -> None:
        if interactive:
            print(f"\r\033[K{line}", end="" if line else "\n", file=sys.stderr, flush=True)
        elif line and time.monotonic() - last[0] >= 5:  # logs get a line every 5 s
            last[0] = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    return show


if __name__ == "__main__":
    sys.exit(main())
