"""Every model, in each of its dispatch modes, echoes every byte, in order, to many clients
at once, and counts it."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import (
    MODE_IDS,
    MODES,
    RunningService,
    connect,
    echo_once,
    recv_exactly,
    roundtrip,
    running,
    send_and_shut,
    wait_until,
)


@pytest.fixture(params=MODES, ids=MODE_IDS, scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[RunningService]:
    model, mode = request.param
    with running(model, dispatch=mode, workers=64, queue_size=512) as handle:
        yield handle


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=st.one_of(st.binary(max_size=4096), st.integers(0, 1 << 20).map(os.urandom)))
def test_echoes_any_payload_byte_exact(server: RunningService, payload: bytes) -> None:
    assert echo_once(server.address, payload) == payload


def test_many_messages_on_one_connection(server: RunningService) -> None:
    with connect(server.address) as sock:
        for size in (1, 7, 1000, 65536, 65537, 300_000):
            payload = os.urandom(size)
            assert roundtrip(sock, payload) == payload


def test_200_concurrent_clients(server: RunningService) -> None:
    failures: list[str] = []
    start = threading.Barrier(200, timeout=60)

    def client(n: int) -> None:
        try:
            with connect(server.address) as sock:
                start.wait()
                for round_ in range(5):
                    payload = struct.pack("!II", n, round_) * (1 + n % 50)
                    if roundtrip(sock, payload) != payload:
                        failures.append(f"client {n} round {round_}: wrong bytes")
        except (OSError, threading.BrokenBarrierError) as error:
            failures.append(f"client {n}: {error!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert failures == []


def test_half_close_echoes_the_rest_then_closes(server: RunningService) -> None:
    payload = os.urandom(200_000)
    with connect(server.address) as sock:
        sock.sendall(payload[:1000])
        assert recv_exactly(sock, 1000) == payload[:1000]
        # Send the rest and half-close without reading: the server must still
        # echo all of it before it closes its side.
        sender = threading.Thread(target=send_and_shut, args=(sock, payload[1000:]))
        sender.start()
        rest = recv_exactly(sock, len(payload))
        sender.join(30)
        assert rest == payload[1000:]
        assert sock.recv(1) == b""  # and then EOF


@pytest.mark.parametrize(("model", "mode"), MODES, ids=MODE_IDS)
def test_abrupt_reset_does_not_kill_the_worker(model: str, mode: str) -> None:
    # One worker: a reset that killed it would leave no one to echo afterwards.
    with running(model, dispatch=mode, workers=1, queue_size=32) as server:
        for _ in range(20):
            sock = connect(server.address)
            sock.sendall(os.urandom(100_000))
            # SO_LINGER 0: close() sends RST instead of FIN, with echoes still unread.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        wait_until(
            lambda: sum(server.stats.snapshot().closed.values()) == 20,
            what="all 20 reset connections to be closed",
        )
        assert echo_once(server.address, b"still alive") == b"still alive"


@pytest.mark.parametrize(("model", "mode"), MODES, ids=MODE_IDS)
def test_metrics_match_the_traffic(model: str, mode: str) -> None:
    with running(model, dispatch=mode, workers=4, queue_size=8) as handle:
        sizes = [0, 1, 5000, 70_000]
        for size in sizes:
            payload = os.urandom(size)
            assert echo_once(handle.address, payload) == payload
        count = len(sizes)
        wait_until(lambda: handle.stats.snapshot().closed["eof"] == count, what="closes")
        total = sum(sizes)
        assert handle.sample("echo_connections_accepted_total") == len(sizes)
        assert handle.sample("echo_connections_closed_total", reason="eof") == len(sizes)
        assert handle.sample("echo_connections_active") == 0
        assert handle.sample("echo_received_bytes_total") == total
        assert handle.sample("echo_sent_bytes_total") == total
        assert handle.sample("echo_messages_total") >= 2  # reads are chunked by the kernel
        assert handle.sample("echo_server_info", model=model, **_info_labels(handle)) == 1
        assert handle.sample("process_open_fds") > 0
        assert handle.sample("echo_threads") >= 2


def _info_labels(handle: RunningService) -> dict[str, str]:
    for family in handle.service.registry.collect():
        if family.name == "echo_server":
            return {k: v for k, v in family.samples[0].labels.items() if k != "model"}
    raise AssertionError("no echo_server_info")


def test_every_scrape_balances_under_load(server: RunningService) -> None:
    """accepted == active + rejected + closed at every instant: in the server's own
    snapshot, and in what one scrape exports (which must read all of them at once)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            for n in range(150):
                payload = b"%d" % n * 50
                if echo_once(server.address, payload) != payload:
                    raise AssertionError(f"echo {n} came back wrong")
        except BaseException as error:
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=traffic)
    thread.start()
    scrapes = 0
    try:
        while not done.is_set() or scrapes == 0:
            s = server.stats.snapshot()
            assert s.accepted == s.active + sum(s.rejected.values()) + sum(s.closed.values())
            assert _scrape_balances(server)
            scrapes += 1
    finally:
        thread.join(60)
    assert not thread.is_alive()
    assert not errors, errors


def _scrape_balances(server: RunningService) -> bool:
    families = {f.name: f for f in server.service.registry.collect()}

    def total(name: str) -> float:
        return sum(s.value for s in families[name].samples if s.name.endswith("_total"))

    accepted = total("echo_connections_accepted")
    active = families["echo_connections_active"].samples[0].value
    ended = total("echo_connections_rejected") + total("echo_connections_closed")
    return bool(accepted == active + ended)
