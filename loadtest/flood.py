"""Flood echo servers with connections and judge whether they held.

    python -m loadtest.flood --targets executor,queue --scenarios idle --connections 5000

For each target and scenario: sample the target's metrics and probe it as a
legitimate client for a baseline, attack, let go, watch it recover, then give a
verdict (held / degraded / down), a table, JSON and charts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loadtest.attacks import SCENARIOS, Attack, AttackCounts, AttackPlan, AttackRefused
from loadtest.observe import Probe, ProbeResult, Sample, Sampler
from loadtest.verdict import VERDICTS, Limits, Summary, judge_flood, settle_seconds
from services.config import OneLineParser
from services.models import MODELS


@dataclass(frozen=True)
class Target:
    name: str
    address: tuple[str, int]
    metrics: tuple[str, int]


@dataclass(frozen=True)
class RunSettings:
    connections: int = 1000
    rate: float = 1000.0
    duration: float = 20.0
    baseline: float = 2.0
    recovery: float = 5.0
    settle: float | None = None  # None: the server's idle/send timeout + margin
    margin: float = 5.0
    trickle_interval: float = 2.0
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class FloodRun:
    target: str
    scenario: str
    settings: RunSettings
    attack_start: float
    attack_end: float
    counts: AttackCounts
    summary: Summary
    samples: list[Sample]
    probes: list[ProbeResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "settings": asdict(self.settings),
            "attack_start": self.attack_start,
            "attack_end": self.attack_end,
            "attack": asdict(self.counts),
            "summary": asdict(self.summary),
            "samples": [asdict(s) for s in self.samples],
            "probes": [asdict(p) for p in self.probes],
        }


def ensure_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 256:
        wanted = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed + 256, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft != resource.RLIM_INFINITY and soft < needed + 64:
        raise AttackRefused(
            f"connections: {needed} need more descriptors than this process may open ({soft})"
        )


def flood(
    target: Target,
    scenario: str,
    settings: RunSettings,
    progress: Callable[[str], None] | None = None,
) -> FloodRun:
    """Run one scenario against one target and judge it. Blocks for the whole run."""
    plan = AttackPlan(
        scenario=scenario,
        address=target.address,
        connections=settings.connections,
        rate=settings.rate,
        duration=settings.duration,
        trickle_interval=settings.trickle_interval,
    )
    ensure_descriptors(settings.connections if scenario != "churn" else 128)
    origin = time.monotonic()
    sampler = Sampler(target.metrics, origin)
    probe = Probe(target.address, origin)
    attack = Attack(plan)
    sampler.start()
    probe.start()
    watch = _Watch(origin, target, scenario, attack, probe, sampler, progress)
    try:
        watch.wait(settings.baseline)
        info = next((s.info for s in sampler.samples() if s.info), {})
        settle = (
            settings.settle
            if settings.settle is not None
            else settle_seconds(info, settings.margin)
        )
        if settle >= settings.duration:
            raise AttackRefused(
                f"duration: {settings.duration:g} s ends before {target.name}'s defences have "
                f"had their {settle:g} s (its timeouts + margin); attack for longer"
            )
        attack_start = time.monotonic() - origin
        attack.start()
        watch.wait(settings.duration + 30, until=lambda: not attack.is_alive())
        attack.join()
        attack_end = time.monotonic() - origin
        watch.wait(settings.recovery)
    finally:
        attack.stop()
        probe.stop()
        sampler.stop()
        for thread in (attack, probe, sampler):
            if thread.is_alive():
                thread.join(30)
    samples, probes = sampler.samples(), probe.results()
    summary = judge_flood(
        samples,
        probes,
        attack_start=attack_start,
        attack_end=attack_end,
        run_end=time.monotonic() - origin,
        settle=settle,
        limits=settings.limits,
    )
    return FloodRun(
        target.name,
        scenario,
        settings,
        attack_start,
        attack_end,
        attack.counts(),
        summary,
        samples,
        probes,
    )


@dataclass
class _Watch:
    """Waits through the phases of a run, reporting progress about once a second."""

    origin: float
    target: Target
    scenario: str
    attack: Attack
    probe: Probe
    sampler: Sampler
    progress: Callable[[str], None] | None

    def wait(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            if self.progress is not None:
                self.progress(self.line())
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def line(self) -> str:
        now = time.monotonic() - self.origin
        counts = self.attack.counts()
        recent = [p for p in self.probe.results() if p.at > now - 5]
        probe_text = f"{sum(p.ok for p in recent) / len(recent):4.0%}" if recent else "  - "
        sample = next((s for s in reversed(self.sampler.samples()) if s.ok), None)
        if sample:
            threads, rss = sample.values.get("threads", 0), sample.values.get("rss_bytes", 0)
            server = f"threads {threads:5.0f}  rss {rss / 2**20:6.1f} MiB"
        else:
            server = "metrics unreachable"
        return (
            f"[{self.scenario} -> {self.target.name}] {now:5.1f}s  open {counts.open_now:5d}  "
            f"closed by server {counts.closed_by_server:5d}  probe ok (5 s) {probe_text}  {server}"
        )


def format_flood_table(runs: Sequence[FloodRun]) -> str:
    header = (
        f"{'scenario':<12}{'server':<10}{'verdict':<10}{'threads':>13}{'RSS MiB':>15}"
        f"{'probe ok':>10}{'probe p99':>11}  turned away / cut off"
    )
    lines = [header, "-" * (len(header) + 10)]
    for run in runs:
        s = run.summary
        cut = {
            **{f"rejected {k}": v for k, v in s.rejected.items()},
            **{f"closed {k}": v for k, v in s.closed.items() if k != "eof"},
        }
        cut_text = ", ".join(f"{k} {v:.0f}" for k, v in cut.items()) or "-"
        lines.append(
            f"{run.scenario:<12}{run.target:<10}{s.verdict:<10}"
            f"{s.baseline_threads:>6.0f} ->{s.peak_threads:>5.0f}"
            f"{s.baseline_rss_mb:>7.1f} ->{s.peak_rss_mb:>5.1f}"
            f"{s.probe_success:>10.1%}{s.probe_p99_ms:>9.1f}ms  {cut_text}"
        )
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m loadtest.flood",
        description="Connection floods against the echo servers (loopback only), with an "
        "independent availability probe and a metrics sampler; prints a verdict per run.",
    )
    add = parser.add_argument
    add(
        "--targets",
        default=",".join(MODELS),
        help=f"comma-separated services ({', '.join(MODELS)}) [%(default)s]",
    )
    add("--host", default="127.0.0.1", help="loopback address of the services [%(default)s]")
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
        "--recovery", type=float, default=5.0, help="seconds watched after the attack [%(default)s]"
    )
    add(
        "--settle",
        type=float,
        help="seconds after the attack starts before the probe is judged "
        "[the server's idle/send timeout + --margin]",
    )
    add("--margin", type=float, default=5.0, help="added to the server's timeouts [%(default)s]")
    add(
        "--trickle-interval",
        type=float,
        default=2.0,
        help="slowloris: seconds between bytes on a connection [%(default)s]",
    )
    add("--max-rss-growth-mb", type=float, default=30.0, help="held needs less [%(default)s]")
    add("--expect", choices=VERDICTS, help="exit 1 unless every run gets this verdict")
    add("--json", type=Path, help="write every run (summary and timelines) to this file")
    add("--charts", type=Path, help="write one PNG per scenario into this directory")
    add("--quiet", action="store_true", help="no progress lines")
    return parser


def targets_from(args: argparse.Namespace) -> list[Target]:
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise AttackRefused(
            f"targets: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}"
        )
    if (args.port or args.metrics_port) and len(names) != 1:
        raise AttackRefused("--port/--metrics-port need exactly one target")
    return [
        Target(
            name,
            (args.host, args.port or MODELS[name].port),
            (args.host, args.metrics_port or MODELS[name].metrics_port),
        )
        for name in names
    ]


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    settings = RunSettings(
        connections=args.connections,
        rate=args.rate,
        duration=args.duration,
        recovery=args.recovery,
        settle=args.settle,
        margin=args.margin,
        trickle_interval=args.trickle_interval,
        limits=Limits(max_rss_growth_bytes=args.max_rss_growth_mb * 2**20),
    )
    try:
        targets = targets_from(args)
        for scenario in scenarios:  # refuse a bad plan before any traffic
            for target in targets:
                AttackPlan(
                    scenario,
                    target.address,
                    settings.connections,
                    settings.rate,
                    settings.duration,
                    settings.trickle_interval,
                )
        ensure_descriptors(settings.connections)
    except AttackRefused as error:
        print(f"python -m loadtest.flood: error: {error}", file=sys.stderr)
        return 2

    progress = None if args.quiet else _progress_printer()
    runs = []
    try:
        for scenario in scenarios:
            for target in targets:
                runs.append(flood(target, scenario, settings, progress))
                if progress is not None:
                    progress("")
    except AttackRefused as error:
        print(f"python -m loadtest.flood: error: {error}", file=sys.stderr)
        return 2
    return report(runs, args, out)


def report(runs: list[FloodRun], args: argparse.Namespace, out: TextIO) -> int:
    """Print the table and reasons, write JSON and charts; the exit status for --expect."""
    print(format_flood_table(runs), file=out)
    for run in runs:
        for reason in run.summary.reasons:
            print(f"  {run.scenario} / {run.target}: {reason}", file=out)
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
