"""Connection floods against local server processes: the bounded pools hold, `threads` does not.

Small pools and short timeouts make the outcomes deterministic and each run short.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.breaking import LIMIT_STEPS, find_limit
from loadtest.flood import FloodRun, RunSettings, Target, flood
from loadtest.observe import Sample
from services.launcher import UNDER_AS_LIMIT
from services.models import MODELS
from support import ROOT, ServerProcess, is_served, server_process, wait_until

pytestmark = [pytest.mark.flood, pytest.mark.timeout(120)]

BOUNDED = ["executor", "queue"]
WORKERS, QUEUE, TIMEOUT = 8, 8, 2.0
RECIPE = ("--dispatch", "connection")  # a connection owns a worker for its whole life
POOL_ARGS = (
    "--workers",
    str(WORKERS),
    "--queue-size",
    str(QUEUE),
    "--idle-timeout",
    str(TIMEOUT),
    "--send-timeout",
    str(TIMEOUT),
)


def target_of(server: ServerProcess, name: str) -> Target:
    return Target(name, server.address, server.metrics_address)


def settings(**overrides: float | bool) -> RunSettings:
    # The probe is judged from 5 s into the attack (the default settle) to its end.
    base = {
        "connections": 1000,
        "rate": 2500.0,
        "duration": 14.0,
        "baseline": 1.0,
    }
    return RunSettings(**{**base, **overrides})  # type: ignore[arg-type]


def during_attack(run: FloodRun) -> list[Sample]:
    return [s for s in run.samples if run.attack_start <= s.at <= run.attack_end]


def assert_bounded_and_serving(run: FloodRun, server: ServerProcess) -> None:
    summary = run.summary
    assert server.process.poll() is None, server.log()
    assert not summary.restarted
    assert summary.peak_threads <= summary.baseline_threads + WORKERS + 8, summary
    assert summary.peak_rss_mb - summary.baseline_rss_mb < 30, summary
    # /metrics answered every scrape (2 s timeout each) while the echo port was flooded.
    assert summary.scrape_failures == 0
    assert all(s.ok for s in during_attack(run))
    assert is_served(server.address)


@pytest.mark.parametrize("model", BOUNDED)
def test_bounded_pool_holds_a_polite_idle_flood_of_5000(model: str, tmp_path: Path) -> None:
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        run = flood(target_of(server, model), "idle", settings(connections=5000, polite=True))
        assert run.counts.replaced == 0
        assert run.counts.opened == 5000
        assert_bounded_and_serving(run, server)
        # Served again within the idle timeout plus a 3 s margin, and from then on.
        served_by = run.attack_start + TIMEOUT + 3
        after = [p for p in run.probes if p.at >= served_by and p.at <= run.attack_end]
        assert after and all(p.ok for p in after), [p for p in after if not p.ok][:5]
        assert run.summary.verdict == "held", run.summary.reasons
        assert run.summary.rejected.get("queue_full", 0) >= 5000 - WORKERS - QUEUE - 10
        # Back to baseline once the flood has gone.
        last = run.samples[-1].values
        assert last["active"] == 0 and last["queue_depth"] == 0
        first = next(s for s in run.samples if s.ok).values
        assert last["open_fds"] <= first["open_fds"] + 2


@pytest.mark.parametrize("model", BOUNDED)
def test_a_reconnecting_idle_flood_pins_a_pool_that_gives_each_connection_a_worker(
    model: str, tmp_path: Path
) -> None:
    """What the idle timeout frees, the attacker takes again at once: legitimate clients
    are refused for the whole attack, though threads and memory stay bounded."""
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        run = flood(target_of(server, model), "idle", settings(connections=500))
        summary = run.summary
        assert run.counts.replaced >= 500, run.counts
        assert summary.closed.get("idle", 0) >= WORKERS, summary
        assert summary.probe_success < 0.99 and summary.verdict == "degraded", summary
        assert_bounded_and_serving(run, server)


@pytest.mark.parametrize("model", BOUNDED)
@pytest.mark.parametrize("scenario", ["slow-reader", "churn"])
def test_the_recipes_pool_survives_slow_readers_and_churn(
    model: str, scenario: str, tmp_path: Path
) -> None:
    # (`ready` dispatch must do more, hold them: the test after this one.)
    args = ("--model", model, *POOL_ARGS, *RECIPE)
    with server_process(tmp_path, *args) as server:
        run = flood(target_of(server, model), scenario, settings(connections=500))
        assert run.counts.opened > 0
        assert_bounded_and_serving(run, server)
        if scenario == "slow-reader":
            assert run.summary.closed.get("slow_reader", 0) >= 1, run.summary


@pytest.mark.parametrize("model", BOUNDED)
@pytest.mark.parametrize("scenario", ["idle", "slowloris", "slow-reader", "churn"])
def test_ready_dispatch_holds_every_reconnecting_flood_with_8_workers(
    model: str, scenario: str, tmp_path: Path
) -> None:
    """Waiting connections wait in the event loop, so the attack never holds a worker: the
    probe is served all through, with threads flat and memory bounded."""
    with server_process(tmp_path, "--model", model, *POOL_ARGS) as server:
        run = flood(
            target_of(server, model), scenario, settings(connections=1000, trickle_interval=1.0)
        )
        summary = run.summary
        assert summary.verdict == "held", (summary.reasons, run.counts)
        assert summary.probe_success >= 0.99
        assert_bounded_and_serving(run, server)
        if scenario == "slow-reader":
            assert summary.closed.get("slow_reader", 0) >= 1, summary


def test_threads_model_grows_a_thread_per_idle_connection(tmp_path: Path) -> None:
    with server_process(tmp_path, "--model", "threads") as server:
        run = flood(target_of(server, "threads"), "idle", settings(connections=2000))
        summary = run.summary
        assert run.counts.opened == 2000
        assert summary.peak_threads >= 0.9 * 2000, summary
        assert summary.peak_rss_mb > summary.baseline_rss_mb + 20, summary
        assert summary.verdict == "degraded"
        assert any("threads grew" in reason for reason in summary.reasons)


def test_threads_model_under_a_memory_cap_fails_the_recorded_way(tmp_path: Path) -> None:
    with server_process(
        tmp_path, "--model", "threads", code=UNDER_AS_LIMIT, code_args=("64",)
    ) as server:
        run = flood(target_of(server, "threads"), "idle", settings(connections=3000))
        summary = run.summary
        if server.process.poll() is None:  # alive: it turned clients away
            attacked = [p for p in run.probes if run.attack_start + 2 < p.at < run.attack_end]
            assert any(not p.ok for p in attacked)
            assert summary.verdict in ("degraded", "down")
            # The refusals are seen: counted in its metrics, or the metrics themselves went
            # dark (hundreds of threads wait on the GIL while every allocation fails).
            dark = summary.longest_metrics_silence > run.settings.limits.max_metrics_silence
            assert summary.thread_start_failures >= 1 or dark, summary
        else:  # or the cap killed it (CPython aborts or crashes when it cannot allocate)
            assert summary.verdict == "down"


@pytest.mark.parametrize("model", ["executor", "queue", "threads"])
def test_slowloris_is_recorded_honestly(model: str, tmp_path: Path) -> None:
    # A byte every second never lets the 2 s idle timeout fire: the recipe's pools are
    # pinned for as long as the attack lasts, while `threads` pays a thread each.
    args = (*POOL_ARGS, *RECIPE) if MODELS[model].bounded else POOL_ARGS
    with server_process(tmp_path, "--model", model, *args) as server:
        run = flood(
            target_of(server, model),
            "slowloris",
            settings(connections=300, trickle_interval=1.0),
        )
        summary = run.summary
        assert server.process.poll() is None
        if summary.probe_success < 0.99:
            assert summary.verdict != "held", summary
        if model == "threads":
            assert summary.peak_threads >= 0.9 * 300
            assert summary.verdict == "degraded"
        else:
            assert summary.closed.get("idle", 0) == 0  # the trickle defeats the idle timeout
            assert summary.probe_success < 0.5 and summary.verdict == "degraded", summary
            wait_until(lambda: is_served(server.address), what="service once the attack ends")


def test_flood_cli_prints_a_table_writes_json_and_checks_the_verdict(tmp_path: Path) -> None:
    with server_process(tmp_path, "--model", "queue", *POOL_ARGS, *RECIPE) as server:
        common = [
            sys.executable,
            "-m",
            "loadtest.flood",
            "--targets",
            "queue",
            "--port",
            str(server.address[1]),
            "--metrics-port",
            str(server.metrics_address[1]),
            "--scenarios",
            "idle",
            "--connections",
            "200",
            "--duration",
            "3",
            "--recovery",
            "5",
            "--settle",
            "0",
            "--quiet",
        ]
        held = subprocess.run(
            [*common, "--expect", "held", "--json", str(tmp_path / "f.json")],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=ROOT,
            check=False,
        )
        down = subprocess.run(
            [*common, "--expect", "down"],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=ROOT,
            check=False,
        )
    assert "scenario" in held.stdout and "queue" in held.stdout
    assert (tmp_path / "f.json").exists()
    # With no settling time the probe is judged while the pool is still full: not held.
    assert held.returncode == 1, held.stdout
    assert down.returncode == 1
    assert "expected every run to be down" in down.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "10.0.0.1"], "loopback addresses only"),
        (["--host", "example.org"], "give a loopback IP address"),
        (["--connections", "20001"], "connections: 1 to 20000"),
        (["--duration", "301"], "duration"),
        (["--targets", "nginx"], "targets: unknown nginx"),
        (["--scenarios", "ddos"], "scenario 'ddos'"),
        (["--targets", "queue", "--via", "network", "--port", "1"], "not --host/--port"),
        (["--via", "network", "--docker-project", "no-such-project"], "no running container"),
    ],
)
def test_flood_cli_refuses_what_it_must_not_do(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.flood", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_find_limit_reports_that_a_tiny_pool_holds_nothing(tmp_path: Path) -> None:
    args = ("--workers", "2", "--queue-size", "2", "--idle-timeout", "2", "--send-timeout", "2")
    with server_process(tmp_path, "--model", "queue", *args, *RECIPE) as server:
        point = find_limit(target_of(server, "queue"), "idle", settings(duration=8.0), LIMIT_STEPS)
    assert point.held is None
    assert [step.size for step in point.steps] == [250]  # stops at the first failure
    assert point.describe() == "holds nothing tried: < 250 connections"
    assert point.failed_at is not None and point.failed_at.verdict != "held"


@pytest.mark.timeout(300)
def test_find_limit_brackets_the_threads_models_limit(tmp_path: Path) -> None:
    # An unbounded server "holds" while its threads stay within 64 of its baseline (the
    # verdict's bound for a server with no pool), here also under an address-space cap.
    with server_process(
        tmp_path, "--model", "threads", code=UNDER_AS_LIMIT, code_args=("64",)
    ) as server:
        point = find_limit(
            target_of(server, "threads"),
            "idle",
            settings(duration=8.0, settle=2.0),
            [16, 32, 128, 512],
        )
    assert point.held == 32, point
    failed = point.failed_at
    assert failed is not None and failed.size == 128, point
    assert any("threads grew" in reason for reason in failed.reasons), failed
    assert point.describe() == "32 connections (not 128)"
