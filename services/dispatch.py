"""How an admitted connection reaches a worker: the interface the event loop's server calls,
and `connection` dispatch, the recipe's (`services/ready.py` has the other).

With `connection` dispatch a connection owns a worker for its whole life: the loop
hands it to the pool once, and the worker echoes until the client stops, times out,
or the server stops. Simple, and N quiet clients hold a pool of N: what the floods
break (README, Guarantees).
"""

from __future__ import annotations

import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial

from services.config import Config
from services.echo import close_reason_for, echo
from services.ledger import Ledger
from services.logs import RateLimitedLog, quietly
from services.states import Closed, Rejected, State
from services.stats import ServerStats, retrying

log = logging.getLogger("echo.dispatch")

Submit = Callable[[Callable[[], None]], None]  # run a job on a worker, in turn; never blocks


class Dispatch(ABC):
    """Chosen once, when the server is built; every method but `serve`'s runs on the
    event loop's thread."""

    entry: State  # where an admitted connection is counted first
    queue_capacity: int  # how many admitted connections may wait for a worker

    @abstractmethod
    def admit(self, sock: socket.socket) -> None:
        """Take an admitted connection (counted in `entry`, in the ledger). Must not block.
        On an exception the caller closes it and counts it rejected."""

    @abstractmethod
    def make_room(self, now: float) -> bool:
        """At the cap, before a newcomer is turned away: free a place if the policy
        allows; False when it does not."""

    @abstractmethod
    def close_all(self, reason: Closed) -> None:
        """The loop has ended: close whatever waits in it."""


class Job:
    """A connection on its way to its worker: called on the worker, it serves the
    connection to its end; a model that finds no worker will ever call it closes it
    instead (`refuse`, `close`). Exactly one of the three, once."""

    __slots__ = ("_dispatch", "conn")

    def __init__(self, dispatch: ConnectionDispatch, conn: socket.socket) -> None:
        self._dispatch = dispatch
        self.conn = conn

    def __call__(self) -> None:
        self._dispatch.serve(self.conn)

    def refuse(self, reason: Rejected) -> None:
        """No worker came: count it rejected{reason}. Never raises."""
        self._dispatch.ledger.reject(self.conn, self._dispatch.entry, reason)

    def close(self, reason: Closed) -> None:
        """Its worker came but cannot serve it: count it closed{reason}. Never raises."""
        self._dispatch.ledger.finish(self.conn, self._dispatch.entry, reason)


class ConnectionDispatch(Dispatch):
    """A connection owns a worker from its first byte to its close. `submit` runs a `Job`
    on a worker, the pool's or a new thread (`queue_capacity`: how many may wait)."""

    def __init__(
        self,
        config: Config,
        stats: ServerStats,
        ledger: Ledger,
        submit: Callable[[Job], None],
        queue_capacity: int,
    ) -> None:
        self._config = config
        self._stats = stats
        self.ledger = ledger
        self._submit = submit
        self._warn = RateLimitedLog(log)
        self.entry = State.QUEUED
        self.queue_capacity = queue_capacity

    def admit(self, sock: socket.socket) -> None:
        self._submit(Job(self, sock))

    def make_room(self, now: float) -> bool:
        return False  # every connection has, or waits for, a worker of its own

    def close_all(self, reason: Closed) -> None:
        """Nothing waits in the loop; the server's shutdown cuts what workers hold."""

    def serve(self, conn: socket.socket) -> None:
        """On a worker: run one connection to its end. Never raises: whatever happens on
        the way, the connection is closed and counted once."""
        stats = self._stats
        state = State.QUEUED
        reason = Closed.ERROR
        try:
            retrying(stats.on_start)
            state = State.BUSY
            if self.ledger.stopping():
                reason = Closed.SHUTDOWN
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reason = echo(
                conn,
                idle_timeout=self._config.idle_timeout,
                send_timeout=self._config.send_timeout,
                on_traffic=partial(retrying, stats.on_traffic),
                waited=time.monotonic() - self.ledger.accepted_at(conn),
            )
        except OSError as error:
            reason = close_reason_for(error)
            quietly(log.debug, "connection ended: %s", error)
        except MemoryError:
            self._warn.warning("out of memory while serving a connection; closed it")
        except Exception:
            quietly(log.exception, "unexpected error while serving a connection")
        finally:
            self.ledger.finish(conn, state, reason)
