"""Hung workers, a frozen process, a stderr nobody reads: the watchdog trips on real
hangs only, and the process always exits, within its deadline."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socket import socket as socket_type

import pytest

from harness.launcher import services_command
from services.base import SHUTDOWN_DEADLINE
from support import (
    BOUNDED,
    EVENTUALLY,
    FREEZE_MARGIN,
    MODE_IDS,
    MODES,
    ROOT,
    UNBOUNDED,
    ServerProcess,
    connect,
    metric,
    roundtrip,
    scrape,
    server_process,
    wait_until,
)

pytestmark = pytest.mark.slow  # each waits seconds for a watchdog or a deadline

HANG_WORKERS = """
import sys, threading
import services.dispatch
# A worker that never returns and never makes progress: the hang to detect, in either
# dispatch mode.
import services.ready
services.dispatch.echo = lambda *args, **kwargs: threading.Event().wait()
services.ready.echo_turn = lambda *args, **kwargs: threading.Event().wait()
from services.app import main
sys.exit(main(sys.argv[1:]))
"""

# One worker, two waiting, 1 s timeouts: a hang shows within seconds.
ONE_WORKER = ("--workers", "1", "--queue-size", "2", "--idle-timeout", "1", "--send-timeout", "1")
WATCHDOG = 3.0  # the shortest allowed


def _metric_or_zero(server: ServerProcess, name: str) -> float:
    try:
        return metric(scrape(server.metrics_address), name)
    except OSError:
        return 0.0


@pytest.mark.parametrize("mode", ["ready", "connection"])
@pytest.mark.parametrize("model", BOUNDED)
def test_watchdog_detects_hung_workers_and_exits_non_zero(
    model: str, mode: str, tmp_path: Path
) -> None:
    # (The process exits as it trips: that the metric says so is test_watchdog's.)
    args = ("--model", model, "--dispatch", mode, *ONE_WORKER, "--watchdog-timeout", "3")
    with (
        server_process(tmp_path, *args, code=HANG_WORKERS) as server,
        connect(server.address) as hung,
        connect(server.address) as waiting,
    ):
        hung.sendall(b"x")
        waiting.sendall(b"y")
        code = server.wait(EVENTUALLY)
    assert code == 70, server.log()
    # Ready dispatch: the leader's own lane (the waiting client's event is in the kernel),
    # or the workers' if the leader took both events in one batch (the other queued).
    lane, pending = ("(leader|workers)", "[12]") if mode == "ready" else ("workers", "1")
    made_no_progress = rf"watchdog: {lane} made no progress for [\d.]+ s with {pending} waiting"
    assert re.search(made_no_progress, server.log())


HANG_ACCEPT_LOOP = """
import sys, threading
import services.base
# The event loop hangs on the first connection it admits: no worker is involved, so
# this is the one lane that can trip for a server without a pool.
services.base.Server._admit = lambda self, conn: threading.Event().wait()
from services.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("model", UNBOUNDED)
def test_watchdog_detects_a_hung_accept_loop_and_exits_non_zero(model: str, tmp_path: Path) -> None:
    args = ("--model", model, "--watchdog-timeout", str(WATCHDOG))
    with (
        server_process(tmp_path, *args, code=HANG_ACCEPT_LOOP) as server,
        connect(server.address),
    ):
        code = server.wait(EVENTUALLY)
    assert code == 70, server.log()
    assert re.search(r"watchdog: accept loop made no progress for [\d.]+ s", server.log())


