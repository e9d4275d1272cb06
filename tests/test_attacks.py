"""Attackers keep their count, as real tools do: whatever the server drops is replaced,
within the rate; a polite attack does not replace anything."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from loadtest.attacks import Attack, AttackPlan, AttackRefused

CONNECTIONS = 20
RATE = 200.0
DURATION = 3.0
LIFETIME = 0.5  # the test server closes every connection this long after accepting it


@contextmanager
def closing_server() -> Iterator[tuple[str, int]]:
    """Accepts everything and closes each connection LIFETIME seconds later."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    stop = threading.Event()
    held: list[tuple[float, socket.socket]] = []

    def serve() -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                if selector.select(0.02):
                    try:
                        while True:
                            conn, _ = listener.accept()
                            held.append((time.monotonic() + LIFETIME, conn))
                    except BlockingIOError:
                        pass
                now = time.monotonic()
                while held and held[0][0] <= now:
                    held.pop(0)[1].close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        thread.join(30)
        listener.close()
        for _, conn in held:
            conn.close()


def attack(address: tuple[str, int], scenario: str, polite: bool) -> Attack:
    plan = AttackPlan(
        scenario,
        address,
        connections=CONNECTIONS,
        rate=RATE,
        duration=DURATION,
        trickle_interval=0.2,
        polite=polite,
    )
    running = Attack(plan)
    running.start()
    running.join(DURATION + 30)
    assert not running.is_alive()
    return running


HELD = ["idle", "slowloris", "slow-reader", "metrics-slowloris"]


@pytest.mark.parametrize("scenario", HELD)
def test_every_connection_the_server_drops_is_replaced(scenario: str) -> None:
    with closing_server() as address:
        counts = attack(address, scenario, polite=False).counts()
    # Each connection lives 0.5 s, so a 3 s attack loses its 20 about five times over.
    assert counts.closed_by_server >= 3 * CONNECTIONS, counts
    # Every loss but those of the last moments was replaced...
    assert counts.replaced >= counts.closed_by_server - CONNECTIONS - RATE / 4, counts
    assert counts.opened == CONNECTIONS + counts.replaced - counts.connect_failures, counts
    # ...and never faster than the rate (plus the bucket's quarter second).
    assert counts.opened <= RATE * DURATION + RATE / 4 + 1, counts
    assert 0 < counts.connect_p50_ms <= counts.connect_p99_ms


@pytest.mark.parametrize("scenario", HELD)
def test_a_polite_attack_does_not_replace_what_the_server_drops(scenario: str) -> None:
    with closing_server() as address:
        counts = attack(address, scenario, polite=True).counts()
    assert counts.opened == CONNECTIONS, counts
    assert counts.replaced == 0
    assert counts.closed_by_server == CONNECTIONS
    assert counts.open_now == 0


def test_churn_keeps_connecting_at_its_rate() -> None:
    with closing_server() as address:
        counts = attack(address, "churn", polite=False).counts()
    assert RATE * DURATION * 0.3 <= counts.opened <= RATE * DURATION + RATE / 4 + 1, counts


def test_refused_connections_are_counted_and_retried() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = unused.getsockname()  # bound, not listening: connections are refused
        counts = attack(address, "idle", polite=False).counts()
    assert counts.opened == 0
    assert counts.connect_failures > CONNECTIONS, counts
    assert counts.errors.get("ECONNREFUSED", 0) == counts.connect_failures


def test_plans_outside_the_tools_bounds_are_refused() -> None:
    with pytest.raises(AttackRefused, match="loopback addresses only"):
        AttackPlan("idle", ("192.0.2.1", 1))
    with pytest.raises(AttackRefused, match="scenario"):
        AttackPlan("teardrop", ("127.0.0.1", 1))
