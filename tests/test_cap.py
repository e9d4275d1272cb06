"""At the connection cap (`ready` dispatch): a newcomer takes the place only of a connection
that is not worth it, never one in a worker or with an echo in flight, never one that
keeps to the minimum rate; with no one to make room, the newcomer is refused."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from services.connection import Connection, served_first, worth_until
from support import (
    BOUNDED,
    EVENTUALLY,
    connect,
    held_open,
    is_served,
    open_connections,
    recv_exactly,
    roundtrip,
    running,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

MIN_RATE = 240


def test_a_client_that_keeps_to_the_minimum_rate_never_falls_behind() -> None:
    admitted = 100.0
    for seconds in (1, 10, 100, 1000):
        now = admitted + seconds
        # 1 KiB every 3 s (341 B/s), the first at once: always ahead.
        assert worth_until(admitted, 1024 * (seconds // 3 + 1), MIN_RATE) > now
        # A byte a second keeps a connection fresh, not ahead: behind from the start.
        assert worth_until(admitted, seconds, MIN_RATE) < now
    # Of two that are behind, the newer goes last: it has had less time to send.
    assert worth_until(admitted, 0, MIN_RATE) < worth_until(admitted + 1, 0, MIN_RATE)


def test_under_load_those_behind_the_rate_wait_and_newcomers_and_payers_do_not() -> None:
    with socket.socket() as sock:
        conn = Connection(sock, now=100.0)
        assert served_first(conn, MIN_RATE, 200.0)  # a newcomer's first message
        conn.received = 30  # a byte every few seconds: behind since 100.125
        assert not served_first(conn, MIN_RATE, 200.0)
        assert served_first(conn, 0, 200.0)  # no minimum rate: no one waits for it
        conn.received = 1024 * 34  # 1 KiB every 3 s: ahead
        assert served_first(conn, MIN_RATE, 200.0)


@contextlib.contextmanager
def paying(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that have each sent (and had echoed) 64 KiB: worth their place
    for 64 KiB / 240 B/s, over four minutes."""
    socks = [connect(address) for _ in range(count)]
    try:
        for sock in socks:
            payload = os.urandom(65536)
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
        yield socks
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("model", BOUNDED)
def test_at_the_cap_newcomers_take_the_place_of_those_not_worth_it(model: str) -> None:
    cap = 50
    with (
        running(model, workers=2, max_connections=cap) as server,
        paying(server.address, 10) as established,
        open_connections(server.address, cap - 10) as idle,
    ):
        wait_until(lambda: server.stats.waiting.value == cap, what="the cap to fill")
        # Each newcomer takes the place of the idle connection furthest behind: the
        # oldest first.
        assert is_served(server.address)
        # It evicted one and left: one place is free (once its end is seen).
        wait_until(
            lambda: server.stats.active_connections() == cap - 1, what="the newcomer's close"
        )
        with contextlib.ExitStack() as newcomers:
            for n in range(10):  # the free place, then nine evictions
                sock = newcomers.enter_context(connect(server.address))
                assert roundtrip(sock, b"new %d" % n) == b"new %d" % n
            assert server.stats.closed["evicted"].value == 10
            assert not any(held_open(sock) for sock in idle[:10])
            assert all(held_open(sock) for sock in idle[10:])
            for sock in established:  # never cut: each is served as before
                assert held_open(sock) and roundtrip(sock, b"still here") == b"still here"


@pytest.mark.parametrize("model", BOUNDED)
def test_when_every_connection_is_worth_its_place_the_newcomer_is_refused(model: str) -> None:
    cap = 10
    with running(model, workers=2, max_connections=cap) as server, paying(server.address, cap):
        assert not is_served(server.address, timeout=EVENTUALLY)
        assert server.stats.rejected["at_cap"].value == 1
        assert server.stats.closed["evicted"].value == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_with_no_minimum_rate_the_quietest_is_evicted_never_one_mid_echo(model: str) -> None:
    with running(model, workers=2, max_connections=50, send_timeout=30.0, min_rate=0) as server:
        with connect(server.address) as busy:
            # A 1 MiB echo the client does not read until the end: in flight throughout.
            # (A window far under loopback's MSS would pace the end at a small segment
            # per delayed ACK: 25 s at 4 KiB, 0.3 s at 16 KiB.)
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            payload = os.urandom(1 << 20)
            sender = threading.Thread(target=busy.sendall, args=(payload,))
            sender.start()
            # In flight before the idle ones come: until it sends, it is the quietest.
            wait_until(
                lambda: server.sample("echo_connections", state="writing") == 1,
                what="the echo to stall on the slow client",
            )
            with open_connections(server.address, 60) as idle:
                wait_until(
                    lambda: server.sample("echo_connections_closed_total", reason="evicted") >= 11,
                    what="the cap to evict the quietest",
                )
                # The first idle connections were the quietest: they went first.
                assert not held_open(idle[0])
                assert held_open(idle[-1])
                assert is_served(server.address)  # a newcomer is admitted
            assert recv_exactly(busy, len(payload)) == payload
            sender.join(EVENTUALLY)
        assert server.sample("echo_connections_rejected_total", reason="at_cap") == 0
