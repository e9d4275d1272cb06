"""The verdict rules, on synthetic timelines: each rule and every reason it states, in
milliseconds. The live floods (test_flood.py) show that real runs feed it the same shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

import loadtest.breaking
from loadtest.breaking import find_limit, step_settings
from loadtest.floodrun import RunSettings, Target
from loadtest.observe import Exchange, ProbeResult, Sample
from loadtest.verdict import Limits, Timeline, judge_flood

ATTACK = Timeline(attack_start=2.0, attack_end=32.0, run_end=38.0)  # 30 s attack, settle 5 s
MiB = 2**20


def samples(
    timeline: Timeline = ATTACK,
    *,
    threads: Callable[[float], float] = lambda t: 40,
    rss_mb: Callable[[float], float] = lambda t: 20,
    answers: Callable[[float], bool] = lambda t: True,
    start_time: Callable[[float], float] = lambda t: 1000.0,
    workers: str = "32",
) -> list[Sample]:
    """A scrape every 0.5 s over the run."""
    out = []
    for n in range(int(timeline.run_end / 0.5) + 1):
        at = n * 0.5
        if not answers(at):
            out.append(Sample(at, {}, {}, {}, {}))
            continue
        values = {
            "threads": threads(at),
            "rss_bytes": rss_mb(at) * MiB,
            "start_time": start_time(at),
        }
        out.append(Sample(at, values, {}, {}, {"workers": workers}))
    return out


def probes(ok: Callable[[float], bool], timeline: Timeline = ATTACK) -> list[ProbeResult]:
    """A probe every 0.2 s over the run."""
    return [
        ProbeResult(
            at=n * 0.2, ok=ok(n * 0.2), seconds=0.001, failure="" if ok(n * 0.2) else "timeout"
        )
        for n in range(int(timeline.run_end / 0.2) + 1)
    ]


def always(_at: float) -> bool:
    return True


def test_a_server_that_answers_under_attack_and_recovers_is_held() -> None:
    # One probe in 200 fails under attack: 99.5%.
    summary = judge_flood(samples(), probes(lambda t: round(t * 5) % 200 != 100), ATTACK, Limits())
    assert summary.verdict == "held", summary.reasons
    assert 0.99 <= summary.probe_success < 1.0
    assert summary.reasons == []
    assert summary.window == (7.0, 32.0)
    assert summary.recovered_after is not None and summary.recovered_after < 0.5


def exchanges(
    ok: Callable[[float], bool] = always,
    cut: Callable[[float], bool] = lambda t: False,
    timeline: Timeline = ATTACK,
) -> list[Exchange]:
    """Four established clients, a message each every 3 s, staggered, over the run."""
    out = [
        Exchange(at=at, ok=ok(at) and not cut(at), seconds=0.001, client=n, cut=cut(at))
        for n in range(4)
        for at in [n * 0.75 + 3 * k for k in range(int(timeline.run_end / 3) + 1)]
        if at <= timeline.run_end
    ]
    return sorted(out, key=lambda e: e.at)


def test_established_clients_served_throughout_are_held_and_counted() -> None:
    summary = judge_flood(samples(), probes(always), ATTACK, Limits(), exchanges())
    assert summary.verdict == "held", summary.reasons
    assert summary.established_success == 1.0 and summary.established_cuts == 0
    # The window (7-32 s) holds 8-9 messages of each of the four.
    assert 32 <= summary.established_judged <= 36


def test_one_cut_of_an_established_client_is_degraded_though_newcomers_are_served() -> None:
    # What a cap that evicts the quietest does: every newcomer is served, and a client
    # that keeps its connection and pauses between messages is cut.
    summary = judge_flood(
        samples(), probes(always), ATTACK, Limits(), exchanges(cut=lambda t: t == 9.0)
    )
    assert summary.verdict == "degraded"
    assert summary.probe_success == 1.0 and summary.established_cuts == 1
    assert "the server cut established clients' connections 1 time(s)" in summary.reasons


def test_established_clients_refused_under_attack_are_degraded() -> None:
    summary = judge_flood(
        samples(), probes(always), ATTACK, Limits(), exchanges(ok=lambda t: not 10 <= t < 20)
    )
    assert summary.verdict == "degraded" and summary.established_cuts == 0
    assert any(r.startswith("established clients were served in") for r in summary.reasons)


def test_a_cut_before_the_attack_is_not_the_attacks() -> None:
    summary = judge_flood(
        samples(), probes(always), ATTACK, Limits(), exchanges(cut=lambda t: t == 0.75)
    )
    assert summary.verdict == "held" and summary.established_cuts == 0


def test_a_server_whose_defence_acts_only_after_60_s_is_not_held() -> None:
    timeline = Timeline(attack_start=2.0, attack_end=92.0, run_end=98.0)
    summary = judge_flood(
        samples(timeline), probes(lambda t: not 2 <= t < 62, timeline), timeline, Limits()
    )
    assert summary.verdict == "degraded"
    assert summary.window == (7.0, 92.0)  # judged from 5 s in, not from the 60 s timeout
    assert summary.probe_success < 0.5
    assert any("under attack (needs 99%)" in reason for reason in summary.reasons)


def test_refused_clients_under_attack_are_degraded_even_if_it_recovers() -> None:
    summary = judge_flood(samples(), probes(lambda t: not 2 <= t < 32.5), ATTACK, Limits())
    assert summary.verdict == "degraded"
    assert summary.reasons == ["the probe succeeded 0.0% under attack (needs 99%)"]


def test_metrics_silent_for_11_s_is_down() -> None:
    summary = judge_flood(
        samples(answers=lambda t: not 10 <= t < 21), probes(always), ATTACK, Limits()
    )
    assert summary.verdict == "down"
    assert any("metrics did not answer for 11.5 s" in reason for reason in summary.reasons)


def test_metrics_silent_for_9_s_is_not_down() -> None:
    summary = judge_flood(
        samples(answers=lambda t: not 10 <= t < 18.5), probes(always), ATTACK, Limits()
    )
    assert summary.verdict == "held", summary.reasons


def test_metrics_that_never_answer_are_down() -> None:
    summary = judge_flood(samples(answers=lambda t: False), probes(always), ATTACK, Limits())
    assert summary.verdict == "down"
    assert "its metrics never answered" in summary.reasons


def test_a_restart_is_down() -> None:
    summary = judge_flood(
        samples(start_time=lambda t: 1000.0 if t < 20 else 1020.0), probes(always), ATTACK, Limits()
    )
    assert summary.verdict == "down" and summary.restarted
    assert "the process restarted during the run" in summary.reasons


def test_a_probe_still_failing_at_the_end_is_down() -> None:
    summary = judge_flood(samples(), probes(lambda t: t < 2), ATTACK, Limits())
    assert summary.verdict == "down"
    assert "the probe was still failing at the end" in summary.reasons
    assert summary.recovered_after is None


def test_recovering_after_the_deadline_is_degraded() -> None:
    summary = judge_flood(samples(), probes(lambda t: not 31.9 <= t < 37.5), ATTACK, Limits())
    assert summary.verdict == "degraded"
    assert any("succeeded again after 5.6 s" in r for r in summary.reasons), summary.reasons


@pytest.mark.parametrize(
    ("workers", "peak", "verdict"),
    [
        ("32", 40 + 32 + 16, "held"),
        ("32", 40 + 32 + 17, "degraded"),
        ("unbounded", 40 + 65, "degraded"),
    ],
)
def test_threads_must_stay_within_the_pool(workers: str, peak: float, verdict: str) -> None:
    summary = judge_flood(
        samples(threads=lambda t: peak if 2 < t < 32 else 40, workers=workers),
        probes(always),
        ATTACK,
        Limits(),
    )
    assert summary.verdict == verdict, summary.reasons
    if verdict == "degraded":
        assert summary.reasons[0].startswith("threads grew from 40 to")


def test_rss_growth_beyond_the_limit_is_degraded() -> None:
    summary = judge_flood(
        samples(rss_mb=lambda t: 20 + (31 if 2 < t < 32 else 0)), probes(always), ATTACK, Limits()
    )
    assert summary.verdict == "degraded"
    assert summary.reasons == ["RSS grew by 31.0 MiB (bound: 30 MiB)"]


def test_an_attack_shorter_than_the_settle_time_judges_nothing() -> None:
    timeline = Timeline(attack_start=2.0, attack_end=5.0, run_end=11.0)
    summary = judge_flood(samples(timeline), probes(always, timeline), timeline, Limits())
    assert summary.verdict == "degraded"
    assert summary.probes_judged == 0
    assert "did not outlast the settle time (5 s)" in summary.reasons[0]


def test_handshakes_dropped_at_a_full_accept_queue_are_counted_over_the_run() -> None:
    run = samples()
    for sample in run:  # the kernel's counter: 7 before the attack, 7 + 40 a second in it
        sample.values["listen_overflows"] = 7 + 40 * min(max(sample.at - 2.0, 0.0), 30.0)
    summary = judge_flood(run, probes(always), ATTACK, Limits())
    assert summary.listen_overflows == 1200
    assert judge_flood(samples(), probes(always), ATTACK, Limits()).listen_overflows == 0


def test_counters_that_restart_mid_run_count_their_growth_never_a_negative() -> None:
    run = []
    for sample in samples():  # 10 a second; the server restarts at 20 s, its counters too
        counts = 10 * sample.at if sample.at < 20 else 10 * (sample.at - 20)
        sample.values["listen_overflows"] = counts
        # A labelled counter is not shown until it counts again (read as 0); one shown
        # only from 30 s on grew by all it then says.
        closed = {} if 20 <= sample.at < 21 else {"reset": counts}
        rejected = {"at_cap": 5.0} if sample.at >= 30 else {}
        run.append(dataclasses.replace(sample, closed=closed, rejected=rejected))
    summary = judge_flood(run, probes(always), ATTACK, Limits())
    assert summary.listen_overflows == 195 + 180  # up to the restart, and all after it
    assert summary.closed == {"reset": 195 + 180}
    assert summary.rejected == {"at_cap": 5.0}


class FakeFloods:
    """Stands in for `flood` in find_limit: a server that holds up to `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, _target: Target, scenario: str, settings: RunSettings, _p: object) -> Any:
        size = int(settings.rate) if scenario == "churn" else settings.connections
        self.sizes.append(size)
        held = size <= self.limit
        summary = SimpleNamespace(
            verdict="held" if held else "degraded",
            probe_success=1.0 if held else 0.5,
            reasons=[] if held else ["the probe succeeded 50.0% under attack"],
        )
        return SimpleNamespace(summary=summary)


@pytest.mark.parametrize(
    ("limit", "tried", "described"),
    [
        (1000, [250, 500, 1000, 2000], "1000 connections (not 2000)"),
        (100, [250], "holds nothing tried: < 250 connections"),
        (300, [250, 500], "250 connections (not 500)"),
        (10**6, [250, 500, 1000, 2000], ">= 2000 connections (held every step)"),
    ],
)
def test_find_limit_steps_up_and_stops_at_the_first_step_not_held(
    monkeypatch: pytest.MonkeyPatch, limit: int, tried: list[int], described: str
) -> None:
    fake = FakeFloods(limit)
    monkeypatch.setattr(loadtest.breaking, "flood", fake)
    target = Target("queue", ("127.0.0.1", 1), ("127.0.0.1", 2))
    point = find_limit(target, "idle", RunSettings(), [250, 500, 1000, 2000])
    assert fake.sizes == tried
    assert point.describe() == described


def test_find_limit_steps_churn_by_its_rate() -> None:
    settings = step_settings(RunSettings(connections=7), "churn", 300)
    assert (settings.rate, settings.connections) == (300.0, 7)
    assert step_settings(RunSettings(), "idle", 300).connections == 300
