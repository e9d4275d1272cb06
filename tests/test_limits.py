"""Resource exhaustion: descriptors, threads and address space run out; the servers live on."""

from __future__ import annotations

import errno
import os
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from harness.launcher import UNDER_AS_LIMIT
from services import procfs
from services.app import Service, server_class
from services.budget import METRICS_CLIENTS, default_cap
from services.models import MODELS
from support import (
    BOUNDED,
    EVENTUALLY,
    LIMITED,
    MODE_IDS,
    MODES,
    ServerProcess,
    config,
    connect,
    echo_once,
    is_served,
    metric,
    open_connections,
    running,
    scrape,
    server_process,
    wait_until,
)


@pytest.mark.faults
@pytest.mark.parametrize("model", list(MODELS))
def test_emfile_in_accept_neither_crashes_nor_spins_and_recovers(
    model: str, tmp_path: Path
) -> None:
    # Started within its descriptor budget, the limit is then cut to 64 under it (as a
    # host's or a container's limit can be), so that accept() itself runs out: about 45
    # descriptors are left for connections, in either dispatch mode.
    args: tuple[str, ...] = ("--model", model, "--workers", "8", "--queue-size", "200")
    args = (*args, "--backlog", "512")
    if "ready" in MODELS[model].dispatch_modes:
        args = (*args, "--max-connections", "1000")
    with server_process(tmp_path, *args) as server:
        resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (64, 64))
        with open_connections(server.address, 150):
            # (No scrapes meanwhile: the metrics port is out of descriptors too.)
            wait_until(lambda: emfile_warnings(server) >= 1, what="EMFILE in accept")
            cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
            # While it lasts, the warning repeats once a second: three more of them are
            # a few seconds of exhaustion, in which a loop retrying at once burns a core.
            wanted = emfile_warnings(server) + 3
            wait_until(lambda: emfile_warnings(server) >= wanted, what="three more warnings")
            cpu, wall = server.cpu_seconds() - cpu_before, time.monotonic() - wall_before
            assert server.process.poll() is None, server.log()
            assert not is_served(server.address, timeout=1.0)
        # Descriptors come back once the flood lets go: served again.
        wait_until(lambda: is_served(server.address), what="service after the flood")
        scraped = scrape(server.metrics_address)
    emfile = metric(scraped, "echo_accept_errors_total", errno="EMFILE")
    assert 1 <= emfile < 200, f"{emfile} EMFILE errors: the accept loop is not backing off"
    assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU in {wall:.1f} s of exhaustion: spinning"


@pytest.mark.parametrize("model", BOUNDED)
def test_metrics_clients_cannot_squeeze_the_echo_cap_out_of_descriptors(
    model: str, tmp_path: Path
) -> None:
    # 400 descriptors: the default cap is what the metrics endpoint's 256 clients and the
    # server's own files leave (128). The metrics port full of idle clients, the echo
    # port at its cap and beyond: a newcomer still gets the place of the idle connection
    # furthest behind. (When the metrics clients were left out of the budget, accept()
    # failed with EMFILE and no one was evicted: newcomers got nothing.)
    limit = 400
    with (
        server_process(
            tmp_path, "--model", model, code=LIMITED, code_args=("RLIMIT_NOFILE", str(limit))
        ) as server,
        open_connections(server.metrics_address, METRICS_CLIENTS),
    ):
        cap = default_cap(limit)
        with open_connections(server.address, cap + 20):
            wait_until(lambda: is_served(server.address, timeout=2.0), what="a newcomer served")
            scraped = scrape(server.metrics_address)
    assert metric(scraped, "echo_connection_capacity") == cap
    assert metric(scraped, "echo_accept_errors_total", errno="EMFILE") == 0
    assert metric(scraped, "echo_connections_closed_total", reason="evicted") >= 20


SOFT_LIMITED = """
import resource, sys
from services.app import main
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.RLIM_INFINITY
    if (hard := resource.getrlimit(resource.RLIMIT_NOFILE)[1]) == resource.RLIM_INFINITY else hard))
sys.exit(main(sys.argv[2:]))
"""


