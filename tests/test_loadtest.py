"""The locust suite: real runs against real servers, and against servers that get echo wrong."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.echo_client import EchoFailure, PayloadSize, classify, exchange
from loadtest.report import LoadGenerator, ServiceRow, Thresholds, judge_load, write_summary
from services.models import MODELS
from support import FIXED_PORTS, ROOT, FaultyEcho, running, wait_until

LOCUST_RUN = pytest.mark.slow  # a whole locust run in a subprocess: not in make test-fast


def run_locust(tmp_path: Path, *args: str, seconds: int = 4) -> tuple[int, dict[str, Any], str]:
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "-t",
            f"{seconds}s",
            "--only-summary",
            "--summary-json",
            str(summary),
            "--think",
            "0.01-0.05",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    document = json.loads(summary.read_text()) if summary.exists() else {}
    return result.returncode, document, result.stderr


@LOCUST_RUN
def test_a_real_run_echoes_on_every_service_without_failures(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        ports = {m: stack.enter_context(running(m, log_level="INFO")).address[1] for m in MODELS}
        code, summary, output = run_locust(
            tmp_path,
            "-u",
            "6",
            "-r",
            "6",
            *(arg for m in MODELS for arg in (f"--{m}-port", str(ports[m]))),
            "--payload",
            "8-70000",
        )
    assert code == 0, output
    assert summary["ok"] is True
    rows = {row["service"]: row for row in summary["services"]}
    assert set(rows) == set(MODELS)
    for row in rows.values():
        assert row["echoes"] > 0
        assert row["failures"] == {}
    assert "result: PASS" in output


@LOCUST_RUN
@pytest.mark.parametrize(
    ("fault", "kind"),
    [("flip", "mismatch"), ("reorder", "mismatch"), ("close", "closed"), ("silent", "timeout")],
)
def test_a_faulty_server_fails_the_run_with_the_right_kind(
    fault: str, kind: str, tmp_path: Path
) -> None:
    with FaultyEcho(fault) as server:
        code, summary, output = run_locust(
            tmp_path,
            "-u",
            "2",
            "-r",
            "2",
            "--executor-port",
            str(server.address[1]),
            "--echo-timeout",
            "1",
            "--max-failure-ratio",
            "0.5",
            "ExecutorUser",
        )
    assert code == 1, output
    assert summary["ok"] is False
    (row,) = summary["services"]
    assert row["failures"].get(kind, 0) > 0, row
    assert set(row["failures"]) == {kind}
    assert "result: FAIL" in output


@LOCUST_RUN
def test_nothing_listening_is_refused(tmp_path: Path) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, not listening: connections are refused
        code, summary, output = run_locust(
            tmp_path, "-u", "1", "-r", "1", "--queue-port", str(port), "QueueUser", seconds=2
        )
    assert code == 1, output
    (row,) = summary["services"]
    assert row["failures"].get("refused", 0) > 0
    assert "no successful echo" in output


@LOCUST_RUN
def test_bad_options_are_refused(tmp_path: Path) -> None:
    code, _, output = run_locust(tmp_path, "-u", "1", "--payload", "3", seconds=1)
    assert code != 0
    assert "payload size '3'" in output


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    with left, right:
        yield left, right


def test_exchange_verifies_every_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"abcdefgh")
    exchange(client, b"abcdefgh")
    server.sendall(b"abcdefgX")
    with pytest.raises(EchoFailure) as failure:
        exchange(client, b"abcdefgh")
    assert failure.value.kind == "mismatch"
    assert "offset 7" in failure.value.detail
    server.sendall(b"abc")
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(EchoFailure, match="closed"):
        exchange(client, b"abcdefgh")


def test_classify_and_payload_parsing() -> None:
    assert classify(TimeoutError()).kind == "timeout"
    assert classify(ConnectionRefusedError()).kind == "refused"
    assert classify(ConnectionResetError()).kind == "reset"
    assert classify(BrokenPipeError()).kind == "reset"
    assert classify(OSError("other")).kind == "error"
    assert PayloadSize.parse("1024") == PayloadSize(1024, 1024)
    assert PayloadSize.parse("64-4096") == PayloadSize(64, 4096)
    for bad in ("x", "4-2", "1", "1-99999999"):
        with pytest.raises(ValueError, match="payload size"):
            PayloadSize.parse(bad)


def test_judge_fails_on_any_mismatch_and_on_the_ratio() -> None:
    def row(echoes: int, failed: int, **failures: int) -> ServiceRow:
        return ServiceRow("queue", echoes, failed, 1, 0, 1.0, 1.0, 1, 1, 1, failures)

    assert judge_load([row(1000, 0)], Thresholds(0.01)).ok
    assert not judge_load([row(1000, 1, mismatch=1)], Thresholds(0.5)).ok
    assert judge_load([row(1000, 5, timeout=5)], Thresholds(0.01)).ok
    assert not judge_load([row(1000, 50, timeout=50)], Thresholds(0.01)).ok
    assert not judge_load([row(0, 0)], Thresholds(0.01)).ok


def test_a_load_generator_over_90_percent_cpu_is_said_in_the_table_and_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [ServiceRow("queue", 100, 0, 1, 0, 50.0, 1.0, 1, 1, 1, {})]
    verdict = judge_load(rows, Thresholds(0.01))
    for limited in (False, True):
        path = tmp_path / f"summary-{limited}.json"
        write_summary(rows, verdict, str(path), LoadGenerator(4, 3, cpu_limited=limited))
        printed = capsys.readouterr().err
        assert "(4 load process(es))" in printed
        assert ("limited by the client" in printed) is limited
        summary = json.loads(path.read_text())
        assert summary["limited_by_load_generator"] is limited
        assert summary["workers"] == 4 and summary["workers_with_requests"] == 3


@LOCUST_RUN
@pytest.mark.xdist_group(FIXED_PORTS)
def test_make_load_against_up_local_lists_all_three_services(tmp_path: Path) -> None:
    log = (tmp_path / "cluster.log").open("wb")
    cluster = subprocess.Popen(
        [sys.executable, "-m", "harness.cluster"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:
        wait_until(
            lambda: "Ctrl-C stops all" in (tmp_path / "cluster.log").read_text(),
            what="up-local to start",
        )
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "load",
                "USERS=6",
                "DURATION=5s",
                f"REPORTS={tmp_path}/reports",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            check=False,
        )
    finally:
        cluster.send_signal(2)
        stopped = cluster.wait(30)
        log.close()
    assert stopped == 0, (tmp_path / "cluster.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    table = output[output.index("== echo load test: per service (") :]
    for model in MODELS:
        assert f"\n{model} " in table
    assert (tmp_path / "reports" / "load.html").exists()
