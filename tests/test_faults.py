"""Out of memory at any step of admitting or serving a connection: the worker lives on,
the connection is closed, and every count comes out right."""

from __future__ import annotations

import _thread
import contextlib
import socket
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

import services.concurrency
import services.dispatch
import services.echo
import services.loop
import services.models.threads as threads_model
import services.ready
import services.stats
from services.accepting import accept_connection
from services.base import Server
from services.loop import EventLoop
from services.models import MODELS
from support import (
    EVENTUALLY,
    MODES,
    RunningService,
    balanced,
    connect,
    echo_once,
    running,
    wait_until,
)

pytestmark = pytest.mark.faults  # make test-faults


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


# Where memory runs out: a method of the server's stats, of the server (or its dispatch or
# ledger), or the echo itself.
STATS_STEPS = ["try_admit", "on_start", "move", "on_traffic"]
SERVER_STEPS: dict[str, Callable[[Server], object]] = {
    "admit": lambda server: server.dispatch,
    "submit": lambda server: server,
    "accepted_at": lambda server: server.ledger,
}
STEPS = [*STATS_STEPS, *SERVER_STEPS, "tally", "echo"]


def applies(model: str, mode: str, step: str) -> bool:
    if step == "submit":  # the pools' hand-over to a worker
        return MODELS[model].bounded
    if step in {"accepted_at", "on_start", "on_traffic"}:  # a worker owning a connection
        return mode == "connection"
    if step == "tally":  # the ready leader's counts, added up now and then
        return mode == "ready"
    return True


CASES = [(*case, step) for case in MODES for step in STEPS if applies(*case, step)]


def inject(server: RunningService, step: str, monkeypatch: pytest.MonkeyPatch) -> FailOnce:
    if step in STATS_STEPS:
        fault = FailOnce(getattr(server.stats, step))
        monkeypatch.setattr(server.stats, step, fault)
    elif step == "tally":
        fault = FailOnce(services.concurrency.adjust)
        monkeypatch.setattr(services.stats, "adjust", fault)
    elif step in SERVER_STEPS:
        target = SERVER_STEPS[step](server.service.server)
        fault = FailOnce(getattr(target, step))
        monkeypatch.setattr(target, step, fault)
    elif server.service.config.ready_dispatch:
        fault = FailOnce(services.echo.echo_turn)
        monkeypatch.setattr(services.ready, "echo_turn", fault)  # where it is looked up
    else:
        fault = FailOnce(services.echo.echo)
        monkeypatch.setattr(services.dispatch, "echo", fault)
    return fault


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


def test_an_accept_that_runs_out_of_memory_closes_the_new_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # socket.accept() takes the descriptor, then builds a socket object around it; when
    # that fails, the descriptor leaked (hundreds of them in the address-space flood).
    real_socket = socket.socket

    def out_of_memory_on_wrap(*args: Any, **kwargs: Any) -> socket.socket:
        if kwargs.get("fileno") is not None:
            raise MemoryError
        return real_socket(*args, **kwargs)

    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        monkeypatch.setattr(socket, "socket", out_of_memory_on_wrap)
        with pytest.raises(MemoryError):
            accept_connection(listener)
        monkeypatch.undo()
        client.settimeout(EVENTUALLY)
        assert client.recv(1) == b""  # the server's end was closed, not lost


def test_a_loop_outlives_turns_that_run_out_of_memory_and_backs_off_while_they_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes = iter([MemoryError, MemoryError, MemoryError, None, MemoryError, None])
    pauses: list[float] = []
    warned = []
    turns = 0
    loop = EventLoop(1.0, lambda: warned.append(turns))

    def once() -> None:
        nonlocal turns
        turns += 1
        if turns == 6:
            loop.stop()
        if (outcome := next(outcomes)) is not None:
            raise outcome

    monkeypatch.setattr(loop, "_once", once)
    monkeypatch.setattr(services.loop, "time", SimpleNamespace(sleep=pauses.append))
    try:
        loop.run()
    finally:
        loop.close()
    assert turns == 6
    assert warned == [1, 2, 3, 5]
    assert pauses == [0.01, 0.02, 0.04, 0.01]  # doubling while memory stays out, then anew


def test_a_thread_that_dies_before_its_first_line_is_counted_and_its_connection_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under an exhausted address space the OS makes the thread, then the interpreter
    # cannot allocate its frames: no code of ours runs in it. The accept loop takes the
    # connection back once the claim deadline passes.
    monkeypatch.setattr(threads_model, "CLAIM_DEADLINE", 0.5)
    with running("threads") as server:
        real_start = _thread.start_new_thread
        died = threading.Event()

        def start(run: Callable[..., None], args: tuple[Any, ...]) -> int:
            if not died.is_set():  # the first thread is made, and dies at once
                died.set()
                return 0
            return int(real_start(run, args))

        monkeypatch.setattr(_thread, "start_new_thread", start)
        with connect(server.address) as orphan:
            assert orphan.recv(1) == b""  # closed by the accept loop, not left open
        assert echo_once(server.address, b"next") == b"next"
        wait_until(lambda: balanced(server), what="every connection closed and counted")
        assert server.sample("echo_thread_start_failures_total") == 1
        assert server.sample("echo_connections_rejected_total", reason="thread_start_failed") == 1


def test_an_error_in_what_runs_after_a_wait_does_not_end_the_loop() -> None:
    # Everything parked in the loop, and accepting, depend on its one thread: a bug in
    # one user's after-wait work (timeouts, hand-backs) must be reported, not fatal.
    loop = EventLoop(0.001, lambda: None)
    calls: list[str] = []

    def faulty(_now: float) -> None:
        calls.append("faulty")
        if len(calls) == 1:
            raise RuntimeError("a bug")

    def counting(_now: float) -> None:
        calls.append("counting")
        if calls.count("counting") == 3:
            loop.stop()

    loop.after_each_wait(faulty)
    loop.after_each_wait(counting)
    try:
        loop.run()
    finally:
        loop.close()
    assert calls[:2] == ["faulty", "counting"]  # the one after the faulty one still ran
    assert calls.count("counting") == 3
