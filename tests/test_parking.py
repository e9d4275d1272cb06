"""The loop's lists of parked connections decide who is due: the idle from the front, the
stalled in stall order, the cap's victim, resting writers watched again. No I/O."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services.connection import Connection
from services.parking import Parking
from services.states import State

IDLE, SEND, MIN_RATE, REST = 10.0, 5.0, 240, 0.5


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    socks = [socket.socket() for _ in range(4)]
    yield socks
    for sock in socks:
        sock.close()


def parked(parking: Parking, sock: socket.socket, state: State, at: float) -> Connection:
    conn = Connection(sock, at)
    conn.state = state
    parking.park(conn, at)
    return conn


def test_the_idle_go_from_the_front_and_only_once_past_the_timeout(
    sockets: list[socket.socket],
) -> None:
    parking = Parking(IDLE, SEND, 0, REST)
    first = parked(parking, sockets[0], State.WAITING, 100.0)
    second = parked(parking, sockets[1], State.WAITING, 103.0)
    assert parking.next_deadline(105.0) == 106.0  # a second from now: before the idle
    assert parking.idle(109.9) is None
    assert parking.idle(110.0) is first
    parking.unpark(first)
    assert parking.idle(110.0) is None and parking.idle(113.0) is second
    assert parking.next_deadline(112.5) == 113.0


def test_the_stalled_go_in_stall_order_not_parking_order(sockets: list[socket.socket]) -> None:
    parking = Parking(IDLE, SEND, 0, REST)
    late = Connection(sockets[0], 100.0)
    late.state, late.stalled_since = State.WRITING, 103.0
    parking.park(late, 103.0)
    early = Connection(sockets[1], 100.0)
    early.state, early.stalled_since = State.WRITING, 101.0  # parked later, stalled earlier
    parking.park(early, 104.0)
    assert list(parking.writers_by_stall()) == [early, late]
    assert parking.stalled(105.9) is None
    assert parking.stalled(106.0) is early
    assert parking.idle(200.0) is None  # writers are never idle


def test_with_a_minimum_rate_the_victim_is_one_behind_it_and_otherwise_no_one(
    sockets: list[socket.socket],
) -> None:
    parking = Parking(IDLE, SEND, MIN_RATE, REST)
    payer = Connection(sockets[0], 100.0)
    payer.received = 240 * 60  # worth its place until 160
    parking.park(payer, 100.0)
    assert parking.behind(150.0) is None  # the newcomer is refused
    fresh = parked(parking, sockets[1], State.WAITING, 120.0)  # nothing sent: behind at 120
    assert parking.behind(150.0) is fresh
    parking.unpark(fresh)
    assert parking.behind(160.0) is payer


def test_without_a_minimum_rate_the_victim_is_the_quietest_waiting(
    sockets: list[socket.socket],
) -> None:
    parking = Parking(IDLE, SEND, 0, REST)
    assert parking.behind(100.0) is None
    parked(parking, sockets[0], State.WRITING, 99.0)  # a writer is never a victim
    quiet = parked(parking, sockets[1], State.WAITING, 100.0)
    parked(parking, sockets[2], State.WAITING, 101.0)
    assert parking.behind(102.0) is quiet


def test_a_resting_writer_is_due_once_its_rest_is_over_and_a_moved_one_never(
    sockets: list[socket.socket],
) -> None:
    parking = Parking(IDLE, SEND, 0, REST)
    resting = parked(parking, sockets[0], State.RESTING, 100.0)
    moved = parked(parking, sockets[1], State.RESTING, 100.1)
    assert list(parking.watched()) == []  # neither is armed
    assert parking.next_deadline(100.2) == 100.5
    assert parking.rested(100.4) is None
    parking.unpark(moved)
    moved.state = State.CLOSED
    assert parking.rested(101.0) is resting
    assert parking.rested(101.0) is None  # the moved one's entry was stale


def test_parking_is_all_or_nothing_when_memory_runs_out(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    parking = Parking(IDLE, SEND, MIN_RATE, REST)
    conn = Connection(sockets[0], 100.0)

    def out_of_memory(*_: object) -> None:
        raise MemoryError

    monkeypatch.setattr(parking._worth, "add", out_of_memory)
    with pytest.raises(MemoryError):
        parking.park(conn, 100.0)
    assert not parking.holds(conn) and parking.everyone() == []
