"""What the two bounded models share: a fixed pool of workers, and how a connection
reaches one of them (`connection` or `ready` dispatch)."""

from __future__ import annotations

import selectors
import socket
import time
from abc import abstractmethod
from collections.abc import Callable
from functools import partial

from services.base import Server
from services.config import Config
from services.ready import ReadyDispatch


class PoolServer(Server):
    """A model with a fixed pool of `workers`. With `connection` dispatch a connection
    owns a worker for its life, `queue_size` more may wait, and the rest are turned away
    at once; with `ready` dispatch connections wait in the event loop (`ReadyDispatch`)
    and a worker serves one only while it has bytes to echo."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.ready = ReadyDispatch(self) if config.parks else None

    @abstractmethod
    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` on a worker of the pool, in turn. Must not block."""

    def dispatch(self, conn: socket.socket) -> None:
        if self.ready is not None:
            self.ready.admit(conn)
        else:
            self.submit(partial(self.handle_connection, conn))

    @property
    def queue_capacity(self) -> int:
        return self.config.queue_size if self.ready is None else self.config.max_connections

    @property
    def capacity(self) -> int | None:
        return self.config.capacity

    def close(self) -> None:
        super().close()
        if self.ready is not None:
            self.ready.close()

    def on_loop_start(self, selector: selectors.BaseSelector) -> None:
        if self.ready is not None:
            self.ready.on_loop_start(selector)

    def next_deadline(self, now: float) -> float:
        if self.ready is None:
            return super().next_deadline(now)
        return min(super().next_deadline(now), self.ready.next_deadline(now))

    def on_loop_tick(self, now: float) -> None:
        if self.ready is not None:
            # Woken or not: a hand-back whose wake-up was lost waits one tick at most.
            self.ready.take_back()
            self.ready.expire(now)

    def on_wake(self) -> None:
        if self.ready is not None:
            self.ready.take_back()

    def on_loop_end(self) -> None:
        if self.ready is not None:
            self.ready.close_all("shutdown")

    def make_room(self) -> None:
        if self.ready is not None:
            self.ready.make_room(time.monotonic())
