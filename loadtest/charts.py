"""One PNG per scenario: threads, RSS and the legitimate clients' round trips (the newcomer
probe's and the established clients') over time, the servers side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from loadtest.breaking import BreakingPoint
    from loadtest.floodrun import FloodRun
    from loadtest.observe import ProbeResult

from services.models import MODELS

PALETTE = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown")
# Any other target (a peer: loadtest.targets), in the order it first appears.
OTHERS = ("tab:orange", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black")


def colors_of(targets: Sequence[str]) -> dict[str, str]:
    """The same colour for a model in every chart (by its place in the registry); the
    other targets take the colours the models do not use, so no two share one."""
    models = list(MODELS)
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models) if m in targets}
    others = [t for t in dict.fromkeys(targets) if t not in colors]
    free = [c for c in OTHERS if c not in colors.values()]
    return colors | {t: free[i % len(free)] for i, t in enumerate(others)}


def write_charts(runs: Sequence[FloodRun], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    colors = colors_of([run.target for run in runs])
    for scenario in dict.fromkeys(run.scenario for run in runs):
        chosen = [run for run in runs if run.scenario == scenario]
        figure, (threads, rss, latency) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
        for run in chosen:
            color = colors[run.target]
            label = f"{run.target} ({run.summary.verdict})"
            good = [s for s in run.samples if s.ok]
            times = [s.at - run.attack_start for s in good]
            threads.plot(
                times, [s.values.get("threads", 0) for s in good], color=color, label=label
            )
            rss.plot(times, [s.values.get("rss_bytes", 0) / 2**20 for s in good], color=color)
            _round_trips(latency, run.probes, run.attack_start, color, (".", "x"))
            _round_trips(latency, run.established, run.attack_start, color, ("s", "+"))
        for axis in (threads, rss, latency):
            axis.axvline(0, color="grey", linestyle="--", linewidth=0.8)
            axis.grid(alpha=0.3)
        if chosen:
            end = max(run.attack_end - run.attack_start for run in chosen)
            for axis in (threads, rss, latency):
                axis.axvline(end, color="grey", linestyle=":", linewidth=0.8)
        threads.set_ylabel("threads")
        threads.legend(loc="upper left")
        rss.set_ylabel("RSS (MiB)")
        latency.set_ylabel(
            "round trip (ms)\n. probe, \u25a0 established\nx / + failed (at the top)"
        )
        latency.set_yscale("log")
        latency.set_xlabel("seconds since the attack began (dashed: start, dotted: end)")
        figure.suptitle(f"{scenario} flood")
        figure.tight_layout()
        path = directory / f"flood-{scenario}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def _round_trips(
    axis: Axes,
    results: Sequence[ProbeResult],
    start: float,
    color: str | None,
    markers: tuple[str, str],
) -> None:
    """Served round trips at their latency, failed ones (and cuts) at the top."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    axis.plot([r.at - start for r in ok], [r.seconds * 1000 for r in ok], markers[0],
              color=color, markersize=3)  # fmt: skip
    axis.plot([r.at - start for r in failed], [2500] * len(failed), markers[1],
              color=color, markersize=5)  # fmt: skip


def write_limit_chart(points: Sequence[BreakingPoint], directory: Path) -> Path:
    """Bars: the largest attack each server held, per scenario (log scale; 0 = none)."""
    directory.mkdir(parents=True, exist_ok=True)
    scenarios = list(dict.fromkeys(point.scenario for point in points))
    targets = list(dict.fromkeys(point.target for point in points))
    width = 0.8 / max(1, len(targets))
    colors = colors_of(targets)
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for index, target in enumerate(targets):
        held = {p.scenario: p.held or 0 for p in points if p.target == target}
        xs = [n + index * width for n in range(len(scenarios))]
        heights = [max(held.get(scenario, 0), 0.9) for scenario in scenarios]
        bars = axis.bar(xs, heights, width, color=colors[target], label=target)
        for bar, scenario in zip(bars, scenarios, strict=True):
            value = held.get(scenario, 0)
            axis.annotate(
                f"{value}" if value else "none",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axis.set_xticks([n + width * (len(targets) - 1) / 2 for n in range(len(scenarios))])
    axis.set_xticklabels(scenarios)
    axis.set_yscale("log")
    axis.set_ylabel("largest attack held\n(connections; churn: per second)")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.suptitle("Breaking points: the largest attack each server held")
    figure.tight_layout()
    path = directory / "flood-limits.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
