"""`ready` dispatch: waiting connections cost a descriptor, not a worker, so a small pool
serves legitimate clients through idle floods, trickles, slow readers and the cap."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

import services.leader
import services.parked
import services.ready
from services.connection import Connection, writers_to_close
from services.echo import READ_SIZE, RECEIVE_BUFFER, Turn, echo_turn, set_kernel_timeout
from services.leader import Leader, Parked
from services.loop import EventLoop
from services.parked import ParkedSet
from services.parking import Parking
from services.ready import WRITABLE_REST
from services.states import Closed, Wait
from services.stats import ServerStats
from support import (
    BOUNDED,
    EVENTUALLY,
    config,
    connect,
    held_open,
    is_served,
    open_connections,
    roundtrip,
    running,
    server_end,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("model", BOUNDED)
def test_1000_idle_connections_leave_two_workers_free(model: str) -> None:
    with running(model, workers=2) as server:
        baseline = server.sample("echo_threads")
        with open_connections(server.address, 1000):
            wait_until(
                lambda: server.sample("echo_connections", state="waiting") >= 1000,
                what="1000 connections waiting in the loop",
            )
            assert is_served(server.address)
            assert server.sample("echo_threads") <= baseline + 1
            assert server.sample("echo_worker_threads") == 2


@contextlib.contextmanager
def trickling(address: tuple[str, int], count: int, interval: float) -> Iterator[None]:
    """`count` connections that each send a byte every `interval` seconds (and read it)."""
    socks = [connect(address) for _ in range(count)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(interval):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"t")
                    sock.recv(16)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(EVENTUALLY)
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("model", BOUNDED)
def test_200_trickling_connections_do_not_keep_a_client_out(model: str) -> None:
    with running(model, workers=2) as server, trickling(server.address, 200, 1.0):
        wait_until(lambda: server.sample("echo_messages_total") >= 200, what="the trickle to flow")
        results = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # back to back: stricter than a probe's pace
            # Kept out means never served: a deadline far past any freeze of this machine
            # still fails a pool whose workers the trickle holds.
            results.append(is_served(server.address, timeout=EVENTUALLY / 3))
        assert all(results), f"{sum(results)}/{len(results)}"


def slow_reader(address: tuple[str, int]) -> socket.socket:
    """Sends far more than its small receive buffer takes back, and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(64):
            sock.send(b"s" * 65536)
    return sock


@pytest.mark.parametrize("model", BOUNDED)
def test_slow_readers_are_closed_and_never_hold_a_worker(model: str) -> None:
    budget = 4 * 2**20
    with running(model, workers=2, send_timeout=2.0, output_budget=budget) as server:
        readers = [slow_reader(server.address) for _ in range(100)]
        try:
            wait_until(
                lambda: server.sample("echo_connections", state="writing") >= 1,
                what="slow readers stalled on their echoes",
            )
            assert is_served(server.address)  # while they stall
            peak = 0.0

            def all_closed() -> bool:
                # Counted by the server: a client still holds its unread echo after the
                # close, so from its side the connection still looks open.
                nonlocal peak
                peak = max(peak, server.sample("echo_pending_output_bytes"))
                return server.sample("echo_connections_closed_total", reason="slow_reader") >= 100

            wait_until(all_closed, what="every slow reader to be closed")
            assert server.sample("echo_connections", state="writing") == 0
            # Over the budget only by what workers handed back since the loop last looked:
            # a read's worth (64 KiB) each.
            assert peak <= budget + 8 * 65536, peak
            assert server.sample("echo_pending_output_bytes") == 0
        finally:
            for sock in readers:
                sock.close()


