"""Resource exhaustion: descriptors, threads and address space run out; the servers live on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.launcher import UNDER_AS_LIMIT
from services.models import MODELS
from support import (
    is_served,
    metric,
    open_connections,
    running,
    scrape,
    server_process,
    wait_until,
)

LIMITED = """
import resource, sys
from services.app import main
limit = int(sys.argv[2])
resource.setrlimit(getattr(resource, sys.argv[1]), (limit, limit))
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("model", list(MODELS))
def test_emfile_in_accept_neither_crashes_nor_spins_and_recovers(
    model: str, tmp_path: Path
) -> None:
    # 64 descriptors: about 45 are left for connections once Python and metrics are up.
    # (A cap above that, so that accept() itself runs out, in either dispatch mode.)
    args: tuple[str, ...] = ("--model", model, "--workers", "8", "--queue-size", "200")
    args = (*args, "--backlog", "512")
    if "ready" in MODELS[model].dispatch_modes:
        args = (*args, "--max-connections", "1000")
    with server_process(tmp_path, *args, code=LIMITED, code_args=("RLIMIT_NOFILE", "64")) as server:
        with open_connections(server.address, 150):
            wait_until(lambda: "accept failed with EMFILE" in server.log(), what="EMFILE in accept")
            cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
            # Hold the exhaustion a while: a loop that retried at once would burn a core.
            wait_until(lambda: time.monotonic() - wall_before > 3.0, what="3 s to pass")
            cpu = server.cpu_seconds() - cpu_before
            assert server.process.poll() is None, server.log()
            assert not is_served(server.address, timeout=1.0)
        # Descriptors come back once the flood lets go: served again.
        wait_until(lambda: is_served(server.address), what="service after the flood")
        scraped = scrape(server.metrics_address)
    emfile = metric(scraped, "echo_accept_errors_total", errno="EMFILE")
    assert 1 <= emfile < 200, f"{emfile} EMFILE errors: the accept loop is not backing off"
    assert cpu < 1.5, f"{cpu:.2f} s of CPU in 3 s of exhaustion: spinning"


def test_thread_count_follows_open_connections() -> None:
    with running("threads") as server:
        baseline = server.sample("echo_threads")
        with open_connections(server.address, 100):
            wait_until(lambda: server.sample("echo_worker_threads") == 100, what="100 threads")
            assert server.sample("echo_threads") >= baseline + 100
        wait_until(lambda: server.sample("echo_worker_threads") == 0, what="threads to end")
        wait_until(lambda: server.sample("echo_threads") <= baseline, what="threads to go")


def test_refused_thread_is_counted_and_the_server_keeps_serving(tmp_path: Path) -> None:
    # As root RLIMIT_NPROC does not bind; an address-space limit does. With 64 KiB
    # stacks, 64 MiB of address space holds a few hundred connection threads.
    with server_process(
        tmp_path, "--model", "threads", code=UNDER_AS_LIMIT, code_args=("64",)
    ) as server:
        with open_connections(server.address, 2000):
            wait_until(lambda: "cannot start a thread" in server.log(), what="a refused thread")
            assert server.process.poll() is None, server.log()
        wait_until(lambda: is_served(server.address), what="service after the flood")
        scraped = scrape(server.metrics_address)
        failures = metric(scraped, "echo_thread_start_failures_total")
        assert failures >= 1
        refused = metric(scraped, "echo_connections_rejected_total", reason="thread_start_failed")
        assert refused == failures
        assert server.process.poll() is None


MODES = [(name, mode) for name, spec in MODELS.items() for mode in spec.dispatch_modes]


@pytest.mark.parametrize(("model", "mode"), MODES, ids=[f"{m}-{d}" for m, d in MODES])
def test_metrics_answer_while_1000_idle_connections_sit_on_the_echo_port(
    model: str, mode: str, tmp_path: Path
) -> None:
    with server_process(tmp_path, "--model", model, "--dispatch", mode) as server:
        with open_connections(server.address, 1000):
            wait_until(
                lambda: (
                    metric(scrape(server.metrics_address), "echo_connections_accepted_total")
                    >= 1000
                ),
                what="the server to accept all 1000",
            )
            started = time.monotonic()
            scraped = scrape(server.metrics_address, timeout=5.0)
            assert time.monotonic() - started < 5.0
        threads = metric(scraped, "echo_threads")
        if not MODELS[model].bounded:
            assert metric(scraped, "echo_connections_active") == 1000
            assert threads >= 1000
        elif mode == "ready":
            # All admitted, each waiting in the event loop: a descriptor, not a thread.
            assert metric(scraped, "echo_connections_active") == 1000
            assert metric(scraped, "echo_connections", state="waiting") == 1000
            assert threads < 50
        else:
            # 32 workers + 64 waiting are in; the rest were turned away, not piled up.
            assert metric(scraped, "echo_connections_active") == 96
            assert metric(scraped, "echo_connections_rejected_total", reason="queue_full") == 904
            assert threads < 50
