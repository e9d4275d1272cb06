"""Judge one flood run from what the probe and the sampler recorded.

- `held`: the process stayed up, threads and memory stayed bounded, and the
  probe succeeded at least 99% of the time once the server's own defences had
  had time to act (its idle/send timeout plus a margin).
- `degraded`: up, but unbounded or refusing legitimate clients.
- `down`: it died, restarted, or stopped answering altogether.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from loadtest.observe import ProbeResult, Sample

VERDICTS = ("held", "degraded", "down")


@dataclass(frozen=True)
class Limits:
    min_probe_success: float = 0.99
    max_rss_growth_bytes: float = 30 * 1024 * 1024
    thread_margin: int = 16  # beyond the pool: main, metrics, watchdog, ...
    unbounded_thread_margin: int = 64  # what "bounded" allows a server with no pool


@dataclass(frozen=True)
class Summary:
    verdict: str
    reasons: list[str]
    baseline_threads: float
    peak_threads: float
    baseline_rss_mb: float
    peak_rss_mb: float
    probe_success: float  # in the judged window
    probe_p50_ms: float
    probe_p99_ms: float
    probes_judged: int
    window: tuple[float, float]
    restarted: bool
    scrape_failures: int
    rejected: dict[str, float]
    closed: dict[str, float]
    thread_start_failures: float


def settle_seconds(info: dict[str, str], margin: float) -> float:
    """How long the server's own defences need before the probe is judged."""
    timeouts = []
    for key in ("idle_timeout_seconds", "send_timeout_seconds"):
        try:
            timeouts.append(float(info.get(key, "off")))
        except ValueError:  # "off"
            continue
    return max(timeouts, default=0.0) + margin


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(fraction * 1000) - 1]


def judge_flood(
    samples: list[Sample],
    probes: list[ProbeResult],
    *,
    attack_start: float,
    attack_end: float,
    run_end: float,
    settle: float,
    limits: Limits,
) -> Summary:
    good = [s for s in samples if s.ok]
    before = [s for s in good if s.at < attack_start] or good[:1]
    baseline_threads = min((s.values.get("threads", 0.0) for s in before), default=0.0)
    baseline_rss = min((s.values.get("rss_bytes", 0.0) for s in before), default=0.0)
    peak_threads = max((s.values.get("threads", 0.0) for s in good), default=0.0)
    peak_rss = max((s.values.get("rss_bytes", 0.0) for s in good), default=0.0)
    starts = {s.values["start_time"] for s in good if "start_time" in s.values}
    restarted = len(starts) > 1
    info = good[0].info if good else {}

    window = (attack_start + settle, run_end)
    judged = [p for p in probes if window[0] <= p.at <= window[1]]
    success = sum(p.ok for p in judged) / len(judged) if judged else 0.0
    latencies = [p.seconds * 1000 for p in judged if p.ok]

    reasons = []
    tail = samples[-3:]
    gone = bool(tail) and not any(s.ok for s in tail)
    if restarted:
        reasons.append("the process restarted during the run")
    if gone or not good:
        reasons.append("its metrics stopped answering")
    if judged and not any(p.ok for p in judged[-5:]):
        reasons.append("the probe was still failing at the end")
    verdict = "down" if reasons else "held"

    workers = info.get("workers", "unbounded")
    allowance = (
        int(workers) + limits.thread_margin if workers.isdigit() else limits.unbounded_thread_margin
    )
    if peak_threads > baseline_threads + allowance:
        reasons.append(
            f"threads grew from {baseline_threads:.0f} to {peak_threads:.0f} "
            f"(bound: {baseline_threads:.0f} + {allowance})"
        )
    if peak_rss - baseline_rss > limits.max_rss_growth_bytes:
        reasons.append(
            f"RSS grew by {(peak_rss - baseline_rss) / 2**20:.1f} MiB "
            f"(bound: {limits.max_rss_growth_bytes / 2**20:.0f} MiB)"
        )
    under_attack = [p for p in judged if p.at <= attack_end]
    if not under_attack:
        # Judging only the recovery would call a server "held" that was pinned
        # for the whole attack.
        reasons.append(
            f"no probe was judged under attack: the attack ended before the defences' "
            f"settle time ({settle:.0f} s) was over; attack for longer"
        )
    elif success < limits.min_probe_success:
        reasons.append(
            f"the probe succeeded {success:.1%} after the defences had {settle:.0f} s to act "
            f"(needs {limits.min_probe_success:.0%})"
        )
    if verdict == "held" and reasons:
        verdict = "degraded"

    return Summary(
        verdict=verdict,
        reasons=reasons,
        baseline_threads=baseline_threads,
        peak_threads=peak_threads,
        baseline_rss_mb=baseline_rss / 2**20,
        peak_rss_mb=peak_rss / 2**20,
        probe_success=success,
        probe_p50_ms=percentile(latencies, 0.50),
        probe_p99_ms=percentile(latencies, 0.99),
        probes_judged=len(judged),
        window=window,
        restarted=restarted,
        scrape_failures=sum(not s.ok for s in samples),
        rejected=_growth(good, "rejected"),
        closed=_growth(good, "closed"),
        thread_start_failures=(
            good[-1].values.get("thread_start_failures", 0.0)
            - good[0].values.get("thread_start_failures", 0.0)
            if good
            else 0.0
        ),
    )


def _growth(samples: list[Sample], field: str) -> dict[str, float]:
    """How much each labelled counter grew over the run (counters are cumulative)."""
    if not samples:
        return {}
    first, last = getattr(samples[0], field), getattr(samples[-1], field)
    grown = {label: value - first.get(label, 0.0) for label, value in last.items()}
    return {label: value for label, value in grown.items() if value}