def test_a_soft_descriptor_limit_is_raised_to_the_hard_one_before_the_cap_is_set(
    tmp_path: Path,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with server_process(tmp_path, "--model", "queue", code=SOFT_LIMITED, code_args=("1024",)) as (
        server
    ):
        capacity = metric(scrape(server.metrics_address), "echo_connection_capacity")
    # Left at the soft 1,024, the cap would be 752.
    assert capacity == default_cap(hard)
    assert capacity > default_cap(1024)


def emfile_warnings(server: ServerProcess) -> int:
    return server.log().count("accept failed with EMFILE")


class RefusingListener:
    """A listening socket whose accept system call fails with `code` while `refusing` is set."""

    def __init__(self, real: socket.socket, code: int) -> None:
        self._real = real
        self._code = code
        self.refusing = threading.Event()
        self.refusing.set()

    def _accept(self) -> tuple[int, object]:
        if self.refusing.is_set():
            raise OSError(self._code, os.strerror(self._code))
        return self._real._accept()  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.mark.faults
@pytest.mark.parametrize(
    "code", [errno.EPERM, errno.EPROTO, errno.ECONNABORTED], ids=errno.errorcode.get
)
def test_any_accept_error_that_repeats_is_backed_off_not_spun_on(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(config("queue"))
    listener = RefusingListener(service.server._listener, code)  # type: ignore[arg-type]
    monkeypatch.setattr(service.server, "_listener", listener)
    thread = threading.Thread(target=service.run)
    thread.start()
    name = errno.errorcode[code]
    try:
        with connect(service.address):  # waits in the backlog: the listener stays readable
            wait_until(lambda: errors(service, name) >= 1, what=f"{name} in accept")
            started = time.monotonic()
            wait_until(lambda: errors(service, name) >= 12, what=f"twelve {name}s")
            took = time.monotonic() - started
        listener.refusing.clear()
        assert echo_once(service.address, b"after") == b"after"
    finally:
        service.server.stop()
        thread.join(30)
    # Back-off from 1 ms doubling: eleven more failures take about 2 s, not microseconds.
    assert took >= 0.5, f"eleven {name}s in {took:.3f} s: the accept loop spins"


def errors(service: Service, name: str) -> float:
    return service.registry.get_sample_value("echo_accept_errors_total", {"errno": name}) or 0.0


def test_thread_count_follows_open_connections() -> None:
    with running("threads") as server:
        baseline = server.sample("echo_threads")
        with open_connections(server.address, 100):
            wait_until(lambda: server.sample("echo_worker_threads") == 100, what="100 threads")
            assert server.sample("echo_threads") >= baseline + 100
        wait_until(lambda: server.sample("echo_worker_threads") == 0, what="threads to end")
        wait_until(lambda: server.sample("echo_threads") <= baseline, what="threads to go")


def test_refused_thread_is_counted_and_the_server_keeps_serving(tmp_path: Path) -> None:
    # As root RLIMIT_NPROC does not bind; an address-space limit does. With 8 MiB
    # stacks (the platform's default) 64 MiB of address space holds a few threads, and
    # runs out on a thread's stack with room left for the interpreter: what refusing
    # a thread needs. Exhausted to the last byte (64 KiB stacks, a few hundred threads)
    # CPython itself may abort or wedge; that is the memory-cap flood test's case.
    stacks = ("--stack-size", str(8 * 2**20))
    with server_process(
        tmp_path, "--model", "threads", *stacks, code=UNDER_AS_LIMIT, code_args=("64",)
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


@pytest.mark.parametrize(("model", "mode"), MODES, ids=MODE_IDS)
def test_metrics_answer_while_1000_idle_connections_sit_on_the_echo_port(
    model: str, mode: str, tmp_path: Path
) -> None:
    # Idle timeout off: the counts below must not depend on how fast 1000 connect.
    args = ("--model", model, "--dispatch", mode, "--idle-timeout", "0")
    with server_process(tmp_path, *args) as server:
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


def test_the_accept_queue_and_its_overflows_are_measured() -> None:
    # A server that listens but does not accept yet: completed handshakes queue in the
    # kernel, and past the backlog they are dropped (the SYN-retry stalls of a flood).
    server = server_class(MODELS["executor"])(config("executor", backlog=2))
    server.bind()
    overflows_before = procfs.listen_overflows()
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(server.address, timeout=EVENTUALLY))
        wait_until(lambda: server.accept_queue() == (3, 2), what="three queued in the kernel")
        for _ in range(4):  # past the backlog: their last handshake step is dropped
            late = socket.socket()
            late.setblocking(False)
            late.connect_ex(server.address)
            clients.append(late)
        wait_until(
            lambda: (procfs.listen_overflows() or 0) > (overflows_before or 0),
            what="the kernel to count the overflow",
        )
    finally:
        for client in clients:
            client.close()
        server.close()
    assert overflows_before is not None
    assert server.accept_queue() is None  # closed


@pytest.mark.parametrize("model", list(MODELS))
def test_the_accept_queue_is_exported(model: str) -> None:
    with running(model, backlog=64) as server:
        assert server.sample("echo_accept_queue_capacity") == 64
        assert server.service.registry.get_sample_value("echo_accept_queue") == 0
        assert server.service.registry.get_sample_value("echo_listen_overflows_total") is not None
