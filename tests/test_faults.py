"""Out of memory at any step of admitting or serving a connection: the worker lives on,
the connection is closed, and every count comes out right."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

import services.base
import services.echo
import services.ready
from services.models import MODELS
from support import MODES, RunningService, echo_once, running, wait_until


class FailOnce:
    """Wrap `call` so that its first call raises MemoryError (and does nothing else)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call
        self._lock = threading.Lock()
        self.fired = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            fire, self.fired = not self.fired, True
        if fire:
            raise MemoryError
        return self._call(*args, **kwargs)


# Where memory runs out: a method of the server's stats, of the server, or the echo itself.
STATS_STEPS = ["try_admit", "on_start", "move", "on_traffic"]
SERVER_STEPS = ["dispatch", "submit", "accepted_at"]
STEPS = [*STATS_STEPS, *SERVER_STEPS, "echo"]


def applies(model: str, mode: str, step: str) -> bool:
    if step == "submit":  # the pools' hand-over to a worker
        return MODELS[model].bounded
    if step == "accepted_at":  # a worker starting a connection it owns
        return mode == "connection"
    return True


CASES = [(*case, step) for case in MODES for step in STEPS if applies(*case, step)]


def inject(server: RunningService, step: str, monkeypatch: pytest.MonkeyPatch) -> FailOnce:
    if step in STATS_STEPS:
        fault = FailOnce(getattr(server.stats, step))
        monkeypatch.setattr(server.stats, step, fault)
    elif step in SERVER_STEPS:
        target = server.service.server
        fault = FailOnce(getattr(target, step))
        monkeypatch.setattr(target, step, fault)
    elif server.service.config.parks:
        fault = FailOnce(services.echo.echo_turn)
        monkeypatch.setattr(services.ready, "echo_turn", fault)  # where it is looked up
    else:
        fault = FailOnce(services.echo.echo)
        monkeypatch.setattr(services.base, "echo", fault)
    return fault


def balanced(server: RunningService) -> bool:
    """Everything accepted is rejected or closed, and no state holds a connection."""
    s = server.stats.snapshot()
    settled = s.accepted == sum(s.rejected.values()) + sum(s.closed.values())
    return settled and s.active == 0 and int(server.stats.pending_output.value) == 0


@pytest.mark.parametrize(("model", "mode", "step"), CASES, ids=["-".join(c) for c in CASES])
def test_out_of_memory_at_any_step_leaves_the_worker_alive_and_the_counts_right(
    model: str, mode: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One worker: if the fault killed it, or leaked the one place it serves, the next
    # client would never be echoed.
    with running(model, dispatch=mode, workers=1, queue_size=1, max_connections=4) as server:
        fault = inject(server, step, monkeypatch)
        for attempt in range(3):
            with contextlib.suppress(OSError):  # the connection hit by the fault may be cut
                echo_once(server.address, b"x" * (1000 + attempt), timeout=10)
            if fault.fired:
                break
        assert fault.fired, f"no client went through {step}"
        wait_until(lambda: balanced(server), what="every connection closed and counted")
        assert echo_once(server.address, b"after the fault") == b"after the fault"
        wait_until(lambda: balanced(server), what="the last connection closed and counted")
        assert server.sample("echo_connections_active") == 0
