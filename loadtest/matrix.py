"""The tables of a recorded flood matrix (`make test-floods`).

Each flood a test runs is one JSON line (`matrix_row`, written by the tests' `flooder`
fixture); `python -m loadtest.matrix FILE` turns the lines into Markdown tables, one per
place (local processes, containers), a row per scenario and model, which docs/history/floods.md
quotes.

    python -m loadtest.matrix reports/test-floods.jsonl > reports/test-floods.md
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.floodrun import FloodRun

COLUMNS = (
    "scenario",
    "server",
    "test",
    "connections",
    "verdict",
    "probe ok",
    "probe p99",
    "established ok",
    "threads",
    "RSS MiB",
    "attack peak",
    "replaced",
)


def matrix_row(run: FloodRun, where: str) -> dict[str, Any]:
    """What the tables show of one run (JSON-ready); `where`: local or containers."""
    s = run.summary
    return {
        "where": where,
        "scenario": run.scenario,
        "server": run.target,
        "connections": run.counts.planned or run.settings.connections,
        "seconds": run.settings.duration,
        "verdict": s.verdict,
        "probe_success": s.probe_success,
        "probes_judged": s.probes_judged,
        "probe_p99_ms": s.probe_p99_ms,
        "established_success": s.established_success,
        "established_judged": s.established_judged,
        "established_cuts": s.established_cuts,
        "threads": [s.baseline_threads, s.peak_threads],
        "rss_mb": [s.baseline_rss_mb, s.peak_rss_mb],
        "peak_open": run.counts.peak_open,
        "replaced": run.counts.replaced,
    }


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per place, rows in the order the tests ran."""
    out = []
    for where in ("local", "containers"):
        mine = [r for r in rows if r["where"] == where]
        if not mine:
            continue
        out.append(f"### {where}\n")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for r in mine:
            test = r["test"].split("::")[-1]
            cells = (
                r["scenario"],
                r["server"],
                f"`{test}`",
                f"{r['connections']:,} x {r['seconds']:g} s",
                f"**{r['verdict']}**" if r["verdict"] == "held" else r["verdict"],
                f"{r['probe_success']:.0%} of {r['probes_judged']}",
                f"{r['probe_p99_ms']:.0f} ms",
                established_cell(r),
                f"{r['threads'][0]:.0f} -> {r['threads'][1]:.0f}",
                f"+{r['rss_mb'][1] - r['rss_mb'][0]:.1f}",
                f"{r['peak_open']:,}",
                f"{r['replaced']:,}",
            )
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def established_cell(row: dict[str, Any]) -> str:
    """The established clients' share served and their cuts (rows recorded before they
    existed show a dash)."""
    if "established_judged" not in row:
        return "-"
    return (
        f"{row['established_success']:.0%} of {row['established_judged']}, "
        f"{row['established_cuts']} cut"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m loadtest.matrix RECORD.jsonl", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        print(f"loadtest.matrix: cannot read {path}: {error}", file=sys.stderr)
        return 2
    print(format_tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
