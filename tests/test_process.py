"""The server as a process: signals, the watchdog, bad input, ports in use, `make up-local`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.launcher import services_command
from services import base
from services.base import SHUTDOWN_DEADLINE
from services.models import MODELS
from support import (
    FIXED_PORTS,
    FREEZE_MARGIN,
    ROOT,
    ServerProcess,
    connect,
    echo_once,
    metric,
    open_connections,
    roundtrip,
    scrape,
    server_process,
    wait_until,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_sigterm_exits_0_within_the_deadline_with_clients_connected(
    model: str, tmp_path: Path
) -> None:
    with server_process(tmp_path, "--model", model) as server:
        with open_connections(server.address, 20), connect(server.address) as active:
            assert roundtrip(active, b"before") == b"before"
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.wait(30)
            took = time.monotonic() - started
        assert code == 0, server.log()
        assert took < SHUTDOWN_DEADLINE + FREEZE_MARGIN, f"took {took:.1f} s"
        assert "stopped" in server.log()


def test_sigint_stops_it_too(tmp_path: Path) -> None:
    with server_process(tmp_path, "--model", "queue") as server:
        server.signal(signal.SIGINT)
        assert server.wait(30) == 0


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_port_in_use_is_a_clear_error(flag: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        result = run_cli("--model", "executor", flag, str(port), other, "0")
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "--model: required"),
        (("--model", "fibers"), {}, "--model: 'fibers' is not one of executor, queue, threads"),
        (("--model", "queue", "--workers", "0"), {}, "--workers: must be between 1 and 10000"),
        (("--model", "queue"), {"ECHO_WORKERS": "many"}, "ECHO_WORKERS (environment): 'many'"),
        (("--model", "queue", "--port", "70000"), {}, "--port: 70000 is not a TCP port"),
        (("--model", "queue", "--idle-timeout", "nan"), {}, "--idle-timeout: 'nan'"),
        (("--model", "threads", "--stack-size", "1000"), {}, "--stack-size: must be 0"),
        (("--model", "queue", "--host", "localhost"), {}, "--host: 'localhost' is not an IP"),
        (
            ("--model", "queue", "--dispatch", "connection", "--watchdog-timeout", "5"),
            {},
            "must be longer than --idle-timeout",
        ),
        (("--model", "threads", "--dispatch", "ready"), {}, "--dispatch: threads supports"),
        (("--model", "queue", "--watchdog-timeout", "1"), {}, "must be 0 (off) or at least 3 s"),
        (("--model", "queue", "--bogus"), {}, "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = run_cli(*args, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_names_every_environment_variable() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for var in (
        "MODEL",
        "HOST",
        "PORT",
        "METRICS_PORT",
        "WORKERS",
        "QUEUE_SIZE",
        "IDLE_TIMEOUT",
        "SEND_TIMEOUT",
        "STACK_SIZE",
        "BACKLOG",
        "WATCHDOG_TIMEOUT",
        "LOG_LEVEL",
        "READY_FILE",
        "DISPATCH",
        "MAX_CONNECTIONS",
        "OUTPUT_BUDGET",
        "TURN_MESSAGES",
        "LINGER",
    ):
        assert f"ECHO_{var}" in result.stdout


def test_environment_configures_the_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env_server = ServerProcess(
        services_command(
            code=(
                "import os, sys\n"
                "os.environ.update(ECHO_MODEL='queue', ECHO_PORT='0', ECHO_METRICS_PORT='0',"
                " ECHO_WORKERS='3', ECHO_QUEUE_SIZE='5', ECHO_IDLE_TIMEOUT='7',"
                " ECHO_DISPATCH='connection')\n"
                "from services.app import main\n"
                "sys.exit(main(sys.argv[1:]))\n"  # the launcher's --ready-file
            )
        ),
        log_path=log,
    )
    try:
        env_server.wait_ready()
        assert "workers=3 queue=5 idle_timeout=7.0" in env_server.log()
        scraped = scrape(env_server.metrics_address)
        assert metric(scraped, "echo_worker_threads") == 3
        assert metric(scraped, "echo_queue_capacity") == 5
    finally:
        env_server.close()


@pytest.mark.xdist_group(FIXED_PORTS)
def test_up_local_serves_every_model_on_its_documented_ports(tmp_path: Path) -> None:
    log = (tmp_path / "cluster.log").open("wb")
    cluster = subprocess.Popen(
        [sys.executable, "-m", "harness.cluster"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:
        for port, metrics_port in ((15001, 9101), (15002, 9102), (15003, 9103)):
            wait_until(lambda p=port: _echoes(("127.0.0.1", p)), what=f"echo on {port}")  # type: ignore[misc]
            scraped = scrape(("127.0.0.1", metrics_port))
            assert metric(scraped, "echo_connections_accepted_total") >= 1
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(30) == 0
    finally:
        if cluster.poll() is None:
            cluster.kill()
            cluster.wait(30)
        log.close()
    assert "Ctrl-C stops all 3" in (tmp_path / "cluster.log").read_text()


def _echoes(address: tuple[str, int]) -> bool:
    try:
        return echo_once(address, b"hello", timeout=5) == b"hello"
    except OSError:
        return False


@pytest.mark.xdist_group(FIXED_PORTS)
def test_up_local_refuses_a_busy_port() -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 15002))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "harness.cluster"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert "port already in use: 127.0.0.1:15002 (queue echo)" in result.stderr


def test_the_shutdown_budget_fits_inside_the_promised_deadline() -> None:
    # The drain, the workers' grace and one loop tick, with a second for the last words.
    assert base._DRAIN + base._WORKERS_GRACE + base._TICK + 1.0 <= SHUTDOWN_DEADLINE
