"""Connection floods against local server processes: the bounded pools hold, `threads` does not.

`make test` floods once per claim; the cases marked `matrix` are the rest of the full
matrix (every model, dispatch mode and scenario), which `make test-floods` runs too.
Small pools and 2 s timeouts make the outcomes deterministic and each run short; why
these windows still judge is in docs/testing.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet

from harness.launcher import UNDER_AS_LIMIT
from loadtest.attacks import AT_THE_CAP, SCENARIOS
from loadtest.breaking import LIMIT_STEPS, find_limit
from loadtest.flood import FloodRun, RunSettings, Target
from loadtest.observe import Sample
from services.budget import default_cap
from support import (
    BOUNDED,
    LIMITED,
    ROOT,
    UNBOUNDED,
    UNBOUNDED_BREAKERS,
    Flooder,
    ServerProcess,
    assert_landed,
    is_served,
    metric,
    ready_holds,
    scrape,
    server_process,
    wait_until,
)

pytestmark = [pytest.mark.flood, pytest.mark.timeout(120)]

WORKERS, QUEUE, TIMEOUT = 8, 8, 2.0
CONNECTIONS = 1000
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
# Scenarios in which a ready pool cuts attackers (a timeout, the metrics endpoint's
# deadline and client cap) or the attacker cuts itself (churn): a reconnecting attack
# must have replaced connections there, or it did not keep its count.
CUT = ("idle", "slow-reader", "churn", "metrics-slowloris", *AT_THE_CAP)
# A cap above the floods' 1,000 connections: only cap-steer and botnet, which size
# themselves past the cap, reach it.
CAP = ("--max-connections", "1200")


def settings(**overrides: float | bool) -> RunSettings:
    # Judged from 3 s into the attack (1,000 connections land in 0.4 s, and one 2 s
    # timeout has cut the first of them) to its end: 6 s, 30 probes, 3 timeouts.
    base = {
        "connections": CONNECTIONS,
        "rate": 2500.0,
        "duration": 9.0,
        "baseline": 1.0,
        "settle": 3.0,
        "think": 1.0,  # the established clients' pause: half the 2 s idle timeout
    }
    return RunSettings(**{**base, **overrides})  # type: ignore[arg-type]


def cases(
    models: list[str], scenarios: list[str], every_model: tuple[str, ...] = ()
) -> list[ParameterSet]:
    """Every model x scenario. `make test` floods one model per scenario, alternating by
    scenario (every model for those in `every_model`); the rest are marked `matrix`."""
    out = []
    for scenario in scenarios:
        n = SCENARIOS.index(scenario)
        chosen = models if scenario in every_model else [models[n % len(models)]]
        for model in models:
            marks = () if model in chosen else (pytest.mark.matrix,)
            out.append(pytest.param(model, scenario, marks=marks, id=f"{scenario}-{model}"))
    return out


def target_of(server: ServerProcess, name: str) -> Target:
    return Target(name, server.address, server.metrics_address)


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


@pytest.mark.parametrize(
    ("model", "scenario"),
    cases(BOUNDED, [s for s in SCENARIOS if s != "fd-squeeze"], ("metrics-slowloris",)),
)
def test_ready_dispatch_holds_every_reconnecting_flood_with_8_workers(
    model: str, scenario: str, tmp_path: Path, flooder: Flooder
) -> None:
    """Waiting connections wait in the event loop, so the attack never holds a worker: the
    probe is served all through, with threads flat and memory bounded."""
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *CAP) as server:
        run = flooder(target_of(server, model), scenario, settings(trickle_interval=1.0))
        summary = run.summary
        assert_landed(run, held=ready_holds(scenario, CONNECTIONS), cut=scenario in CUT)
        assert summary.verdict == "held", (summary.reasons, run.counts)
        assert summary.probe_success >= 0.99
        assert summary.established_success >= 0.99 and summary.established_cuts == 0
        assert_bounded_and_serving(run, server)
        if scenario == "slow-reader":
            assert summary.closed.get("slow_reader", 0) >= 1, summary


@pytest.mark.parametrize(("model", "scenario"), cases(BOUNDED, ["fd-squeeze"]))
def test_with_1024_descriptors_a_full_metrics_port_does_not_squeeze_the_cap_out(
    model: str, scenario: str, tmp_path: Path, flooder: Flooder
) -> None:
    """A common host default: 1,024 descriptors, soft and hard, so the cap is what the
    metrics endpoint's clients and the server's own files leave (752). The metrics port
    is held full past its client cap while the echo port is held past its cap: no
    accept() fails for want of a descriptor, and newcomers still take the place of
    those behind the minimum rate."""
    limit = 1024
    args = ("--model", model, *POOL_ARGS)
    nofile = ("RLIMIT_NOFILE", str(limit))
    with server_process(tmp_path, *args, code=LIMITED, code_args=nofile) as server:
        assert metric(scrape(server.metrics_address), "echo_connection_capacity") == default_cap(
            limit
        )
        run = flooder(target_of(server, model), scenario, settings(trickle_interval=1.0))
        summary = run.summary
        assert_landed(run, held=default_cap(limit), cut=True)
        assert summary.verdict == "held", (summary.reasons, run.counts)
        assert summary.established_success >= 0.99 and summary.established_cuts == 0
        assert summary.closed.get("evicted", 0) >= 1, summary
        assert_bounded_and_serving(run, server)
        errors = scrape(server.metrics_address)
        assert metric(errors, "echo_accept_errors_total", errno="EMFILE") == 0


@pytest.mark.parametrize(("model", "scenario"), cases(BOUNDED, ["idle"]))
def test_a_reconnecting_idle_flood_pins_a_pool_that_gives_each_connection_a_worker(
    model: str, scenario: str, tmp_path: Path, flooder: Flooder
) -> None:
    """The recipe's design: what the idle timeout frees, the attacker takes again at once,
    so legitimate clients are refused for the whole attack, though threads and memory
    stay bounded."""
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        run = flooder(target_of(server, model), scenario, settings(connections=500))
        summary = run.summary
        assert_landed(run, held=WORKERS + QUEUE, cut=True)
        assert summary.closed.get("idle", 0) >= WORKERS, summary
        assert summary.probe_success < 0.99 and summary.verdict == "degraded", summary
        assert_bounded_and_serving(run, server)


@pytest.mark.matrix
@pytest.mark.parametrize("model", BOUNDED)
def test_the_recipes_pool_holds_a_polite_idle_flood_of_5000(
    model: str, tmp_path: Path, flooder: Flooder
) -> None:
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        run = flooder(target_of(server, model), "idle", settings(connections=5000, polite=True))
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
        first = next(s for s in run.samples if s.ok).values

        def drained() -> bool:
            now = scrape(server.metrics_address)
            return (
                metric(now, "echo_connections_active") == 0
                and metric(now, "echo_queue_depth") == 0
                and metric(now, "process_open_fds") <= first["open_fds"] + 2
            )

        wait_until(drained, what="connections and descriptors back to their baseline")


@pytest.mark.matrix
@pytest.mark.parametrize("model", BOUNDED)
@pytest.mark.parametrize("scenario", ["slow-reader", "churn"])
def test_the_recipes_pool_survives_slow_readers_and_churn(
    model: str, scenario: str, tmp_path: Path, flooder: Flooder
) -> None:
    args = ("--model", model, *POOL_ARGS, *RECIPE)
    with server_process(tmp_path, *args) as server:
        run = flooder(target_of(server, model), scenario, settings(connections=500))
        assert_landed(run, held=0 if scenario == "churn" else WORKERS + QUEUE, cut=True)
        assert_bounded_and_serving(run, server)
        if scenario == "slow-reader":
            assert run.summary.closed.get("slow_reader", 0) >= 1, run.summary


@pytest.mark.matrix
@pytest.mark.parametrize("model", BOUNDED)
def test_slowloris_pins_the_recipes_pool(model: str, tmp_path: Path, flooder: Flooder) -> None:
    # A byte every second never lets the 2 s idle timeout fire: the recipe's pools are
    # pinned for as long as the attack lasts.
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        run = flooder(
            target_of(server, model), "slowloris", settings(connections=300, trickle_interval=1.0)
        )
        summary = run.summary
        assert server.process.poll() is None
        assert summary.closed.get("idle", 0) == 0  # the trickle defeats the idle timeout
        assert summary.probe_success < 0.5 and summary.verdict == "degraded", summary
        wait_until(lambda: is_served(server.address), what="service once the attack ends")


@pytest.mark.parametrize("model", UNBOUNDED)
@pytest.mark.parametrize(
    "scenario",
    [s if s == "idle" else pytest.param(s, marks=pytest.mark.matrix) for s in UNBOUNDED_BREAKERS],
)
def test_the_threads_model_grows_a_thread_per_connection(
    model: str, scenario: str, tmp_path: Path, flooder: Flooder
) -> None:
    # Locally nothing caps its threads: each attacking connection costs one, and the
    # verdict sees them grow. (In the containers the pid limit stops it: test_compose.)
    size = 2000
    with server_process(tmp_path, "--model", model) as server:
        run = flooder(
            target_of(server, model), scenario, settings(connections=size, trickle_interval=1.0)
        )
        summary = run.summary
        assert_landed(run, held=size, cut=False)  # it has no timeouts: it cuts nothing
        assert summary.peak_threads >= 0.9 * size, summary
        assert summary.verdict == "degraded", summary
        assert any("threads grew" in reason for reason in summary.reasons)


def test_threads_model_under_a_memory_cap_fails_the_recorded_way(
    tmp_path: Path, flooder: Flooder
) -> None:
    (model,) = UNBOUNDED
    with server_process(tmp_path, "--model", model, code=UNDER_AS_LIMIT, code_args=("64",)) as (
        server
    ):
        run = flooder(target_of(server, model), "idle", settings(connections=3000))
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


def test_flood_cli_prints_a_table_writes_json_and_checks_the_verdict(tmp_path: Path) -> None:
    model = BOUNDED[-1]
    with server_process(tmp_path, "--model", model, *POOL_ARGS, *RECIPE) as server:
        common = [
            sys.executable,
            "-m",
            "loadtest.flood",
            "--targets",
            model,
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
    assert "scenario" in held.stdout and model in held.stdout
    assert (tmp_path / "f.json").exists()
    # With no settling time the probe is judged while the pool is still full: not held.
    assert held.returncode == 1, held.stdout
    assert down.returncode == 1
    assert "expected every run to be down" in down.stdout


@pytest.mark.matrix
@pytest.mark.parametrize("model", BOUNDED)
def test_find_limit_reports_that_a_tiny_pool_holds_nothing(model: str, tmp_path: Path) -> None:
    args = ("--workers", "2", "--queue-size", "2", "--idle-timeout", "2", "--send-timeout", "2")
    with server_process(tmp_path, "--model", model, *args, *RECIPE) as server:
        point = find_limit(target_of(server, model), "idle", settings(duration=8.0), LIMIT_STEPS)
    assert point.held is None
    assert [step.size for step in point.steps] == [250]  # stops at the first failure
    assert point.describe() == "holds nothing tried: < 250 connections"
    assert point.failed_at is not None and point.failed_at.verdict != "held"


@pytest.mark.timeout(300)
def test_find_limit_brackets_the_threads_models_limit(tmp_path: Path) -> None:
    # An unbounded server "holds" while its threads stay within 64 of its baseline (the
    # verdict's bound for a server with no pool), here also under an address-space cap.
    (model,) = UNBOUNDED
    with server_process(
        tmp_path, "--model", model, code=UNDER_AS_LIMIT, code_args=("64",)
    ) as server:
        point = find_limit(
            target_of(server, model),
            "idle",
            settings(duration=6.0, settle=2.0),
            [16, 32, 128, 512],
        )
    assert point.held == 32, point
    failed = point.failed_at
    assert failed is not None and failed.size == 128, point
    assert any("threads grew" in reason for reason in failed.reasons), failed
    assert point.describe() == "32 connections (not 128)"
