"""Judge one flood run from what the probe and the sampler recorded.

The probe is judged *under attack*: from a short, fixed settle time after the
attack starts until it ends. The window never waits for the server's own
timeouts, so a server whose defence takes 60 s to act is judged on those 60 s.

- `held`: the process stayed up, threads and memory stayed bounded, both kinds of
  legitimate client were served: the probe (a newcomer each time) at least 99% of
  the time in the window, and the established clients (connections kept, a message
  every few seconds) in at least 99% of their exchanges in the window with none of
  their connections cut by the server during the attack; and the probe succeeded
  again within `recovery_deadline` seconds of the attack's end.
- `degraded`: up, but unbounded, refusing legitimate clients, or slow to recover.
- `down`: it died or restarted, its metrics stopped answering for more than
  `max_metrics_silence` seconds, or the probe was still failing at the end.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.observe import Exchange, ProbeResult, Sample

VERDICTS = ("held", "degraded", "down")
# How a target's threads, memory and liveness are known: its own /metrics, /proc (a
# server with no metrics), or not at all (judged on its clients alone).
WATCHED = ("metrics", "process", "probes only")
DEFAULT_SETTLE = 5.0
# A run ends with this many probes in a row: all failed, it is down; all served after the
# attack, it has recovered and the watch may stop (`recovered`).
STREAK = 5


@dataclass(frozen=True)
class Limits:
    min_probe_success: float = 0.99
    max_rss_growth_bytes: float = 30 * 1024 * 1024
    thread_margin: int = 16  # beyond the pool: main, metrics, watchdog, ...
    unbounded_thread_margin: int = 64  # what "bounded" allows a server with no pool
    recovery_deadline: float = 5.0  # seconds after the attack for the probe to succeed again
    max_metrics_silence: float = 10.0  # seconds without a scrape before the server is "down"


@dataclass(frozen=True)
class Timeline:
    """Seconds since the run began."""

    attack_start: float
    attack_end: float
    run_end: float
    settle: float = DEFAULT_SETTLE

    @property
    def window(self) -> tuple[float, float]:
        """When the probe is judged: under attack, once the attack has settled in."""
        return (self.attack_start + self.settle, self.attack_end)


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
    recovered_after: float | None  # seconds from the attack's end to a good probe
    restarted: bool
    scrape_failures: int
    longest_metrics_silence: float
    rejected: dict[str, float]
    closed: dict[str, float]
    thread_start_failures: float
    listen_overflows: float  # handshakes the kernel dropped, its accept queue full
    # The established clients: their exchanges in the judged window, how many were
    # served, and their connections the server cut during the attack.
    established_judged: int = 0
    established_success: float = 0.0
    established_cuts: int = 0
    watched: str = "metrics"  # WATCHED: which parts of the verdict were judged
    peak_open_fds: float = 0.0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(fraction * 1000) - 1]


@dataclass(frozen=True)
class _Resources:
    baseline_threads: float
    peak_threads: float
    baseline_rss: float
    peak_rss: float


def resources(samples: list[Sample], attack_start: float) -> _Resources:
    """Threads and RSS before the attack (the lowest seen) and at their peak."""
    good = [s for s in samples if s.ok]
    before = [s for s in good if s.at < attack_start] or good[:1]
    return _Resources(
        baseline_threads=min((s.values.get("threads", 0.0) for s in before), default=0.0),
        peak_threads=max((s.values.get("threads", 0.0) for s in good), default=0.0),
        baseline_rss=min((s.values.get("rss_bytes", 0.0) for s in before), default=0.0),
        peak_rss=max((s.values.get("rss_bytes", 0.0) for s in good), default=0.0),
    )


def longest_silence(samples: list[Sample], run_end: float) -> float:
    """The longest stretch between two answered scrapes (or the run's end)."""
    first = samples[0].at if samples else run_end
    edges = [first, *(s.at for s in samples if s.ok), run_end]
    return max(b - a for a, b in itertools.pairwise(edges))


def recovery_time(probes: list[ProbeResult], attack_end: float) -> float | None:
    """Seconds from the attack's end to the first good probe after it; None if none came."""
    after = [p for p in probes if p.at >= attack_end and p.ok]
    return after[0].at - attack_end if after else None


def recovered(probes: list[ProbeResult], attack_end: float) -> bool:
    """The last `STREAK` probes came after the attack and were all served: nothing later
    in the watch can change the verdict's recovery time or its 'still failing' test."""
    last = probes[-STREAK:]
    return len(last) == STREAK and all(p.ok and p.at >= attack_end for p in last)


def reasons_down(
    samples: list[Sample],
    probes: list[ProbeResult],
    timeline: Timeline,
    limits: Limits,
    watched: str = "metrics",
) -> list[str]:
    reasons = []
    good = [s for s in samples if s.ok]
    if len({s.values["start_time"] for s in good if "start_time" in s.values}) > 1:
        reasons.append("the process restarted during the run")
    silence = longest_silence(samples, timeline.run_end)
    # A process read in /proc is silent while it is gone and no successor runs (a
    # container's is followed: `observe.process_reader`).
    source = "its metrics" if watched == "metrics" else "its process (/proc)"
    if watched == "probes only":
        pass  # nothing to read: judged on its clients alone
    elif not good:
        reasons.append(f"{source} never answered")
    elif silence > limits.max_metrics_silence:
        reasons.append(
            f"{source} did not answer for {silence:.1f} s "
            f"(allowed: {limits.max_metrics_silence:g} s)"
        )
    if probes and not any(p.ok for p in probes[-STREAK:]):
        reasons.append("the probe was still failing at the end")
    return reasons


def established_view(
    exchanges: Sequence[Exchange], timeline: Timeline
) -> tuple[list[Exchange], list[Exchange]]:
    """The established clients' exchanges judged (in the window) and their cuts (from the
    attack's start: a cut shows at the client's next message, up to a pause later)."""
    start, end = timeline.window
    judged = [e for e in exchanges if start <= e.at <= end]
    cuts = [e for e in exchanges if e.cut and e.at >= timeline.attack_start]
    return judged, cuts


def reasons_established(
    exchanges: Sequence[Exchange], timeline: Timeline, limits: Limits
) -> list[str]:
    """Why the established clients were not served; none when there were none."""
    if not exchanges:
        return []
    judged, cuts = established_view(exchanges, timeline)
    reasons = []
    if not judged:
        reasons.append("no established client's exchange fell in the judged window")
    elif (success := sum(e.ok for e in judged) / len(judged)) < limits.min_probe_success:
        reasons.append(
            f"established clients were served in {success:.1%} of their exchanges under "
            f"attack (needs {limits.min_probe_success:.0%})"
        )
    if cuts:
        reasons.append(f"the server cut established clients' connections {len(cuts)} time(s)")
    return reasons


def reasons_degraded(
    samples: list[Sample], probes: list[ProbeResult], timeline: Timeline, limits: Limits
) -> list[str]:
    reasons = []
    used = resources(samples, timeline.attack_start)
    info = next((s.info for s in samples if s.ok and s.info), {})
    workers = info.get("workers", "unbounded")
    allowance = (
        int(workers) + limits.thread_margin if workers.isdigit() else limits.unbounded_thread_margin
    )
    if used.peak_threads > used.baseline_threads + allowance:
        reasons.append(
            f"threads grew from {used.baseline_threads:.0f} to {used.peak_threads:.0f} "
            f"(bound: {used.baseline_threads:.0f} + {allowance})"
        )
    if used.peak_rss - used.baseline_rss > limits.max_rss_growth_bytes:
        reasons.append(
            f"RSS grew by {(used.peak_rss - used.baseline_rss) / 2**20:.1f} MiB "
            f"(bound: {limits.max_rss_growth_bytes / 2**20:.0f} MiB)"
        )
    start, end = timeline.window
    judged = [p for p in probes if start <= p.at <= end]
    if not judged:
        reasons.append(
            f"no probe was judged under attack: the attack ({end - timeline.attack_start:.0f} s)"
            f" did not outlast the settle time ({timeline.settle:g} s)"
        )
    elif (success := sum(p.ok for p in judged) / len(judged)) < limits.min_probe_success:
        reasons.append(
            f"the probe succeeded {success:.1%} under attack (needs {limits.min_probe_success:.0%})"
        )
    recovered = recovery_time(probes, timeline.attack_end)
    if recovered is None or recovered > limits.recovery_deadline:
        took = "not at all" if recovered is None else f"after {recovered:.1f} s"
        reasons.append(
            f"the probe succeeded again {took} once the attack ended "
            f"(needs {limits.recovery_deadline:g} s)"
        )
    return reasons


def judge_flood(
    samples: list[Sample],
    probes: list[ProbeResult],
    timeline: Timeline,
    limits: Limits,
    established: Sequence[Exchange] = (),
    *,
    watched: str = "metrics",
) -> Summary:
    down = reasons_down(samples, probes, timeline, limits, watched)
    degraded = reasons_degraded(samples, probes, timeline, limits)
    degraded += reasons_established(established, timeline, limits)
    judged_established, cuts = established_view(established, timeline)
    verdict = "down" if down else "degraded" if degraded else "held"
    start, end = timeline.window
    judged = [p for p in probes if start <= p.at <= end]
    latencies = [p.seconds * 1000 for p in judged if p.ok]
    used = resources(samples, timeline.attack_start)
    good = [s for s in samples if s.ok]
    return Summary(
        verdict=verdict,
        reasons=down + degraded,
        baseline_threads=used.baseline_threads,
        peak_threads=used.peak_threads,
        baseline_rss_mb=used.baseline_rss / 2**20,
        peak_rss_mb=used.peak_rss / 2**20,
        probe_success=sum(p.ok for p in judged) / len(judged) if judged else 0.0,
        probe_p50_ms=percentile(latencies, 0.50),
        probe_p99_ms=percentile(latencies, 0.99),
        probes_judged=len(judged),
        window=timeline.window,
        recovered_after=recovery_time(probes, timeline.attack_end),
        restarted=any("restarted" in reason for reason in down),
        scrape_failures=sum(not s.ok for s in samples),
        longest_metrics_silence=longest_silence(samples, timeline.run_end),
        rejected=_growth(good, "rejected"),
        closed=_growth(good, "closed"),
        thread_start_failures=_value_growth(good, "thread_start_failures"),
        listen_overflows=_value_growth(good, "listen_overflows"),
        established_judged=len(judged_established),
        established_success=(
            sum(e.ok for e in judged_established) / len(judged_established)
            if judged_established
            else 0.0
        ),
        established_cuts=len(cuts),
        watched=watched,
        peak_open_fds=max((s.values.get("open_fds", 0.0) for s in good), default=0.0),
    )


def _value_growth(samples: list[Sample], key: str) -> float:
    """How much an unlabelled counter grew over the run (0 when never scraped)."""
    return _increase([s.values[key] for s in samples if key in s.values])


def _growth(samples: list[Sample], field: str) -> dict[str, float]:
    """How much each labelled counter grew over the run (a label not yet shown is 0)."""
    labels = {label for s in samples for label in getattr(s, field)}
    grown = {
        label: _increase([getattr(s, field).get(label, 0.0) for s in samples]) for label in labels
    }
    return {label: value for label, value in sorted(grown.items()) if value}


def _increase(readings: list[float]) -> float:
    """How much a counter grew over successive readings. One lower than the one before
    is a restart (a server's counters start again at 0, a container's network namespace
    too): what it reads then is all growth since, as Prometheus's increase() counts it,
    never a negative number."""
    return sum(
        after - before if after >= before else after
        for before, after in itertools.pairwise(readings)
    )