@pytest.mark.parametrize("model", BOUNDED)
def test_a_stalled_writer_holds_at_most_its_capped_receive_buffer(model: str) -> None:
    # Clients that send on and never read: each server end stops reading once its echo
    # stalls, and what the client sends meanwhile waits in the server's receive buffer.
    # Left to autotuning, that grew to 0.4-2.6 MB for some of 20 writers.
    with running(model, send_timeout=EVENTUALLY) as server:
        clients = [connect(server.address) for _ in range(20)]
        try:
            for sock in clients:
                sock.setblocking(False)
            deadline = time.monotonic() + EVENTUALLY
            while time.monotonic() < deadline:  # until the kernel takes nothing more
                took = 0
                for sock in clients:
                    with contextlib.suppress(BlockingIOError):
                        took += sock.send(b"w" * 65536)
                if not took and server.stats.writing.value == len(clients):
                    break
            assert server.stats.writing.value == len(clients)
            unread = [server_end(sock.getsockname()[1], server.address[1]) for sock in clients]
            assert all(end is not None for end in unread)
            # The kernel doubles what it is given, and counts some of it as overhead.
            assert max(end[1] for end in unread if end) <= 2 * RECEIVE_BUFFER, unread
        finally:
            for sock in clients:
                sock.close()


@pytest.mark.parametrize("model", BOUNDED)
def test_past_half_the_output_budget_echoes_wait_in_the_kernel_and_nothing_is_lost(
    model: str,
) -> None:
    budget, workers = 256 * 1024, 2
    with running(model, workers=workers, send_timeout=60.0, output_budget=budget) as server:
        readers = [slow_reader(server.address) for _ in range(40)]
        try:
            peak = 0.0

            def all_stalled() -> bool:
                nonlocal peak
                peak = max(peak, server.sample("echo_pending_output_bytes"))
                return server.sample("echo_connections", state="writing") >= len(readers)

            wait_until(all_stalled, what="every slow reader stalled on its echo")
            # Past half the budget nothing more is read than echoed: only turns already
            # under way when it was crossed add to it, a read (64 KiB) each.
            assert peak <= budget // 2 + workers * READ_SIZE, peak
            # So no one had to be closed to make room (the send timeout is 60 s).
            assert server.sample("echo_connections_closed_total", reason="slow_reader") == 0
            assert is_served(server.address)
        finally:
            for sock in readers:
                sock.close()


def test_over_the_budget_the_longest_stalled_writer_holding_an_echo_is_closed() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        # In stall order; the first holds nothing (its echo waits in the kernel).
        writers = [Connection(server_end, 0.0) for server_end, _ in pairs]
        unsents = (b"", b"a" * 40_000, b"b" * 30_000, b"c" * 40_000)
        for conn, unsent in zip(writers, unsents, strict=True):
            conn.unsent = unsent
        assert writers_to_close(writers, 110_000, 110_000) == []
        assert writers_to_close(writers, 110_001, 110_000) == [writers[1]]
        assert writers_to_close(writers, 110_000, 50_000) == [writers[1], writers[2]]
        assert writers_to_close(writers, 110_000, 0) == writers[1:]
        assert writers_to_close(writers[:1], 10_000, 0) == []  # closing it would free nothing
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_held_back_echo_is_taken_only_as_the_client_reads_and_arrives_whole() -> None:
    client, server_end = socket.socketpair()
    with client, server_end:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # stalls soon
        client.setblocking(False)
        sent = bytearray()
        with contextlib.suppress(BlockingIOError):  # fill everything between the two
            while True:
                chunk = os.urandom(65536)
                sent += chunk[: client.send(chunk)]
        buffer = memoryview(bytearray(READ_SIZE))
        echoed = bytearray()
        for _ in range(10_000):  # bounded: each round the client reads what came back
            turn = Turn()
            outcome = echo_turn(
                server_end,
                buffer,
                b"",
                max_messages=16,
                linger=False,
                no_one_waiting=lambda: True,
                turn=turn,
                hold_back=True,
            )
            assert turn.sent == turn.received  # nothing read that was not echoed
            if outcome == (Wait.READ, b""):
                break
            assert outcome == (Wait.WRITE, b""), outcome[0]  # the rest stays in the kernel
            with contextlib.suppress(BlockingIOError):
                while True:
                    echoed += client.recv(1 << 20)
        with contextlib.suppress(BlockingIOError):
            while len(echoed) < len(sent):
                echoed += client.recv(1 << 20)
        assert echoed == sent


