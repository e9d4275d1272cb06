"""The fault paths of ready dispatch: a wake-up that fails, epoll_ctl that fails, a submit
that fails after queuing the job. One fault each, injected where the kernel or the
allocator would raise it; no connection is lost, no loop wedged, every count right."""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import services.accepting
import services.loop
import services.metrics_http
from services.parked import ParkedSet
from services.pool import PoolServer
from services.ready import ReadyDispatch
from services.watchdog import MIN_TIMEOUT
from support import (
    BOUNDED,
    EVENTUALLY,
    RunningService,
    balanced,
    connect,
    recv_exactly,
    roundtrip,
    running,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.faults  # make test-faults


class RaiseOnce:
    """Calls `call`, except the first time (after `after` calls), when it raises `error`,
    before calling (`first=True`) or after it (as a call that did its work, then failed)."""

    def __init__(
        self, call: Callable[..., Any], error: BaseException, *, first: bool = True, after: int = 0
    ) -> None:
        self._call, self._error, self._first, self._after = call, error, first, after
        self._lock = threading.Lock()
        self.calls = 0
        self.fired = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
            fire = self.calls == self._after + 1
        if fire and self._first:
            self.fired.set()
            raise self._error
        result = self._call(*args, **kwargs)
        if fire:
            self.fired.set()
            raise self._error
        return result


class WakeWriter:
    """Stands in for the server's wake-up socket: its `send` is the one given."""

    def __init__(self, sock: socket.socket, send: Callable[[bytes], int]) -> None:
        self._sock, self.send = sock, send

    def close(self) -> None:
        self._sock.close()


@contextmanager
def one_connection(server: RunningService) -> Iterator[socket.socket]:
    with connect(server.address) as sock:
        assert roundtrip(sock, b"first") == b"first"  # admitted and parked
        yield sock


def closed_by_server(sock: socket.socket) -> bool:
    """Reads to the server's close: EOF, or a reset (closed with bytes unread)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def parked_set(server: RunningService) -> ParkedSet:
    inner = server.service.server
    assert isinstance(inner.dispatch, ReadyDispatch)
    return inner.dispatch._parked


def assert_still_served(sock: socket.socket, server: RunningService) -> None:
    for n in range(3):
        payload = b"after the fault %d" % n
        assert roundtrip(sock, payload) == payload


@pytest.mark.parametrize("error", [OSError(errno.ENOBUFS, "no buffer space"), MemoryError()])
@pytest.mark.parametrize("model", BOUNDED)
def test_a_failed_wake_up_strands_no_hand_back(model: str, error: BaseException) -> None:
    # No linger: every message is a turn and a hand-back. The first wake-up after the
    # fault sends nothing; the hand-back must still be taken, and later ones woken.
    with running(model, workers=2, linger=0.0) as server, one_connection(server) as sock:
        inner = server.service.server
        real = inner.loop._wake_writer
        fault = RaiseOnce(real.send, error)
        inner.loop._wake_writer = WakeWriter(real, fault)  # type: ignore[assignment]
        assert_still_served(sock, server)
        assert fault.fired.is_set()
    wait_until(lambda: balanced(server), what="every connection closed and counted")
    assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_epoll_ctl_failing_when_a_worker_arms_a_connection_closes_and_counts_it(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(model, workers=2, linger=0.0) as server, one_connection(server) as sock:
        parked = parked_set(server)
        fault = RaiseOnce(parked.arm, OSError(errno.ENOMEM, "epoll_ctl"))
        monkeypatch.setattr(parked, "arm", fault)
        # The next turn to end (the first message's, if its worker has not armed it
        # yet, or this one's) cannot arm the connection for its next message: the
        # worker closes the connection, and counts it.
        with contextlib.suppress(OSError):  # closed already
            sock.sendall(b"not armed after this")
        sock.settimeout(EVENTUALLY)
        assert closed_by_server(sock)
        assert fault.fired.is_set()
        monkeypatch.undo()
        wait_until(lambda: balanced(server), what="the connection closed and counted")
        assert server.sample("echo_connections_closed_total", reason="error") == 1
        with connect(server.address) as other:
            assert roundtrip(other, b"next") == b"next"


@pytest.mark.parametrize("model", BOUNDED)
def test_events_lost_to_a_memory_error_after_epoll_wait_are_served_all_the_same(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # epoll_wait takes the events (each disarms its connection), and then building the
    # list of them fails: without arming them again, these clients would wait for their
    # echo until the idle timeout closed them.
    with running(model, workers=2, linger=0.0, idle_timeout=300.0) as server:
        clients = [connect(server.address) for _ in range(4)]
        try:
            for sock in clients:
                assert roundtrip(sock, b"parked") == b"parked"
            parked = parked_set(server)
            fault = RaiseOnce(parked.with_events, MemoryError(), first=False)
            monkeypatch.setattr(parked, "with_events", fault)
            for sock in clients:
                sock.sendall(b"after the lost events")
            for sock in clients:
                assert recv_exactly(sock, 21) == b"after the lost events"
            assert fault.fired.is_set()
        finally:
            for sock in clients:
                sock.close()
        wait_until(lambda: balanced(server), what="every connection closed and counted")
        assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_a_batch_that_cannot_be_counted_as_queued_is_closed_and_counted(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop counts a wake's ready connections as queued in one step. If that step
    # keeps failing (memory), they are out of the parked set and not in the queue:
    # without closing them, they would wait for an echo until the idle timeout.
    with running(model, workers=2, linger=0.0, idle_timeout=300.0) as server:
        stats = server.stats
        clients = [connect(server.address) for _ in range(4)]
        try:
            for sock in clients:
                assert roundtrip(sock, b"parked") == b"parked"
            failing = threading.Event()
            move = stats.move

            def out_of_memory(source: Any, target: Any, count: int = 1) -> None:
                if failing.is_set() and source is stats.waiting and target is stats.queued:
                    raise MemoryError
                move(source, target, count)

            monkeypatch.setattr(stats, "move", out_of_memory)
            failing.set()
            for sock in clients:
                sock.sendall(b"never counted")
            for sock in clients:
                assert closed_by_server(sock)
            failing.clear()
            wait_until(
                lambda: server.sample("echo_connections_closed_total", reason="error") == 4,
                what="the four closed as errors",
            )
            with connect(server.address) as other:
                assert roundtrip(other, b"next") == b"next"
        finally:
            for sock in clients:
                sock.close()
        wait_until(lambda: balanced(server), what="every connection closed and counted")


@pytest.mark.parametrize("model", BOUNDED)
def test_epoll_ctl_failing_when_the_listener_comes_back_only_backs_off_longer(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(model, workers=2) as server:
        inner = server.service.server
        # accept() fails once (out of descriptors): the listener is paused; then putting
        # it back in the selector fails once.
        accept = RaiseOnce(services.accepting.accept_connection, OSError(errno.EMFILE, "EMFILE"))
        monkeypatch.setattr(services.loop, "accept_connection", accept)
        # The only registration with the loop from here on: the listener coming back.
        register = RaiseOnce(inner.loop.watch, OSError(errno.ENOMEM, "epoll_ctl"))
        monkeypatch.setattr(inner.loop, "watch", register)
        with connect(server.address) as sock:
            assert roundtrip(sock, b"accepted at last") == b"accepted at last"
        assert accept.fired.is_set() and register.fired.is_set()


class FlakyClientSelector(selectors.DefaultSelector):
    """Its first registration of a metrics client fails as epoll_ctl can (ENOMEM)."""

    failed = threading.Event()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        client = getattr(data, "args", (None,))[0]  # a client's callback: partial(handler, client)
        if isinstance(client, services.metrics_http._Client) and not self.failed.is_set():
            self.failed.set()
            raise OSError(errno.ENOMEM, "epoll_ctl")
        return super().register(fileobj, events, data)


def test_epoll_ctl_failing_for_a_metrics_client_drops_only_that_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FlakyClientSelector.failed.clear()
    monkeypatch.setattr(selectors, "DefaultSelector", FlakyClientSelector)
    with running("queue") as server:
        address = server.service.metrics_address

        def scraped() -> bool:
            try:
                return bool(scrape(address, timeout=2.0))
            except OSError:
                return False

        wait_until(scraped, what="a scrape after the failed registration")
        assert FlakyClientSelector.failed.is_set()


class QueuedThenFailed:
    """A submit that queues the job and then raises MemoryError, once, as queue.Queue.put
    can (it appends the job, then counts it). `worker_first`: the worker has started the
    job before the loop sees the error; else the loop handles the error first."""

    def __init__(self, submit: Callable[[Callable[[], None]], None], worker_first: bool) -> None:
        self._submit, self._worker_first = submit, worker_first
        self.fired = threading.Event()
        self.job_ran = threading.Event()

    def __call__(self, job: Callable[[], None]) -> None:
        if self.fired.is_set():
            self._submit(job)
            return
        self.fired.set()
        loop_done = threading.Event()

        def run() -> None:
            if not self._worker_first:
                loop_done.wait(EVENTUALLY)
            job()
            self.job_ran.set()

        self._submit(run)
        if self._worker_first:
            self.job_ran.wait(EVENTUALLY)
        else:
            threading.Timer(0.2, loop_done.set).start()  # after the loop handled it
        raise MemoryError


@pytest.mark.parametrize("worker_first", [True, False], ids=["worker-first", "loop-first"])
@pytest.mark.parametrize("model", BOUNDED)
def test_a_submit_that_fails_after_queuing_counts_its_job_once(
    model: str, worker_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever claims the job first decides: it runs, or the loop counts it as never
    # submitted and submits another later; never both (two jobs counted as one, or a
    # job counted that never ends, would leave ready connections without a worker).
    with running(model, workers=2, linger=0.0) as server, one_connection(server) as sock:
        inner = server.service.server
        assert isinstance(inner, PoolServer) and isinstance(inner.dispatch, ReadyDispatch)
        queue = inner.dispatch._queue
        fault = QueuedThenFailed(inner.submit, worker_first)
        monkeypatch.setattr(inner, "submit", fault)
        sock.sendall(b"the turn whose submit fails")
        sock.settimeout(EVENTUALLY)
        assert recv_exactly(sock, 27) == b"the turn whose submit fails"
        assert fault.job_ran.wait(EVENTUALLY)
        assert_still_served(sock, server)
    assert server.clean  # every worker ended: no job is left running
    assert queue.jobs == 0, "a job counted twice, or one counted that never ran"
    wait_until(lambda: balanced(server), what="every connection closed and counted once")
    assert server.sample("echo_connections_closed_total", reason="error") == 0
    assert server.stats.queued.value == 0 and server.stats.busy.value == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_a_job_the_pool_refuses_is_submitted_again(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool refuses the job outright (out of memory before it queued anything): the
    # ready connection waits in the queue, and the loop submits again on its next tick.
    with running(model, workers=2, linger=0.0) as server, one_connection(server) as sock:
        inner = server.service.server
        assert isinstance(inner, PoolServer) and isinstance(inner.dispatch, ReadyDispatch)
        queue = inner.dispatch._queue
        fault = RaiseOnce(inner.submit, MemoryError())
        monkeypatch.setattr(inner, "submit", fault)
        sock.sendall(b"the turn whose job is refused")
        sock.settimeout(EVENTUALLY)
        assert recv_exactly(sock, 29) == b"the turn whose job is refused"
        assert fault.fired.is_set()
        assert_still_served(sock, server)
    assert server.clean
    assert queue.jobs == 0, "a refused job still counted"
    wait_until(lambda: balanced(server), what="every connection closed and counted once")
    assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_hand_backs_the_loop_never_takes_trip_the_watchdog(model: str) -> None:
    trips: list[str] = []
    with (
        running(
            model, on_trip=trips.append, workers=2, linger=0.0, watchdog_timeout=MIN_TIMEOUT
        ) as server,
        one_connection(server) as sock,
    ):
        ready = server.service.server.dispatch
        assert isinstance(ready, ReadyDispatch)
        ready.take_back = lambda: None  # type: ignore[method-assign]
        try:
            sock.sendall(b"handed back, never taken")
            wait_until(lambda: trips, what="the watchdog to trip")
            assert "hand-backs made no progress" in trips[0], trips
        finally:
            del ready.take_back  # the class's again, so the loop can close it on the way out


@pytest.mark.parametrize("model", BOUNDED)
def test_a_connection_handed_back_after_the_loop_ended_is_closed_by_its_worker(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker checked that the server was not stopping, then the loop ended (closing
    # everything it held) before the worker's hand-back: nothing will take it back, so
    # the worker closes it itself, and it is counted once.
    with running(model, workers=2, linger=0.0) as server:
        inner = server.service.server
        ready = inner.dispatch
        assert isinstance(ready, ReadyDispatch)
        parked = ready._parked
        real_arm = parked.arm
        trap, trapped = threading.Event(), threading.Event()

        def arm(conn: Any, events: int) -> None:
            if trap.is_set() and not trapped.is_set():
                trapped.set()
                # Hold the hand-back until the loop has ended (ready._loop_done: the
                # moment close_all() has taken everything it will ever take).
                wait_until(lambda: ready._loop_done, what="the loop to end")
                return  # the epoll set is closed now; the hand-back goes on to append
            real_arm(conn, events)

        monkeypatch.setattr(parked, "arm", arm)
        with connect(server.address) as sock:
            assert roundtrip(sock, b"first") == b"first"
            trap.set()
            sock.sendall(b"handed back after the end")
            assert trapped.wait(EVENTUALLY)
            inner.stop()
            assert inner.wait_stopped(EVENTUALLY)
    assert server.clean
    assert server.sample("echo_connections_closed_total", reason="shutdown") == 1
    assert balanced(server)
