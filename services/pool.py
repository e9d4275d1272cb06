"""What the two bounded models share: a fixed pool of workers, and how a connection
reaches one of them, chosen once (`connection` or `ready` dispatch)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

from services.base import Server
from services.dispatch import ConnectionDispatch, Dispatch
from services.ready import ReadyDispatch


class PoolServer(Server):
    """A model with a fixed pool of `workers`. With `connection` dispatch a connection
    owns a worker for its life, `queue_size` more may wait, and the rest are turned away
    at once; with `ready` dispatch connections wait in the event loop (`ReadyDispatch`)
    and a worker serves one only while it has bytes to echo."""

    @abstractmethod
    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` on a worker of the pool, in turn. Must not block."""

    def build_dispatch(self) -> Dispatch:
        if self.config.ready_dispatch:
            return ReadyDispatch(self.config, self.stats, self.ledger, self.loop, self._submit)
        return ConnectionDispatch(
            self.config, self.stats, self.ledger, self._submit, self.config.queue_size
        )

    def _submit(self, job: Callable[[], None]) -> None:
        self.submit(job)  # looked up at each call: a model's pool is built after the base