@pytest.mark.parametrize("model", BOUNDED)
def test_64_busy_connections_on_2_workers_all_make_progress(model: str) -> None:
    with running(model, workers=2, turn_messages=4) as server:
        clients = [connect(server.address) for _ in range(64)]
        done = [0] * len(clients)
        stop = threading.Event()

        def pump(index: int) -> None:
            sock = clients[index]
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    assert roundtrip(sock, b"%05d" % index) == b"%05d" % index
                    done[index] += 1

        threads = [threading.Thread(target=pump, args=(n,)) for n in range(len(clients))]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: all(count >= 20 for count in done), what="every client to progress")
        finally:
            stop.set()
            for thread in threads:
                thread.join(EVENTUALLY)
            for sock in clients:
                sock.close()


@pytest.mark.parametrize("model", BOUNDED)
def test_idle_timeout_runs_from_the_last_byte(model: str) -> None:
    with (
        running(model, workers=1, idle_timeout=1.5) as server,
        connect(server.address) as talker,
        connect(server.address) as silent,
    ):
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # twice the timeout, talking throughout
            assert roundtrip(talker, b"k") == b"k"
        assert held_open(talker)
        wait_until(lambda: not held_open(silent), what="the silent one to be closed")
        assert server.sample("echo_connections_closed_total", reason="idle") == 1


@pytest.mark.parametrize("model", BOUNDED)
def test_the_dispatch_wait_histogram_counts_every_turn(model: str) -> None:
    with running(model, workers=2) as server, connect(server.address) as sock:
        for n in range(50):
            assert roundtrip(sock, b"%d" % n) == b"%d" % n
        # A turn may echo more than one message; every turn is one observation. The
        # leader adds its turns to the counters within FLUSH_INTERVAL.
        wait_until(
            lambda: server.sample("echo_dispatch_wait_seconds_count") == server.stats.started.value,
            what="every turn started counted",
        )
        turns = server.stats.started.value
        assert 1 <= turns <= 50
        assert server.sample("echo_dispatch_wait_seconds_bucket", le="+Inf") == turns
        assert server.sample("echo_dispatch_wait_seconds_sum") > 0


def test_the_leader_counts_its_time_between_waits_as_busy_and_never_a_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]

    def pause(seconds: float) -> None:  # the fake clock's own: time passes, none is spent
        now[0] += seconds

    clock = SimpleNamespace(monotonic=lambda: now[0], sleep=pause)
    monkeypatch.setattr(services.leader, "time", clock)

    class Waits:
        def wait(self, timeout: float, most: int) -> list[Connection]:
            now[0] += 1.0  # waiting for events: never busy
            return []

    parked = Parked(
        cast(ParkedSet, Waits()), Parking(None, None, 0, 0.5), threading.Lock(), lambda c, r: None
    )
    loop = cast(EventLoop, SimpleNamespace(stopping=False))
    leader = Leader(
        config("queue"), ServerStats(), loop, parked, submit=lambda job: None, serve=lambda c: False
    )
    leader.take(1.0)  # the first wait of a leader: nothing before it counts
    assert leader.busy_seconds == 0.0
    for _ in range(3):
        now[0] += 0.25  # serving what it took
        leader.take(1.0)
    assert leader.busy_seconds == 0.75
    now[0] += 0.5
    leader.stop_leading()  # its turn lingers, and the lead passes: counted up to here
    assert leader.busy_seconds == 1.25
    now[0] += 2.0
    leader.take(1.0)  # the next leader's first wait: the time no one led is not busy
    assert leader.busy_seconds == 1.25


