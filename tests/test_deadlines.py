"""Deadlines in their own order: the send timeout runs from a writer's last progress,
whatever order writers were parked in, and starts when a connection first has an echo it
cannot send."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from typing import Any

import pytest

import services.ledger
import services.ready
from services.deadlines import Deadlines
from services.states import Wait
from support import BOUNDED, EVENTUALLY, held_open, running, wait_until

pytestmark = pytest.mark.timeout(120)


def test_items_come_in_the_order_of_their_times_not_the_order_they_came() -> None:
    deadlines: Deadlines[str] = Deadlines()
    for item, when in (("fresh", 30.0), ("old", 20.0), ("older", 10.0)):
        deadlines.add(item, when)  # a rested writer comes back with its old stall
    assert deadlines.first() == (10.0, "older")
    assert list(deadlines.in_order()) == ["older", "old", "fresh"]
    deadlines.remove("older")
    assert deadlines.first() == (20.0, "old") and list(deadlines.in_order()) == ["old", "fresh"]
    deadlines.add("old", 40.0)  # added again: the new time counts, the old entry is dead
    assert list(deadlines.in_order()) == ["fresh", "old"] and len(deadlines) == 2


def test_dead_entries_do_not_pile_up() -> None:
    deadlines: Deadlines[str] = Deadlines()
    for n in range(10_000):  # a writer woken and parked again, over and over
        deadlines.remove("writer")
        deadlines.add("writer", float(n))
    assert len(deadlines._heap) <= 2 + 64 + 1
    assert list(deadlines.in_order()) == ["writer"]


class ScriptedTurns:
    """Stands in for echo_turn (`services.ready` looks it up at call time): each
    connection's first turn does `first`, every later one is a writer woken for room that
    sends nothing. Keyed by the client's port."""

    def __init__(self, first: str) -> None:
        self._first = first
        self.turns: Counter[int] = Counter()
        self._lock = threading.Lock()

    def __call__(self, sock: socket.socket, _buffer: memoryview, unsent: bytes, **kw: Any) -> Any:
        turn = kw["turn"]
        with self._lock:
            self.turns[sock.getpeername()[1]] += 1
            nth = self.turns[sock.getpeername()[1]]
        with contextlib.suppress(BlockingIOError):
            turn.received += len(sock.recv(65536, socket.MSG_DONTWAIT))
        if nth > 1:
            return Wait.WRITE, unsent or b"e"  # woken for room, sent nothing
        if self._first == "fill":  # sends until the kernel takes no more: a stalled echo
            with contextlib.suppress(BlockingIOError):
                while True:
                    turn.sent += sock.send(b"f" * 65536, socket.MSG_DONTWAIT)
            return Wait.WRITE, b"e"
        return Wait.READ, b""  # echoed all of it


def small_window_client(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    sock.settimeout(EVENTUALLY)
    return sock


@pytest.mark.parametrize("model", BOUNDED)
def test_a_writer_that_rests_behind_a_fresher_one_is_still_cut_first(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stalls first, B after; then A is woken for room and sends nothing, so it is
    # parked again behind B with its older stall. Parking order put B first (and A was
    # cut only once B was); its stall puts A first.
    script = ScriptedTurns(first="fill")
    monkeypatch.setattr(services.ready, "echo_turn", script)
    closed: list[int] = []
    finish = services.ledger.Ledger.finish

    def recorded(ledger: services.ledger.Ledger, sock: socket.socket, *args: Any) -> None:
        with contextlib.suppress(OSError):
            closed.append(sock.getpeername()[1])
        finish(ledger, sock, *args)

    monkeypatch.setattr(services.ledger.Ledger, "finish", recorded)
    with (
        running(model, workers=2, send_timeout=3.0) as server,
        small_window_client(server.address) as a,
        small_window_client(server.address) as b,
    ):
        port_a, port_b = a.getsockname()[1], b.getsockname()[1]
        a.sendall(b"a")
        wait_until(lambda: server.stats.writing.value == 1, what="A to stall")
        b.sendall(b"b")
        wait_until(lambda: server.stats.writing.value == 2, what="B to stall")
        a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while a.recv(65536):  # room on A's side: it is woken, and sends nothing
                pass
        wait_until(lambda: script.turns[port_a] >= 2, what="A to be woken for room")
        wait_until(lambda: server.stats.closed["slow_reader"].value == 2, what="both to be cut")
        assert closed == [port_a, port_b]


@pytest.mark.parametrize("model", BOUNDED)
def test_the_stall_starts_when_an_echo_first_cannot_be_sent(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first turn echoes everything; after a pause longer than the send timeout, the
    # second cannot send its echo at all. Its clock must start then, not at the end of
    # the first turn (which cut it at once).
    send_timeout = 1.0
    monkeypatch.setattr(services.ready, "echo_turn", ScriptedTurns(first="echo"))
    with (
        running(model, workers=2, send_timeout=send_timeout) as server,
        small_window_client(server.address) as sock,
    ):
        sock.sendall(b"1")
        wait_until(
            lambda: server.stats.started.value == 1 and server.stats.waiting.value == 1,
            what="the first turn to end",
        )
        threading.Event().wait(1.5 * send_timeout)  # the pause under test
        sent_at = time.monotonic()
        sock.sendall(b"2")
        wait_until(lambda: not held_open(sock), what="the stalled echo to be cut")
        assert time.monotonic() - sent_at >= send_timeout
        assert server.stats.closed["slow_reader"].value == 1
