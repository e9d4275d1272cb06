"""The recipe's bounded pools (`connection` dispatch: a connection owns a worker for its
life) reject what they cannot hold and free workers pinned by bad clients."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

from services.config import Config
from services.echo import echo
from support import (
    BOUNDED,
    connect,
    echo_once,
    held_open,
    open_connections,
    recv_exactly,
    roundtrip,
    running,
    wait_until,
)


def closed_by_server(sock: socket.socket) -> bool:
    return bool(wait_until(lambda: not held_open(sock), what="the server to close the connection"))


@pytest.mark.parametrize("model", BOUNDED)
def test_fourth_connection_is_rejected_with_two_workers_and_a_queue_of_one(model: str) -> None:
    with running(model, dispatch="connection", workers=2, queue_size=1) as server:
        stats = server.stats
        with connect(server.address) as first, connect(server.address) as second:
            assert roundtrip(first, b"1") == b"1"
            assert roundtrip(second, b"2") == b"2"
            assert stats.busy.value == 2
            with connect(server.address) as third:
                third.sendall(b"3")
                wait_until(lambda: stats.queued.value == 1, what="the third connection to queue")
                with connect(server.address) as fourth:
                    assert closed_by_server(fourth)
                    assert (
                        server.sample("echo_connections_rejected_total", reason="queue_full") == 1
                    )
                    assert server.sample("echo_queue_depth") == 1
                    assert server.sample("echo_workers_busy") == 2
                # A worker frees up: the queued connection is served, nothing was lost.
                first.close()
                assert recv_exactly(third, 1) == b"3"
        assert stats.rejected["queue_full"].value == 1


@pytest.mark.parametrize("model", BOUNDED)
def test_idle_connection_is_closed_and_the_worker_serves_the_next(model: str) -> None:
    with running(model, dispatch="connection", workers=1, queue_size=1, idle_timeout=1.0) as server:
        with connect(server.address) as idle, connect(server.address) as waiting:
            waiting.sendall(b"next")
            assert closed_by_server(idle)
            assert recv_exactly(waiting, 4) == b"next"
        assert server.sample("echo_connections_closed_total", reason="idle") == 1


@pytest.mark.parametrize("model", [*BOUNDED, "threads"])
def test_client_that_never_reads_frees_its_worker_after_the_send_timeout(model: str) -> None:
    with running(
        model, dispatch="connection", workers=1, queue_size=1, idle_timeout=30.0, send_timeout=1.0
    ) as server:
        flood = connect(server.address)
        flood.settimeout(60)

        def send_without_reading() -> None:
            with contextlib.suppress(OSError):  # the server gives up on us: reset or broken pipe
                flood.sendall(os.urandom(10 * 1024 * 1024))

        sender = threading.Thread(target=send_without_reading)
        sender.start()
        try:
            wait_until(
                lambda: server.stats.closed["slow_reader"].value == 1,
                what="the slow reader to be cut off",
            )
            assert echo_once(server.address, b"served") == b"served"
        finally:
            flood.close()
            sender.join(60)


def test_send_timeout_bounds_a_whole_echo_not_each_send_call() -> None:
    # A client that reads a trickle lets every send() make a little progress, so a
    # per-call timeout never fires; the echo as a whole must still end in time.
    with running(
        "executor",
        dispatch="connection",
        workers=1,
        queue_size=1,
        idle_timeout=30.0,
        send_timeout=1.0,
    ) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.address)
        client.settimeout(60)
        stop = threading.Event()

        def send_everything() -> None:
            with contextlib.suppress(OSError):
                client.sendall(os.urandom(8 * 1024 * 1024))

        def read_a_trickle() -> None:
            with contextlib.suppress(OSError):  # 8 KiB/s: the echo would take 1,000 s
                while not stop.wait(0.05) and client.recv(400):
                    pass

        threads = [
            threading.Thread(target=send_everything),
            threading.Thread(target=read_a_trickle),
        ]
        for thread in threads:
            thread.start()
        try:
            wait_until(
                lambda: server.stats.closed["slow_reader"].value == 1,
                what="the trickle reader to be cut off",
            )
        finally:
            stop.set()
            client.close()
            for thread in threads:
                thread.join(60)


def test_executor_starts_every_worker_before_the_first_connection() -> None:
    with running("executor", dispatch="connection", workers=5, queue_size=1) as server:
        assert server.sample("echo_worker_threads") == 5
        assert len([t for t in threading.enumerate() if t.name.startswith("echo-executor")]) == 5


def test_threads_model_has_no_timeouts_by_default() -> None:
    assert Config(model="threads").idle_timeout is None
    assert Config(model="threads").send_timeout is None
    with running("threads") as server:  # the model's defaults: nothing overridden
        assert server.service.config.idle_timeout is None
        with connect(server.address) as idle:
            wait_until(lambda: server.stats.busy.value == 1, what="the idle connection's thread")
            assert held_open(idle)
            assert roundtrip(idle, b"later") == b"later"


@pytest.mark.parametrize("model", BOUNDED)
def test_idle_clock_starts_at_accept_not_when_a_worker_picks_it_up(model: str) -> None:
    # One worker and 20 waiting, all idle, 2 s idle timeout. Timed from pick-up,
    # the last would be cut off after 21 x 2 = 42 s; timed from accept, all go at ~2 s.
    with (
        running(model, dispatch="connection", workers=1, queue_size=20, idle_timeout=2.0) as server,
        open_connections(server.address, 21),
    ):
        wait_until(lambda: server.stats.accepted.value == 21, what="all 21 accepted")
        wait_until(
            lambda: server.stats.closed["idle"].value == 21,
            timeout=25,
            what="every idle connection to be closed about 2 s after its accept",
        )


def test_bytes_a_slow_reader_took_before_it_stalled_are_counted_as_sent() -> None:
    # The echo that stalls is partly sent: what the kernel took of it reached the client
    # and belongs in echo_sent_bytes_total as much as any whole echo does. Small buffers
    # on both sides make the last echo a partial one.
    counted: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024)
        client.connect(listener.getsockname())
        server_end, _ = listener.accept()
    with server_end, client:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024)

        def send_without_reading() -> None:
            with contextlib.suppress(OSError):  # the server end closes on us
                client.sendall(os.urandom(4 * 1024 * 1024))

        sender = threading.Thread(target=send_without_reading)
        sender.start()
        try:
            reason = echo(
                server_end,
                idle_timeout=30.0,
                send_timeout=0.5,
                on_traffic=lambda _received, sent, _messages: counted.append(sent),
            )
            server_end.shutdown(socket.SHUT_WR)  # FIN after the echoes: the client reads to EOF
            client.shutdown(socket.SHUT_WR)
            client.settimeout(30)
            delivered = 0
            while chunk := client.recv(65536):
                delivered += len(chunk)
        finally:
            server_end.shutdown(socket.SHUT_RDWR)
            sender.join(60)
    assert reason == "slow_reader"
    assert delivered > 0
    assert sum(counted) == delivered
