"""Helpers shared by the tests: deadlines, servers in-process and as processes, raw clients."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.launcher import ROOT, ServerProcess, services_command
from harness.scrape import metric, scrape
from loadtest.attacks import AT_THE_CAP
from loadtest.floodrun import FloodRun, RunSettings, Target
from services.app import Service
from services.config import Config
from services.metrics_http import MAX_CONNECTIONS as METRICS_CLIENTS
from services.models import MODELS

__all__ = ["ROOT", "ServerProcess", "metric", "scrape"]  # re-exported for the tests

# Every model in every dispatch mode it has, and their test ids; the pools and the control.
MODES = [(name, mode) for name, spec in MODELS.items() for mode in spec.dispatch_modes]
MODE_IDS = [f"{name}-{mode}" for name, mode in MODES]
BOUNDED = [name for name, spec in MODELS.items() if spec.bounded]
UNBOUNDED = [name for name, spec in MODELS.items() if not spec.bounded]
# The attacks a thread per connection cannot survive (churn and the metrics port it can).
UNBOUNDED_BREAKERS = ("idle", "slowloris", "slow-reader", *AT_THE_CAP)
# Runs one flood and returns it (the `flooder` fixture: it also records the run).
Flooder = Callable[[Target, str, RunSettings], FloodRun]

# The xdist group of tests that bind the documented ports (15001-15003, 9101-9103):
# they run one after another on one worker.
FIXED_PORTS = "fixed-ports"

EVENTUALLY = 30.0  # generous: this machine can freeze a process for seconds
# What a test allows beyond a deadline the server promises (the README says so too):
# the promise is kept by the server's own clocks, but this machine can freeze a process
# for a second or two between the signal and the exit.
FREEZE_MARGIN = 2.0


def wait_until(
    predicate: Callable[[], Any], timeout: float = EVENTUALLY, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # a poll step under a deadline, not a wait for an outcome
        interval = min(interval * 2, 0.1)


def config(model: str, **overrides: Any) -> Config:
    """A config for tests: the model's defaults, loopback, free ports, and whatever the test
    overrides."""
    return Config(
        **{"model": model, "port": 0, "metrics_port": 0, "log_level": "DEBUG", **overrides}
    )


class RunningService:
    def __init__(self, service: Service, thread: threading.Thread) -> None:
        self.service = service
        self.thread = thread
        self.clean: bool | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.service.address

    @property
    def stats(self) -> Any:
        return self.service.server.stats

    def sample(self, name: str, **labels: str) -> float:
        value = self.service.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.contextmanager
def running(
    model: str, on_trip: Callable[[str], None] | None = None, **overrides: Any
) -> Iterator[RunningService]:
    """Serve `model` on a thread of this process; always stopped and joined on exit."""
    cfg = config(model, **overrides)
    service = Service(cfg, on_trip) if on_trip else Service(cfg)
    handle: RunningService

    def serve() -> None:
        handle.clean = service.run()

    handle = RunningService(service, threading.Thread(target=serve, name=f"serve-{model}"))
    handle.thread.start()
    try:
        assert service.server.wait_accepting(EVENTUALLY), "server did not start accepting"
        yield handle
    finally:
        service.server.stop()
        handle.thread.join(EVENTUALLY)
        assert not handle.thread.is_alive(), "server did not stop"


def connect(address: tuple[str, int], timeout: float = EVENTUALLY) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def echo_once(address: tuple[str, int], payload: bytes, timeout: float = EVENTUALLY) -> bytes:
    """Send `payload` on a fresh connection, half-close, and read all that comes back."""
    with connect(address, timeout) as sock:
        sender = threading.Thread(target=send_and_shut, args=(sock, payload))
        sender.start()
        received = recv_exactly(sock, len(payload) + 1)
        sender.join(timeout)
    return received


def send_and_shut(sock: socket.socket, payload: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def is_served(address: tuple[str, int], timeout: float = 5.0) -> bool:
    """One probe: a fresh connection gets a byte-exact echo within `timeout`."""
    try:
        with connect(address, timeout) as sock:
            return roundtrip(sock, b"probe") == b"probe"
    except OSError:
        return False


ESTABLISHED = "01"  # a TCP state in /proc/net/tcp


def server_end(client_port: int, server_port: int) -> tuple[str, int] | None:
    """The server's end of a loopback IPv4 connection as the kernel sees it
    (/proc/net/tcp): its TCP state (hex: "01" is established) and the bytes it has
    received and not read; None once the kernel has let it go."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state, queues = line.split()[1:5]
        if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (
            server_port,
            client_port,
        ):
            return state, int(queues.split(":")[1], 16)
    return None


def held_open(sock: socket.socket) -> bool:
    """True while the peer has not closed `sock` (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# `python -c LIMITED RLIMIT_NAME N ARGS...`: the server under that limit, soft and hard.
LIMITED = """
import resource, sys
from services.app import main
limit = int(sys.argv[2])
resource.setrlimit(getattr(resource, sys.argv[1]), (limit, limit))
sys.exit(main(sys.argv[3:]))
"""


@contextlib.contextmanager
def server_process(
    tmp_path: Path, *args: str, code: str | None = None, code_args: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    """A server process on free ports; `code` replaces `-m services`, given `code_args` first.
    No ECHO_* variable of the test run's own reaches it."""
    command = services_command(*code_args, "--port", "0", "--metrics-port", "0", *args, code=code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    proc = ServerProcess(command, log_path=tmp_path / "server.log", env=env)
    try:
        yield proc.wait_ready(EVENTUALLY)
    except BaseException:
        print(proc.log())
        raise
    finally:
        proc.close()


@contextlib.contextmanager
def open_connections(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """Open `count` idle connections (those the server refuses are kept too); close all on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(EVENTUALLY)
            socks.append(sock)
            sock.connect(address)
        yield socks
    finally:
        for sock in socks:
            sock.close()


class FaultyEcho:
    """An echo server that gets it wrong in one chosen way."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = self.listener.getsockname()
        self.stop = threading.Event()
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                if self.fault == "flip":
                    conn.sendall(bytes([data[0] ^ 0x01]) + data[1:])
                elif self.fault == "reorder":
                    half = len(data) // 2
                    conn.sendall(data[half:] + data[:half])
                elif self.fault == "close":
                    conn.sendall(data[: len(data) // 2])
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                elif self.fault == "silent":
                    continue
                else:
                    conn.sendall(data)

    def __enter__(self) -> FaultyEcho:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.listener.close()
        for conn in self.clients:
            conn.close()


def assert_landed(run: FloodRun, *, held: int, cut: bool) -> None:
    """The attack was what it says: it opened its count, at least `held` of its connections
    were open at once, and (`cut`: the server cuts some) it replaced what was cut."""
    counts = run.counts
    assert counts.opened >= 0.9 * counts.planned, counts
    assert counts.peak_open >= 0.9 * held, counts
    if cut:
        assert counts.replaced > 0, counts


def ready_holds(scenario: str, size: int) -> int:
    """Connections a ready pool holds at once: all of them, but churn holds nothing (it
    connects and resets) and the metrics endpoint its client cap (it pushes the oldest
    out for each newcomer)."""
    return {"churn": 0, "metrics-slowloris": min(size, METRICS_CLIENTS)}.get(scenario, size)


def balanced(server: RunningService) -> bool:
    """Everything accepted is rejected or closed, and no state holds a connection."""
    s = server.stats.snapshot()
    settled = s.accepted == sum(s.rejected.values()) + sum(s.closed.values())
    return settled and s.active == 0 and int(server.stats.pending_output.value) == 0
