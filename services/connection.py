"""A parked connection's state between turns (`ready` dispatch), and the two decisions
made about it: which writers to close over the output budget, and from when a newcomer
at the cap may take its place."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from services.states import State


class Connection:
    """A connection's state between turns; lives as long as the connection."""

    __slots__ = (
        "admitted", "fd", "last_active", "ready_at", "received", "sock",
        "stalled_since", "state", "unsent", "woke_writable",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.state = State.WAITING  # counted there on admission; changed with its counters
        self.fd = sock.fileno()  # for the epoll set, which knows it by number
        self.last_active = now  # the last byte from the client (the idle clock)
        self.unsent = b""  # echo the client has not taken yet
        self.stalled_since = now  # the last progress sending `unsent`
        self.ready_at = now  # when the leader took its event
        self.woke_writable = False  # this turn began because the client took some echo
        self.admitted = now
        self.received = 0  # bytes over its life: what it is worth at the cap

    def settle(self, received: int, sent: int, writing: bool, now: float) -> int:
        """After a turn (`writing`: it ends waiting to write): restart the clocks; the
        echo left unsent. A writer's stall runs from its last progress, or from when it
        began writing: a turn that starts writing having sent nothing starts the clock,
        and does not inherit an older turn's."""
        if received:
            self.last_active = now
            self.received += received
        if sent or not writing or not self.woke_writable:
            self.stalled_since = now
        return len(self.unsent)


def writers_to_close(writers: Iterable[Connection], pending: int, budget: int) -> list[Connection]:
    """The writers to close to bring `pending` bytes of unsent echoes within `budget`: the
    longest stalled first (`writers` is in stall order), and only those that hold an echo;
    one whose echo waits in the kernel (held back, see `serve_turn`) costs the budget
    nothing, and closing it would free nothing."""
    closing = []
    for conn in writers:
        if pending <= budget:
            break
        if conn.unsent:
            closing.append(conn)
            pending -= len(conn.unsent)
    return closing


def worth_until(admitted: float, received: int, min_rate: int) -> float:
    """When a connection admitted at `admitted` that has sent `received` bytes falls
    behind `min_rate` bytes a second over its life: from then on a newcomer at the cap
    may take its place, the furthest behind (the earliest) first. Each byte moves it
    1/min_rate seconds later, so a client that keeps to the rate never reaches it, and
    of those that do not, the newest go last (an honest newcomer has had the least
    time to send)."""
    return admitted + received / min_rate


def served_first(conn: Connection, min_rate: int, now: float) -> bool:
    """Whether a connection with an event goes ahead of the others in the pool's queue: one that
    keeps to the minimum rate (`worth_until` is still to come), or one not served yet
    (a newcomer's first message); every one when there is no minimum rate. Under more
    load than the pool can take, those behind the rate wait, and the others do not wait
    behind them."""
    return (
        not min_rate
        or conn.received == 0
        or worth_until(conn.admitted, conn.received, min_rate) > now
    )
