"""locust's own master/worker engine: `make load-master` with two `make load-worker`
processes on loopback, and the load's metrics the master exports meanwhile."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.scrape import metric, scrape
from loadtest.exporter import REPORT_KEY, LoadExporter
from services.models import MODELS
from support import FIXED_PORTS, ROOT, running, wait_until

Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def make(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # whole locust processes
@pytest.mark.xdist_group(FIXED_PORTS)
def test_make_load_master_with_two_workers_completes_a_run(tmp_path: Path) -> None:
    # The documented ports (5557, 9646): outside the kernel's ephemeral range, so no
    # server of another test, bound to port 0, can take them between check and use.
    master_port, metrics_port = 5557, 9646
    with contextlib.ExitStack() as stack:
        ports = {m: stack.enter_context(running(m, log_level="INFO")).address[1] for m in MODELS}
        targets = " ".join(f"--{m}-port {ports[m]}" for m in MODELS) + " --think 0.01-0.05"
        master = make(
            "load-master",
            f"MASTER_PORT={master_port}",
            f"LOAD_METRICS_PORT={metrics_port}",
            "EXPECT_WORKERS=2",
            "USERS=6",
            "SPAWN_RATE=6",
            "DURATION=6s",
            f"REPORTS={tmp_path}",
            f"LOAD_ARGS={targets}",
        )
        workers = [
            make("load-worker", f"MASTER=127.0.0.1:{master_port}", f"LOAD_ARGS={targets}")
            for _ in range(2)
        ]
        try:
            address = ("127.0.0.1", metrics_port)
            scraped = wait_until(
                lambda: _requests_seen(address), what="the master to export requests"
            )
            assert metric(scraped, "echo_load_workers") == 2
            output, _ = master.communicate(timeout=120)
            assert master.returncode == 0, output
            for worker in workers:
                assert worker.wait(60) == 0
        finally:
            for process in (master, *workers):
                process.kill()
                process.communicate(timeout=30)
    summary = json.loads((tmp_path / "load-summary.json").read_text())
    assert summary["ok"] is True and summary["workers"] == 2
    assert summary["workers_with_requests"] == 2
    rows = {row["service"]: row for row in summary["services"]}
    assert set(rows) == set(MODELS)
    assert all(row["echoes"] > 0 and not row["failures"] for row in rows.values()), rows
    assert "(2 load process(es))" in output


def _requests_seen(address: tuple[str, int]) -> Scraped | None:
    try:
        scraped = scrape(address, timeout=2.0)
    except OSError:
        return None
    seen = [metric(scraped, "echo_load_requests_total", service=m, kind="echo") for m in MODELS]
    return scraped if all(seen) else None


class Hook:
    """locust's EventHook, as far as the exporter uses it. (Importing locust itself would
    monkey-patch this whole test process with gevent.)"""

    def __init__(self) -> None:
        self._listeners: list[Callable[..., None]] = []

    def add_listener(self, listener: Callable[..., None]) -> None:
        self._listeners.append(listener)

    def fire(self, **kwargs: Any) -> None:
        for listener in self._listeners:
            listener(**kwargs)


def fake_environment() -> Any:
    events = SimpleNamespace(request=Hook(), report_to_master=Hook(), worker_report=Hook())
    return SimpleNamespace(events=events, runner=None)


def test_the_exporter_adds_up_what_workers_report() -> None:
    # Two workers' histograms travel in their reports and add up at the master.
    envs = [fake_environment() for _ in range(3)]
    *_workers, master = [LoadExporter(env) for env in envs]  # the workers only report
    for env, times in ((envs[0], [0.3, 0.3, 40.0]), (envs[1], [2.0])):
        for ms in times:
            env.events.request.fire(
                request_type="echo", name="queue", response_time=ms, response_length=1,
                exception=None, context={},
            )  # fmt: skip
    for client_id, env in (("a", envs[0]), ("b", envs[1])):
        report: dict[str, Any] = {}
        env.events.report_to_master.fire(client_id=client_id, data=report)
        envs[2].events.worker_report.fire(client_id=client_id, data=report)
        assert REPORT_KEY in report
    assert master.reporting_workers == {"a", "b"}
    (family,) = master.histograms.families()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples["echo_load_response_seconds_count", None] == 4
    assert samples["echo_load_response_seconds_bucket", "0.0005"] == 2  # the two 0.3 ms
    assert samples["echo_load_response_seconds_bucket", "0.0025"] == 3  # and 2 ms
    assert samples["echo_load_response_seconds_bucket", "+Inf"] == 4
    # Taken once: a second report carries nothing new.
    again: dict[str, Any] = {}
    envs[0].events.report_to_master.fire(client_id="a", data=again)
    assert again[REPORT_KEY] == []


def test_importing_the_exporter_does_not_import_locust() -> None:
    # Importing locust monkey-patches the process with gevent; the suite must stay clean.
    result = subprocess.run(
        [sys.executable, "-c", "import sys, loadtest.exporter; print('locust' in sys.modules)"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "False", result.stderr
