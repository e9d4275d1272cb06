"""Attackers keep their count, as real tools do: whatever the server drops is replaced,
within the rate; a polite attack does not replace anything."""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

import loadtest.flood
import loadtest.targets
from loadtest.attacks import BOTNET_SOURCES, MAX_CONNECTIONS, Attack, AttackPlan, AttackRefused
from loadtest.botnet import BOTNET_CONTAINERS, ContainerBotnet
from loadtest.floodrun import SQUEEZE_BEYOND, RunSettings, Target, attacker_for
from loadtest.observe import Established
from services.budget import METRICS_CLIENTS
from support import EVENTUALLY, ROOT, running, wait_until

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


def test_a_containers_private_address_is_allowed_only_as_a_container() -> None:
    AttackPlan("idle", ("172.18.0.2", 1), container=True)
    with pytest.raises(AttackRefused, match="loopback addresses only"):
        AttackPlan("idle", ("172.18.0.2", 1))
    with pytest.raises(AttackRefused, match="or a container's private address"):
        AttackPlan("idle", ("8.8.8.8", 1), container=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ("172.18.0.9", 15002, True)),  # auto, the stack runs: its own address
        (["--via", "network"], ("172.18.0.9", 15002, True)),
        (["--via", "published"], ("127.0.0.1", 15002, False)),
        (["--host", "127.0.0.2"], ("127.0.0.2", 15002, False)),  # given: as given
        (["--port", "7"], ("127.0.0.1", 7, False)),
    ],
)
def test_floods_reach_a_running_container_at_its_own_address_unless_told_otherwise(
    args: list[str], expected: tuple[str, int, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []

    def container_address(project: str, service: str) -> str:
        asked.append((project, service))
        return "172.18.0.9"

    monkeypatch.setattr(loadtest.targets, "container_address", container_address)
    monkeypatch.setattr(loadtest.targets, "container_network", lambda *_: "echo-cluster_default")
    parsed = loadtest.flood.build_parser().parse_args(["--targets", "queue", *args])
    (target,) = loadtest.targets.targets_from(parsed)
    assert (*target.address, target.container) == expected
    assert asked == ([("echo-cluster", "queue")] if target.container else [])
    RunSettings().plan("idle", target)  # and the attack tool takes it


def test_no_container_running_means_loopback_unless_the_network_was_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loadtest.targets, "container_address", lambda *_: None)
    parse = loadtest.flood.build_parser().parse_args
    (target,) = loadtest.targets.targets_from(parse(["--targets", "threads"]))
    assert target.address == ("127.0.0.1", 15003) and not target.container
    with pytest.raises(AttackRefused, match="no running container of 'threads'"):
        loadtest.targets.targets_from(parse(["--targets", "threads", "--via", "network"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "10.0.0.1"], "loopback addresses only"),
        (["--host", "example.org"], "give a loopback IP address"),
        (["--connections", "20001"], "connections: 1 to 20000"),
        (["--duration", "301"], "duration"),
        (["--targets", "nginx"], "targets: unknown nginx"),
        (["--scenarios", "ddos"], "scenario 'ddos'"),
        (["--scenarios", "idle", "--think", "0"], "think: more than 0"),
        (["--established", "65"], "established: 0 to 64"),
        (["--targets", "queue", "--via", "network", "--port", "1"], "not --host/--port"),
        (["--via", "network", "--docker-project", "no-such-project"], "no running container"),
    ],
)
def test_flood_cli_refuses_what_it_must_not_do(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.flood", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(("think", "cuts"), [(1.5, True), (0.3, False)])
def test_established_clients_tell_a_cut_from_a_served_message(think: float, cuts: bool) -> None:
    # The server closes a connection after 1 s without a byte: a client that pauses
    # 1.5 s finds its kept connection cut at every other message (it reconnects for the
    # next); one that pauses 0.3 s is never cut.
    with running("queue", idle_timeout=1.0) as server:
        established = Established(server.address, time.monotonic(), clients=2, think=think)
        established.start()
        try:
            wait_until(lambda: len(established.results()) >= 8, what="eight messages")
        finally:
            established.stop()
            established.join(EVENTUALLY)
        for client in (0, 1):
            mine = [e for e in established.results() if e.client == client]
            if cuts:  # on a fresh connection, served; on the kept one, cut
                assert [e.cut for e in mine] == [n % 2 == 1 for n in range(len(mine))], mine
                assert all(e.ok != e.cut for e in mine)
                assert {e.failure for e in mine if e.cut} <= {"closed", "reset"}
            else:
                assert all(e.ok and not e.cut for e in mine), mine
        assert (server.stats.closed["idle"].value >= 2) == cuts


def test_a_botnet_comes_from_many_loopback_addresses() -> None:
    peers: set[str] = set()
    with socket.create_server(("127.0.0.1", 0), backlog=256) as listener:
        listener.settimeout(0.05)
        plan = AttackPlan("botnet", listener.getsockname(), connections=40, rate=400.0,
                          duration=1.0, sources=5)  # fmt: skip
        attack = Attack(plan)
        attack.start()
        accepted = []
        try:
            deadline = time.monotonic() + EVENTUALLY
            while len(peers) < 5 and time.monotonic() < deadline and attack.is_alive():
                with contextlib.suppress(TimeoutError):
                    conn, (host, _port) = listener.accept()
                    accepted.append(conn)
                    peers.add(host)
        finally:
            attack.stop()
            attack.join(EVENTUALLY)
            for conn in accepted:
                conn.close()
    assert peers == {f"127.0.0.{n}" for n in range(2, 7)}


def test_a_botnet_at_a_container_is_planned_from_containers_on_its_network() -> None:
    local = Target("queue", ("127.0.0.1", 15002), ("127.0.0.1", 9102))
    boxed = Target("threads", ("172.18.0.2", 15003), ("172.18.0.2", 9103), container=True,
                   network="echo-cluster_default")  # fmt: skip
    assert loadtest.flood.runs_of(["idle", "botnet"], [local, boxed]) == [
        ("idle", local), ("idle", boxed), ("botnet", local), ("botnet", boxed),
    ]  # fmt: skip
    here, there = RunSettings().plan("botnet", local), RunSettings().plan("botnet", boxed)
    assert (here.sources, here.from_loopback_sources) == (BOTNET_SOURCES, True)
    assert (there.sources, there.from_loopback_sources) == (BOTNET_CONTAINERS, False)
    assert isinstance(attacker_for(here, local), Attack)
    assert isinstance(attacker_for(there, boxed), ContainerBotnet)
    with pytest.raises(AttackRefused, match="container's network"):
        attacker_for(there, replace(boxed, network=None))
    with pytest.raises(AttackRefused, match="many sources at a container"):
        Attack(there)  # 127.0.0.x cannot reach it
    with pytest.raises(AttackRefused, match="loopback addresses only"):
        AttackPlan("botnet", ("172.18.0.2", 15003), sources=8)  # not a container of ours
    with pytest.raises(AttackRefused, match="need a loopback IPv4 target"):
        AttackPlan("botnet", ("::1", 15003), sources=8)


def test_an_attack_at_the_cap_holds_a_tenth_more_than_the_cap_and_says_so() -> None:
    target = Target("queue", ("127.0.0.1", 15002), ("127.0.0.1", 9102))
    settings = RunSettings(connections=100, think=3.0)
    plan = settings.plan("cap-steer", target, capacity=1200)
    assert plan.connections == 1320 and plan.trickle_interval == 1.0
    assert settings.plan("cap-steer", target, capacity=-1).connections == 100  # no cap
    assert settings.plan("cap-steer", target, capacity=50).connections == 100  # at least
    stopped = Attack(plan)
    stopped.stop()  # before it starts: it opens nothing, and closes its selector
    stopped.start()
    stopped.join(EVENTUALLY)
    assert stopped.counts().planned == 1320 and stopped.counts().opened == 0  # the tables'


def test_an_fd_squeeze_holds_the_metrics_port_past_its_cap_and_the_echo_port_past_its() -> None:
    with (
        socket.create_server(("127.0.0.1", 0), backlog=256) as echo,
        socket.create_server(("127.0.0.1", 0), backlog=256) as metrics,
    ):
        target = Target("queue", echo.getsockname(), metrics.getsockname())
        plan = RunSettings(connections=10, rate=400.0, duration=2.0).plan(
            "fd-squeeze", target, capacity=20
        )
        assert plan.side_address == metrics.getsockname()
        assert plan.side_connections == METRICS_CLIENTS + SQUEEZE_BEYOND
        assert plan.connections == 40  # the cap and at least 20 more
        small = AttackPlan(  # the same, small enough for a test's listeners
            "fd-squeeze", plan.address, connections=30, rate=400.0, duration=2.0,
            side_address=plan.side_address, side_connections=20,
        )  # fmt: skip
        attack = Attack(small)
        attack.start()
        accepted: list[socket.socket] = []
        try:
            for listener, count in ((metrics, 20), (echo, 30)):
                listener.settimeout(EVENTUALLY)
                for _ in range(count):
                    accepted.append(listener.accept()[0])
            wait_until(lambda: attack.counts().open_now == 50, what="all 50 open")
        finally:
            attack.stop()
            attack.join(EVENTUALLY)
            for conn in accepted:
                conn.close()
        assert attack.counts().planned == 50


def test_a_side_attack_is_held_to_the_same_addresses() -> None:
    with pytest.raises(AttackRefused, match="loopback addresses only"):
        AttackPlan("fd-squeeze", ("127.0.0.1", 1), side_address=("10.0.0.1", 9101),
                   side_connections=5)  # fmt: skip
    with pytest.raises(AttackRefused, match="side connections need a side address"):
        AttackPlan("fd-squeeze", ("127.0.0.1", 1), side_connections=5)
    with pytest.raises(AttackRefused, match="connections: 1 to"):
        AttackPlan("fd-squeeze", ("127.0.0.1", 1), connections=MAX_CONNECTIONS,
                   side_address=("127.0.0.1", 2), side_connections=1)  # fmt: skip
