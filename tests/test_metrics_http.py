"""The metrics endpoint keeps answering Prometheus while clients try to starve it."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import services.metrics_http
from services.base import SHUTDOWN_DEADLINE
from services.metrics_http import BODY_REUSE, MAX_CONNECTIONS, REQUEST_DEADLINE
from support import (
    ESTABLISHED,
    EVENTUALLY,
    FREEZE_MARGIN,
    held_open,
    running,
    scrape,
    server_end,
    server_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


@contextlib.contextmanager
def trickling_requests(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send an HTTP request a byte a second and never finish it."""
    socks = [socket.create_connection(address, timeout=EVENTUALLY) for _ in range(count)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        while not stop.wait(1.0):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join(EVENTUALLY)
        for sock in socks:
            sock.close()


def test_100_slow_clients_do_not_blind_prometheus_and_sigterm_still_exits(
    tmp_path: Path,
) -> None:
    with (
        server_process(tmp_path, "--model", "queue") as server,
        trickling_requests(server.metrics_address, 100),
    ):
        results = []
        deadline = time.monotonic() + 2 * REQUEST_DEADLINE  # each client cut twice over
        while time.monotonic() < deadline:  # back to back: stricter than every 0.5 s
            try:
                scrape(server.metrics_address, timeout=2.0)
                results.append(True)
            except OSError:
                results.append(False)
        assert sum(results) / len(results) >= 0.99, f"{sum(results)}/{len(results)} scrapes"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(EVENTUALLY) == 0, server.log()
        assert time.monotonic() - started < SHUTDOWN_DEADLINE + FREEZE_MARGIN


def test_a_request_that_never_ends_is_closed_after_the_deadline() -> None:
    with (
        running("queue") as server,
        socket.create_connection(server.service.metrics_address) as sock,
    ):
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        wait_until(lambda: not held_open(sock), what="the unfinished request to be closed")
        assert time.monotonic() - started >= REQUEST_DEADLINE - 1.0


def test_more_clients_than_the_cap_push_out_the_oldest() -> None:
    with running("queue") as server:
        address = server.service.metrics_address
        socks = [socket.create_connection(address) for _ in range(MAX_CONNECTIONS + 10)]
        try:
            wait_until(lambda: not held_open(socks[0]), what="the oldest to be pushed out")
            assert held_open(socks[-1])
            assert scrape(address)  # and a real scrape still gets through
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        # Exactly the cap, so that every byte sent is read before the close (no reset).
        (b"GET /metrics HTTP/1.1\r\nX-Big: ".ljust(8192, b"a"), 431),
    ],
)
def test_bad_requests_get_a_status_not_a_hang(request_bytes: bytes, status: int) -> None:
    with (
        running("queue") as server,
        socket.create_connection(server.service.metrics_address, timeout=EVENTUALLY) as sock,
    ):
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:80]


def test_a_request_with_bare_lf_line_ends_is_answered() -> None:
    with (
        running("queue") as server,
        socket.create_connection(server.service.metrics_address, timeout=EVENTUALLY) as sock,
    ):
        sock.sendall(b"GET /metrics HTTP/1.1\nHost: x\n\n")
        status, body = read_response(sock)
        assert status == 200 and b"echo_connections_accepted_total" in body


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read a whole response (to the server's end): its status and its body, which must
    be as long as its Content-Length says."""
    sock.settimeout(EVENTUALLY)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    lengths = [int(line.split(b":")[1]) for line in lines if line.startswith(b"Content-Length")]
    assert lengths, f"not a response: {reply[:80]!r}"
    assert len(body) == lengths[0], f"{len(body)} of {lengths[0]} body bytes"
    return int(lines[0].split()[1]), body


def test_a_response_is_not_destroyed_by_a_reset_when_request_bytes_are_left_unread() -> None:
    # The client sends a body the server never reads, and reads the response only after
    # the server is done with it; with a tiny receive window most of the response is
    # still in the server's send queue then. close() with unread bytes resets the
    # connection and throws that queue away: the client got 1,932 of 6,338 bytes.
    with running("queue") as server, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(server.service.metrics_address)
        ports = sock.getsockname()[1], server.service.metrics_address[1]
        sock.sendall(b"GET /metrics HTTP/1.1\r\nContent-Length: 20000\r\n\r\n" + b"b" * 20000)
        wait_until(
            lambda: (server_end(*ports) or ("gone",))[0] != ESTABLISHED,
            what="the server to finish",
        )
        status, body = read_response(sock)
        assert status == 200 and b"echo_connections_accepted_total" in body


def test_at_the_cap_a_client_with_a_whole_request_is_pushed_out_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = b"# padding\n" * 400_000  # 4 MB: more than the kernel takes while no one reads
    monkeypatch.setattr(services.metrics_http, "generate_latest", lambda _registry: big)
    with running("queue") as server, socket.socket() as served:
        address = server.service.metrics_address
        served.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        served.connect(address)
        served.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_until(lambda: served.recv(1, socket.MSG_PEEK), what="the response to start")
        # The served client is the oldest; these are newer and have sent nothing.
        idle = [socket.create_connection(address) for _ in range(MAX_CONNECTIONS + 10)]
        try:
            wait_until(lambda: not held_open(idle[0]), what="the oldest idle to be pushed out")
            status, body = read_response(served)
            assert status == 200 and body == big
        finally:
            for sock in idle:
                sock.close()


def test_back_to_back_scrapes_reuse_one_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    renders = []
    real = generate_latest

    def counted(registry: CollectorRegistry) -> bytes:
        renders.append(time.monotonic())
        return real(registry)

    monkeypatch.setattr(services.metrics_http, "generate_latest", counted)
    with running("queue") as server:
        started = time.monotonic()
        for _ in range(50):
            assert scrape(server.service.metrics_address)
        elapsed = time.monotonic() - started
    # Once per BODY_REUSE at most (and once to begin with), however fast the scrapes come.
    assert len(renders) <= 2 + elapsed / BODY_REUSE, (len(renders), elapsed)


def test_both_paths_serve_the_metrics() -> None:
    with running("queue") as server:
        host, port = server.service.metrics_address
        for path in ("/", "/metrics"):
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as reply:
                assert b"echo_connections_accepted_total" in reply.read()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=5)