@pytest.mark.parametrize("model", BOUNDED)
def test_the_leader_busy_seconds_grow_with_turns_in_ready_dispatch_only(model: str) -> None:
    started = time.monotonic()
    with running(model, workers=2, linger=0.0) as server, connect(server.address) as sock:
        for n in range(20):
            assert roundtrip(sock, b"%d" % n) == b"%d" % n
        wait_until(lambda: server.sample("echo_leader_busy_seconds_total") > 0, what="busy counted")
        assert server.sample("echo_leader_busy_seconds_total") < time.monotonic() - started
    with (
        running(model, workers=2, dispatch="connection") as server,
        connect(server.address) as sock,
    ):
        for n in range(20):
            assert roundtrip(sock, b"%d" % n) == b"%d" % n
        # No thread leads: the series is there, for a line per model, and stays 0.
        assert server.service.registry.get_sample_value("echo_leader_busy_seconds_total") == 0


def test_the_loop_lag_histogram_times_each_pass_from_the_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loop's pass after a wake-up (accepting, timeouts, eviction) takes 30 ms here:
    # every observation must hold it (a clock started after the wake-up would not).
    expire = services.ready.ReadyDispatch.expire

    def slow_expire(self: services.ready.ReadyDispatch, now: float) -> None:
        busy_until = time.monotonic() + 0.03  # work, not a wait: the pass holds the thread
        while time.monotonic() < busy_until:
            pass
        expire(self, now)

    monkeypatch.setattr(services.ready.ReadyDispatch, "expire", slow_expire)
    with running("queue", workers=2) as server, connect(server.address) as sock:
        assert roundtrip(sock, b"x") == b"x"
        wait_until(lambda: server.sample("echo_loop_lag_seconds_count") >= 2, what="passes")
        passes = server.sample("echo_loop_lag_seconds_count")
        assert server.sample("echo_loop_lag_seconds_bucket", le="0.025") == 0
        assert server.sample("echo_loop_lag_seconds_sum") >= 0.03 * passes


@pytest.mark.parametrize("model", BOUNDED)
def test_a_worker_with_nothing_else_to_do_keeps_a_talking_connection(model: str) -> None:
    # Lingering (on by default): a ping-pong client's next message arrives well within
    # the linger, so most messages need no turn of their own.
    # A linger far longer than a freeze of this machine, so that what is counted is the
    # design (a turn ends only when the client falls quiet), not how fast the host was.
    turns: dict[float, int] = {}
    for linger in (1.0, 0.0):
        with running(model, workers=2, linger=linger) as server, connect(server.address) as sock:
            for n in range(200):
                assert roundtrip(sock, b"%d" % n) == b"%d" % n
            turns[linger] = int(server.sample("echo_dispatch_wait_seconds_count"))  # one a turn
    # Parking at once, a turn ends as soon as nothing more has arrived (here 60% of the
    # messages needed one); lingering, the client never falls quiet for a whole second.
    assert turns[1.0] <= 10 and 3 * turns[1.0] <= turns[0.0], turns


@pytest.mark.parametrize("model", BOUNDED)
def test_a_lingering_turn_publishes_its_traffic_while_it_lasts(model: str) -> None:
    # One client talking to a worker that lingers: the turn lasts as long as the talk,
    # and the counters (and the watchdog's progress) must not wait for its end.
    payload = b"p" * 1024

    def mid_turn(stats: ServerStats) -> tuple[int, tuple[int, int]] | None:
        """(turns started, (bytes, messages) counted), read while one turn is under way
        throughout (the watchdog's progress counts messages)."""
        started, busy = stats.started.value, stats.busy.value
        counted = stats.received_bytes.value, stats.messages.value
        if busy == 1 and stats.busy.value == 1 and stats.started.value == started:
            return started, counted
        return None

    with (
        running(model, workers=2, linger=1.0) as server,
        connect(server.address) as sock,
    ):
        stats = server.stats
        seen: dict[int, tuple[int, int]] = {}  # turn -> the first counts read during it
        grew = False
        deadline = time.monotonic() + EVENTUALLY
        while not grew and time.monotonic() < deadline:
            assert roundtrip(sock, payload) == payload
            if (now := mid_turn(stats)) is not None:
                turn, counted = now
                first = seen.setdefault(turn, counted)
                grew = counted[0] > first[0] and counted[1] > first[1]
        # A freeze longer than the linger ends a turn (and publishes): only a count that
        # grew while one turn stayed under way says the turn published.
        assert grew, "a lingering turn published nothing while it lasted"
    # Every byte is counted once: the rest when the turn ended.
    assert stats.received_bytes.value == stats.sent_bytes.value


