"""`--find-limit`: each server's breaking point, the largest attack it still held.

For each scenario and server the attack size is stepped up (connections held;
for churn, new connections a second) and every step is a full flood run with
its own verdict. Stepping stops at the first step not held: what a server
fails at once it is not assumed to survive when larger.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TextIO

from loadtest.attacks import MAX_CONNECTIONS, AttackRefused
from loadtest.floodrun import RunSettings, Target, flood

LIMIT_STEPS = (250, 500, 1000, 2000, 4000, 8000, 16000)


@dataclass(frozen=True)
class Step:
    size: int
    verdict: str
    probe_success: float
    reasons: list[str]


@dataclass(frozen=True)
class BreakingPoint:
    target: str
    scenario: str
    unit: str  # what a step's size counts
    steps: list[Step]

    @property
    def held(self) -> int | None:
        """The largest size held (every smaller step held too); None: not even the first."""
        held = [step.size for step in self.steps if step.verdict == "held"]
        return max(held) if held else None

    @property
    def failed_at(self) -> Step | None:
        return next((step for step in self.steps if step.verdict != "held"), None)

    def describe(self) -> str:
        if self.held is None:
            failed = self.steps[0]
            return f"holds nothing tried: < {failed.size} {self.unit}"
        failed_step = self.failed_at
        if failed_step is None:
            return f">= {self.held} {self.unit} (held every step)"
        return f"{self.held} {self.unit} (not {failed_step.size})"


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise AttackRefused(f"limit steps: {text!r} is not a list of whole numbers") from None
    if not steps or steps[0] < 1 or steps[-1] > MAX_CONNECTIONS:
        raise AttackRefused(f"limit steps: each from 1 to {MAX_CONNECTIONS}")
    return steps


def step_settings(settings: RunSettings, scenario: str, size: int) -> RunSettings:
    """Churn holds nothing: its size is its rate. Every other attack's is its count."""
    if scenario == "churn":
        return replace(settings, rate=float(size))
    return replace(settings, connections=size)


def find_limit(
    target: Target,
    scenario: str,
    settings: RunSettings,
    steps: Sequence[int],
    progress: Callable[[str], None] | None = None,
) -> BreakingPoint:
    done: list[Step] = []
    for size in steps:
        run = flood(target, scenario, step_settings(settings, scenario, size), progress)
        summary = run.summary
        done.append(Step(size, summary.verdict, summary.probe_success, summary.reasons))
        if progress is not None:
            progress("")
        if summary.verdict != "held":
            break
    unit = "connections/s" if scenario == "churn" else "connections"
    return BreakingPoint(target.name, scenario, unit, done)


def format_limits(points: Sequence[BreakingPoint]) -> str:
    lines = [f"{'scenario':<18}{'server':<10}largest attack held", "-" * 64]
    for point in points:
        lines.append(f"{point.scenario:<18}{point.target:<10}{point.describe()}")
        failed = point.failed_at
        if failed is not None:
            lines.append(f"{'':<28}at {failed.size}: {failed.verdict}: {'; '.join(failed.reasons)}")
    return "\n".join(lines)


def report_limits(points: list[BreakingPoint], args: Namespace, out: TextIO = sys.stdout) -> None:
    """The table, and the JSON if asked for (the chart is the caller's: `charts` reads
    this module)."""
    print(format_limits(points), file=out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = [asdict(p) | {"held": p.held} for p in points]
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}", file=out)
