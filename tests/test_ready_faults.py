"""The fault paths of ready dispatch: a wake-up that fails, epoll_wait and epoll_ctl that
fail, a submit that fails after queuing the job, a leader that hangs. One fault each,
injected where the kernel or the allocator would raise it; no connection is lost, no
loop wedged, every count right."""

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
import services.echo
import services.loop
import services.metrics_http
import services.ready
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


@pytest.mark.parametrize("model", BOUNDED)
def test_a_leader_whose_interruption_fails_still_ends_with_the_server(model: str) -> None:
    # close_all() interrupts the leader's wait on the parked set; if that byte is never
    # sent, the leader still ends once its wait times out (WAIT), and the server stops
    # clean: no thread left behind, every connection counted.
    with running(model, workers=2) as server, one_connection(server):
        parked = parked_set(server)
        real = parked._interrupt_writer
        fault = RaiseOnce(real.send, OSError(errno.ENOBUFS, "no buffer space"))
        parked._interrupt_writer = WakeWriter(real, fault)  # type: ignore[assignment]
        inner = server.service.server
        inner.stop()
        assert inner.wait_stopped(EVENTUALLY)
        assert fault.fired.is_set()
    assert server.clean
    assert balanced(server)


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
            wait = parked.wait
            fired, entered = threading.Event(), threading.Event()

            def lose_events(timeout: float, most: int) -> list[Any]:
                entered.set()
                taken = wait(timeout, most)
                if taken and not fired.is_set():  # events taken, then the list is lost
                    fired.set()
                    raise MemoryError
                return taken

            monkeypatch.setattr(parked, "wait", lose_events)
            assert entered.wait(EVENTUALLY)  # the leader waits through the fault now
            for sock in clients:
                sock.sendall(b"after the lost events")
            for sock in clients:
                assert recv_exactly(sock, 21) == b"after the lost events"
            assert fired.is_set()
        finally:
            for sock in clients:
                sock.close()
        wait_until(lambda: balanced(server), what="every connection closed and counted")
        assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_epoll_wait_failing_on_the_leader_pauses_it_and_loses_nothing(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wait that fails takes no event (each stays armed), so the leader only pauses, as
    # accept does, and serves them on its next wait; it must neither end nor spin.
    with running(model, workers=2, linger=0.0) as server, one_connection(server) as sock:
        parked, inner = parked_set(server), server.service.server
        assert isinstance(inner, PoolServer)
        submits: list[Callable[[], None]] = []
        submit = inner.submit

        def counted(job: Callable[[], None]) -> None:
            submits.append(job)
            submit(job)

        monkeypatch.setattr(inner, "submit", counted)
        fault = RaiseOnce(parked.wait, OSError(errno.EINVAL, "epoll_wait"))
        monkeypatch.setattr(parked, "wait", fault)
        wait_until(fault.fired.is_set, what="the leader's wait to fail")
        assert_still_served(sock, server)
        assert 2 <= fault.calls < 100, "the leader spun, or stopped waiting"
        assert not submits, "the leader ended, and another had to be called"
    wait_until(lambda: balanced(server), what="every connection closed and counted")
    assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_a_batch_that_cannot_be_counted_as_queued_is_closed_and_counted(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The leader counts a batch of ready connections as queued in one step. If that
    # step keeps failing (memory), they are out of the parked set and not in the queue:
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
            # The leader waits at this gate, so that the four are ready when it looks:
            # one batch (a lone event is served at once, never counted as queued).
            parked, gate, at_gate = parked_set(server), threading.Event(), threading.Event()
            wait = parked.wait

            def gated(timeout: float, most: int) -> list[Any]:
                if failing.is_set():
                    at_gate.set()
                    gate.wait(EVENTUALLY)
                    return wait(0, most)
                return wait(timeout, most)

            failing.set()
            monkeypatch.setattr(parked, "wait", gated)
            assert at_gate.wait(EVENTUALLY)
            for sock in clients:
                sock.sendall(b"never counted")  # on loopback, in the server's buffer now
            gate.set()
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
    can (it appends the job, then counts it). `worker_first`: the job has claimed itself
    before the submitter sees the error; else the submitter handles the error first."""

    def __init__(self, submit: Callable[[Callable[[], None]], None], worker_first: bool) -> None:
        self._submit, self._worker_first = submit, worker_first
        self.fired = threading.Event()
        self.job_started = threading.Event()

    def __call__(self, job: Callable[[], None]) -> None:
        if self.fired.is_set():
            self._submit(job)
            return
        self.fired.set()
        submitter_done = threading.Event()

        def run() -> None:
            if not self._worker_first:
                submitter_done.wait(EVENTUALLY)
            self.job_started.set()
            job()

        self._submit(run)
        if self._worker_first:
            claim = job.args[0]  # type: ignore[attr-defined]  # partial(PoolQueue._lead, claim)
            wait_until(lambda: not claim, what="the job to claim itself")
        else:
            threading.Timer(0.2, submitter_done.set).start()  # after the error is handled
        raise MemoryError


@pytest.mark.parametrize("worker_first", [True, False], ids=["worker-first", "loop-first"])
@pytest.mark.parametrize("model", BOUNDED)
def test_a_submit_that_fails_after_queuing_counts_its_job_once(
    model: str, worker_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever claims the job first decides: it runs, or the submitter counts it as never
    # submitted and the lead is taken again later; never both (two jobs counted as one,
    # or a job counted that never ends, would leave no one to lead). A turn that
    # lingers submits a job to take the lead (one client, two workers: it may linger).
    with running(model, workers=2, linger=0.2) as server, one_connection(server) as sock:
        inner = server.service.server
        assert isinstance(inner, PoolServer) and isinstance(inner.dispatch, ReadyDispatch)
        queue = inner.dispatch._queue
        # The first message's turn lingered; once it has ended (0.2 s of quiet), the
        # next message's turn lingers afresh, and hands the lead on through a submit.
        wait_until(
            lambda: server.stats.busy.value == 0 and queue.jobs == 1 and not queue.in_turn,
            what="the leader alone, waiting",
        )
        fault = QueuedThenFailed(inner.submit, worker_first)

        monkeypatch.setattr(inner, "submit", fault)
        sock.sendall(b"the turn whose submit fails")
        sock.settimeout(EVENTUALLY)
        assert recv_exactly(sock, 27) == b"the turn whose submit fails"
        assert fault.job_started.wait(EVENTUALLY)
        assert_still_served(sock, server)
    assert server.clean  # every worker ended: no job is left running
    # A leader ends once its wait sees the server stopped; the executor does not join it.
    wait_until(lambda: queue.jobs == 0, what="a job counted twice, or one counted that never ran")
    wait_until(lambda: balanced(server), what="every connection closed and counted once")
    assert server.sample("echo_connections_closed_total", reason="error") == 0
    assert server.stats.queued.value == 0 and server.stats.busy.value == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_a_job_the_pool_refuses_is_submitted_again(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool refuses the job a lingering turn asks for to take the lead (out of memory
    # before it queued anything): the turn stops lingering and its worker leads again,
    # or the loop submits again on its next pass.
    with running(model, workers=2, linger=0.2) as server, one_connection(server) as sock:
        inner = server.service.server
        assert isinstance(inner, PoolServer) and isinstance(inner.dispatch, ReadyDispatch)
        queue = inner.dispatch._queue
        # The first message's turn lingered; once it has ended (0.2 s of quiet), the
        # next message's turn lingers afresh, and hands the lead on through a submit.
        wait_until(
            lambda: server.stats.busy.value == 0 and queue.jobs == 1 and not queue.in_turn,
            what="the leader alone, waiting",
        )
        fault = RaiseOnce(inner.submit, MemoryError())

        monkeypatch.setattr(inner, "submit", fault)
        sock.sendall(b"the turn whose job is refused")
        sock.settimeout(EVENTUALLY)
        assert recv_exactly(sock, 29) == b"the turn whose job is refused"
        assert fault.fired.wait(EVENTUALLY)  # the turn lingers after the echo is sent
        assert_still_served(sock, server)
    assert server.clean
    # A leader ends once its wait sees the server stopped; the executor does not join it.
    wait_until(lambda: queue.jobs == 0, what="a refused job still counted")
    wait_until(lambda: balanced(server), what="every connection closed and counted once")
    assert server.sample("echo_connections_closed_total", reason="error") == 0


@pytest.mark.parametrize("model", BOUNDED)
def test_a_leader_that_never_ends_its_turn_trips_the_watchdog(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other clients' events wait in the kernel, where no counter sees them: only the
    # leader's own lane can tell that it has stopped.
    release = threading.Event()
    echo_turn = services.echo.echo_turn

    def hang_on_stuck(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if sock.recv(5, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"stuck":
            release.wait(EVENTUALLY)
        return echo_turn(sock, *args, **kwargs)

    monkeypatch.setattr(services.ready, "echo_turn", hang_on_stuck)
    trips: list[str] = []
    with (
        running(
            model, on_trip=trips.append, workers=2, linger=0.0, watchdog_timeout=MIN_TIMEOUT
        ) as server,
        one_connection(server) as sock,
    ):
        try:
            sock.sendall(b"stuck")
            wait_until(lambda: trips, what="the watchdog to trip")
            assert "leader made no progress" in trips[0], trips
        finally:
            release.set()


@pytest.mark.parametrize("model", BOUNDED)
def test_a_connection_parked_after_the_loop_ended_is_closed_by_its_worker(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A turn ended while the server was running, then the loop ended (closing everything
    # parked) before the turn's connection was parked again: nothing would ever close
    # it, so its worker closes it itself, and it is counted once.
    with running(model, workers=2, linger=0.0) as server:
        inner = server.service.server
        ready = inner.dispatch
        assert isinstance(ready, ReadyDispatch)
        real_park = ready._park
        trap, trapped = threading.Event(), threading.Event()

        def park(conn: Any) -> None:
            if trap.is_set() and not trapped.is_set():
                trapped.set()
                # Hold it until the loop has ended (ready._loop_done: the moment
                # close_all() has taken everything it will ever take).
                wait_until(lambda: ready._loop_done, what="the loop to end")
            real_park(conn)

        monkeypatch.setattr(ready, "_park", park)
        with connect(server.address) as sock:
            assert roundtrip(sock, b"first") == b"first"
            trap.set()
            sock.sendall(b"parked after the end")
            assert trapped.wait(EVENTUALLY)
            inner.stop()
            assert inner.wait_stopped(EVENTUALLY)
    assert server.clean
    assert server.sample("echo_connections_closed_total", reason="shutdown") == 1
    assert balanced(server)