@contextlib.contextmanager
def turn_in_thread(
    server_end: socket.socket, *, no_one_waiting: bool, linger: float
) -> Iterator[tuple[threading.Thread, list[tuple[Wait | Closed, bytes]], Turn]]:
    """echo_turn() on `server_end` in a thread, as a worker runs it (blocking socket,
    the linger as its receive timeout); yields the thread, its outcome and its turn."""
    server_end.setblocking(True)
    set_kernel_timeout(server_end, socket.SO_RCVTIMEO, linger)
    outcome: list[tuple[Wait | Closed, bytes]] = []
    turn = Turn()
    buffer = memoryview(bytearray(READ_SIZE))

    def serve() -> None:
        outcome.append(
            echo_turn(
                server_end,
                buffer,
                b"",
                max_messages=16,
                linger=True,
                no_one_waiting=lambda: no_one_waiting,
                turn=turn,
            )
        )

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield thread, outcome, turn
    finally:
        thread.join(EVENTUALLY)


def test_a_worker_lingers_on_its_connection_only_while_no_one_waits() -> None:
    # Someone waits: after the echo the worker gives the connection back at once, though
    # its receive timeout (0: forever) would let it wait.
    client, server_end = socket.socketpair()
    with client, server_end:
        client.settimeout(EVENTUALLY)
        client.sendall(b"a")
        with turn_in_thread(server_end, no_one_waiting=False, linger=0.0) as (thread, out, turn):
            assert client.recv(16) == b"a"
            thread.join(EVENTUALLY)
            if thread.is_alive():
                client.shutdown(socket.SHUT_WR)  # let it go before failing
            assert not thread.is_alive(), "the worker kept the connection while others waited"
        assert out == [(Wait.READ, b"")] and turn.messages == 1
    # No one waits: the same worker waits for the next message in the same turn.
    client, server_end = socket.socketpair()
    with client, server_end:
        client.settimeout(EVENTUALLY)
        client.sendall(b"a")  # a turn starts when the connection is readable
        with turn_in_thread(server_end, no_one_waiting=True, linger=EVENTUALLY) as (_, out, turn):
            assert client.recv(16) == b"a"
            for payload in (b"b", b"c"):
                assert roundtrip(client, payload) == payload
            client.shutdown(socket.SHUT_WR)
        assert out == [(Closed.EOF, b"")] and turn.messages == 3


@pytest.mark.parametrize("model", BOUNDED)
def test_a_writer_woken_without_room_rests_instead_of_spinning(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(_sock: socket.socket, _buffer: memoryview, unsent: bytes, **_: Any) -> Any:
        # A kernel under TCP memory pressure: the socket is reported writable (as this
        # one, with an empty send buffer, always is) and takes nothing.
        return Wait.WRITE, unsent

    monkeypatch.setattr(services.ready, "echo_turn", no_room)  # where it is looked up
    with running(model, workers=2, send_timeout=30.0) as server, connect(server.address) as c:
        c.sendall(b"x")
        wait_until(lambda: server.stats.started.value >= 3, what="the writer to be woken")
        before = server.stats.started.value
        threading.Event().wait(1.0)  # a window to count turns in, not a wait for an outcome
        turns = server.stats.started.value - before
        # Resting WRITABLE_REST between wake-ups: about 2 turns a second, fewer on a slow
        # machine; watched again at once, it was thousands.
        assert turns <= 1.0 / WRITABLE_REST + 10, turns
        assert held_open(c)