def test_watchdog_leaves_a_busy_but_healthy_server_alone_for_twice_its_timeout(
    tmp_path: Path,
) -> None:
    # The only worker echoes nonstop for one client while another waits for it: work
    # waits for twice the watchdog's timeout, but the worker makes progress all along.
    args = ("--model", "queue", "--dispatch", "connection", *ONE_WORKER)
    with (
        server_process(tmp_path, *args, "--watchdog-timeout", "3") as server,
        connect(server.address) as pinger,
        connect(server.address),
        _pinging(pinger),
    ):
        wait_until(
            lambda: metric(scrape(server.metrics_address), "echo_queue_depth") == 1,
            what="a connection queued behind the busy one",
        )
        queued = time.monotonic()
        wait_until(
            lambda: time.monotonic() - queued > 2 * WATCHDOG or server.process.poll() is not None,
            what="twice the timeout with work waiting",
        )
        assert metric(scrape(server.metrics_address), "echo_queue_depth") == 1
        assert _metric_or_zero(server, "echo_watchdog_tripped") == 0
        assert server.process.poll() is None, server.log()


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_a_stopped_process_is_not_killed_by_its_watchdog_when_it_wakes(
    load: str, tmp_path: Path
) -> None:
    # SIGSTOP for more than twice the timeout: on waking, every lane looks stalled until
    # its thread runs again. The watchdog sees its own check was late and starts over.
    args = ("--model", "queue", "--dispatch", "connection", *ONE_WORKER)
    with (
        server_process(tmp_path, *args, "--watchdog-timeout", "3") as server,
        contextlib.ExitStack() as stack,
    ):
        if load == "busy":  # the worker echoes nonstop while another client queues
            pinger = stack.enter_context(connect(server.address))
            stack.enter_context(connect(server.address))
            stack.enter_context(_pinging(pinger))
            wait_until(
                lambda: metric(scrape(server.metrics_address), "echo_queue_depth") == 1,
                what="a connection queued behind the busy one",
            )
        server.signal(signal.SIGSTOP)
        try:
            # The freeze: polled until the kernel has shown the process stopped (state T)
            # for more than twice the timeout.
            stopped_at = wait_until(lambda: _stopped(server) and time.monotonic(), what="stop")
            wait_until(
                lambda: _stopped(server) and time.monotonic() - stopped_at > 2 * WATCHDOG + 1,
                what="twice the timeout stopped",
            )
        finally:
            server.signal(signal.SIGCONT)
        woke = time.monotonic()
        wait_until(
            lambda: _metric_or_zero(server, "echo_watchdog_freezes_total") >= 1,
            what="the watchdog to notice it was stopped",
        )
        wait_until(
            lambda: time.monotonic() - woke > 2 * WATCHDOG or server.process.poll() is not None,
            what="two timeouts after waking",
        )
        assert server.process.poll() is None, server.log()
        assert _metric_or_zero(server, "echo_watchdog_tripped") == 0


@contextlib.contextmanager
def _pinging(sock: socket_type) -> Iterator[None]:
    """Echo nonstop on `sock` from a thread until the block ends."""
    done = threading.Event()
    errors: list[BaseException] = []

    def ping() -> None:
        try:
            for _ in range(1_000_000):  # bounded; ends when the test is done
                if done.is_set():
                    return
                assert roundtrip(sock, b"ping") == b"ping"
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=ping)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(30)
    assert not errors, errors


@pytest.mark.parametrize(("model", "mode"), MODES, ids=MODE_IDS)
def test_sigterm_ends_a_process_with_a_hung_worker_within_the_deadline(
    model: str, mode: str, tmp_path: Path
) -> None:
    args = ("--model", model, "--dispatch", mode, "--watchdog-timeout", "0")
    with (
        server_process(tmp_path, *args, code=HANG_WORKERS) as server,
        connect(server.address) as client,
    ):
        client.sendall(b"x")
        # Ready dispatch: a turn on the leader is counted busy only once it lingers; the
        # turn's start is timed (dispatch wait) just before it hangs.
        hung = "echo_dispatch_wait_seconds_count" if mode == "ready" else "echo_workers_busy"
        wait_until(
            lambda: metric(scrape(server.metrics_address), hung) == 1,
            what="a worker to hang on the connection",
        )
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait(30)
        took = time.monotonic() - started
    assert code == 1, server.log()
    assert "workers still busy" in server.log()
    assert took < SHUTDOWN_DEADLINE + FREEZE_MARGIN, f"took {took:.1f} s"


SPAM_STDERR = HANG_WORKERS.replace(
    "from services.app import main",
    """import logging
import services.app
def spam():
    for _ in range(10_000_000):  # until a full stderr pipe blocks it, holding the lock
        logging.getLogger("echo.spam").warning("x" * 200)
def write_ready_file(*args):
    write(*args)
    threading.Thread(target=spam, daemon=True).start()
write = services.app.write_ready_file
services.app.write_ready_file = write_ready_file
from services.app import main""",
)


def test_the_watchdog_exits_even_when_stderr_blocks(tmp_path: Path) -> None:
    # A log handler blocked on a pipe nobody reads holds the logging lock for good;
    # the watchdog's exit must not wait for it.
    ready = tmp_path / "ready.json"
    command = services_command(
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--model",
        "queue",
        "--dispatch",
        "connection",
        *ONE_WORKER,
        "--watchdog-timeout",
        "3",
        "--ready-file",
        str(ready),
        code=SPAM_STDERR,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        fcntl.fcntl(process.stderr, fcntl.F_SETPIPE_SZ, 4096)
        wait_until(ready.exists, what="the server to be ready")
        host, port = json.loads(ready.read_text())["echo"]
        address = (host, port)
        with connect(address) as hung, connect(address) as waiting:
            hung.sendall(b"x")
            waiting.sendall(b"y")
            code = process.wait(60)
        assert code == 70
    finally:
        process.kill()
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()


def _stopped(server: ServerProcess) -> bool:
    """The kernel has the process stopped (SIGSTOP): state T in /proc."""
    stat = Path(f"/proc/{server.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"
