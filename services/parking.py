"""The loop's lists of parked connections (`ready` dispatch), each in the order one of
its decisions needs, and which connection is due next. No I/O: `ready.py` arms,
serves and closes; this says who.

- waiting connections in the order they were parked: the front has been quiet
  longest (the idle timeout; with no minimum rate, the cap's victim);
- writers in stall order (the send timeout, and who goes first over the output budget);
- waiting connections by when they fall behind the minimum rate (the cap's victim);
- resting writers, by when they are watched again (WRITABLE_REST).
Only the loop's thread touches these.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from services.connection import Connection, worth_until
from services.deadlines import Deadlines
from services.states import State


class Parking:
    def __init__(
        self,
        idle_timeout: float | None,
        send_timeout: float | None,
        min_rate: int,
        rest: float,
    ) -> None:
        self._idle_timeout = idle_timeout
        self._send_timeout = send_timeout
        self._min_rate = min_rate
        self._rest = rest
        self._waiting: OrderedDict[Connection, None] = OrderedDict()
        self._writing: dict[Connection, None] = {}  # their stall order: `_send_clock`
        self._send_clock: Deadlines[Connection] = Deadlines()  # writers, by stalled_since
        self._worth: Deadlines[Connection] = Deadlines()  # waiting, by `worth_until`
        self._resting: deque[tuple[float, Connection]] = deque()  # (watched again at, writer)

    def park(self, conn: Connection, now: float) -> None:
        """Add a connection counted as parked (WAITING, WRITING or RESTING). All or
        nothing, out of memory included."""
        waiting = conn.state is State.WAITING
        parked = self._waiting if waiting else self._writing
        parked[conn] = None
        try:
            if not waiting:
                self._send_clock.add(conn, conn.stalled_since)
            elif self._min_rate:
                self._worth.add(conn, worth_until(conn.admitted, conn.received, self._min_rate))
            if conn.state is State.RESTING:
                self._resting.append((now + self._rest, conn))
        except BaseException:
            del parked[conn]
            self._send_clock.remove(conn)
            self._worth.remove(conn)
            raise

    def unpark(self, conn: Connection) -> None:
        """Take a parked connection out (its state and count stay for the caller to move).
        Allocates nothing. A resting one's entry goes stale: once moved it is RESTING
        no more, and `rested` skips it."""
        if conn.state is State.WAITING:
            del self._waiting[conn]
            self._worth.remove(conn)
        else:
            del self._writing[conn]
            self._send_clock.remove(conn)

    def holds(self, conn: Connection) -> bool:
        return conn in self._waiting or conn in self._writing

    def take(self, conn: Connection) -> bool:
        """`unpark` a connection with an event; False (and nothing done) if it is not
        parked: handed back and not taken back yet, or closed."""
        if conn in self._waiting:
            del self._waiting[conn]
            self._worth.remove(conn)
            return True
        if conn in self._writing:
            del self._writing[conn]
            self._send_clock.remove(conn)
            return True
        return False

    def everyone(self) -> list[Connection]:
        return [*self._waiting, *self._writing]

    def watched(self) -> Iterator[Connection]:
        """Every parked connection armed for an event (a resting writer is not)."""
        yield from self._waiting
        yield from (conn for conn in self._writing if conn.state is State.WRITING)

    def writers_by_stall(self) -> Iterator[Connection]:
        return self._send_clock.in_order()

    def next_deadline(self, now: float) -> float:
        """When something parked is next due (at the latest a second from now)."""
        deadlines = [now + 1.0]
        if self._idle_timeout is not None and self._waiting:
            deadlines.append(next(iter(self._waiting)).last_active + self._idle_timeout)
        stalled = self._send_clock.first()
        if self._send_timeout is not None and stalled is not None:
            deadlines.append(stalled[0] + self._send_timeout)
        if self._resting:
            deadlines.append(self._resting[0][0])  # a stale one is dropped when due
        return min(deadlines)

    def rested(self, now: float) -> Connection | None:
        """The next resting writer due to be watched again (taken off the list)."""
        while self._resting and self._resting[0][0] <= now:
            conn = self._resting.popleft()[1]
            if conn.state is State.RESTING:  # else closed or moved since: stale
                return conn
        return None

    def idle(self, now: float) -> Connection | None:
        """The next waiting connection past the idle timeout. From the front: parked
        longest ago; the parking order is close to, not exactly, last-activity order,
        so a connection may wait a little past its timeout behind one parked earlier."""
        if self._idle_timeout is None or not self._waiting:
            return None
        conn = next(iter(self._waiting))
        return conn if now - conn.last_active >= self._idle_timeout else None

    def stalled(self, now: float) -> Connection | None:
        """The next writer past the send timeout (in stall order, exactly)."""
        stalled = self._send_clock.first()
        if self._send_timeout is None or stalled is None:
            return None
        return stalled[1] if now - stalled[0] >= self._send_timeout else None

    def behind(self, now: float) -> Connection | None:
        """The cap's victim: the waiting connection furthest behind the minimum rate, or
        with no minimum rate the one parked longest ago; None: no one may be evicted."""
        if not self._min_rate:
            return next(iter(self._waiting), None)
        behind = self._worth.first()
        return behind[1] if behind is not None and behind[0] <= now else None
