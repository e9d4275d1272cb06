"""One PNG per scenario: threads, RSS and probe latency over time, the servers side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from loadtest.flood import FloodRun

from services.models import MODELS

PALETTE = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown")


def color_of(model: str) -> str | None:
    """The same colour for a model in every chart: by its place in the registry."""
    names = list(MODELS)
    return PALETTE[names.index(model) % len(PALETTE)] if model in names else None


def write_charts(runs: Sequence[FloodRun], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in dict.fromkeys(run.scenario for run in runs):
        chosen = [run for run in runs if run.scenario == scenario]
        figure, (threads, rss, latency) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
        for run in chosen:
            color = color_of(run.target)
            label = f"{run.target} ({run.summary.verdict})"
            good = [s for s in run.samples if s.ok]
            times = [s.at - run.attack_start for s in good]
            threads.plot(
                times, [s.values.get("threads", 0) for s in good], color=color, label=label
            )
            rss.plot(times, [s.values.get("rss_bytes", 0) / 2**20 for s in good], color=color)
            ok = [p for p in run.probes if p.ok]
            failed = [p for p in run.probes if not p.ok]
            latency.plot(
                [p.at - run.attack_start for p in ok],
                [p.seconds * 1000 for p in ok],
                ".",
                color=color,
                markersize=3,
            )
            latency.plot(
                [p.at - run.attack_start for p in failed],
                [2500] * len(failed),
                "x",
                color=color,
                markersize=4,
            )
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
        latency.set_ylabel("probe round trip (ms)\nx = failed")
        latency.set_yscale("log")
        latency.set_xlabel("seconds since the attack began (dashed: start, dotted: end)")
        figure.suptitle(f"{scenario} flood")
        figure.tight_layout()
        path = directory / f"flood-{scenario}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
