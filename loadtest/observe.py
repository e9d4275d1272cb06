"""What the flood tool watches: legitimate clients and a metrics sampler, each on its own thread.

Two kinds of legitimate client, because a server can serve one and cut the other:
- the probe, a newcomer: a fresh connection every round and one echo round trip
  with a timeout, through the Cookbook's `LazyConnection` in its `with` form;
- established clients: a few that keep their connections (a pool, a chat) and
  send a message every `think` seconds, reconnecting when cut.
The sampler scrapes the target's /metrics. None ever raises: a target that
vanishes is recorded as failures, not crashed on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from harness.scrape import scrape
from loadtest.echo_client import EchoClient, EchoFailure, classify, exchange
from loadtest.lazy import LazyConnection
from services import procfs


@dataclass(frozen=True)
class ProbeResult:
    at: float  # seconds since the run started
    ok: bool
    seconds: float
    failure: str = ""


Record = TypeVar("Record")


class Recorder(threading.Thread, Generic[Record]):
    """A daemon thread that records what it observes until `stop()`; `results()` is a
    copy, safe to take while it runs."""

    def __init__(self, name: str, origin: float) -> None:
        super().__init__(name=name, daemon=True)
        self._origin = origin  # monotonic: what `at` counts from
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._results: list[Record] = []

    def results(self) -> list[Record]:
        with self._lock:
            return list(self._results)

    def stop(self) -> None:
        self._stop_event.set()

    def _record(self, result: Record) -> None:
        with self._lock:
            self._results.append(result)


@dataclass(frozen=True)
class Exchange(ProbeResult):
    """One established client's message: `cut` when the server had closed or reset the
    connection the client kept (the client then reconnects for its next message)."""

    client: int = 0
    cut: bool = False


ESTABLISHED_MESSAGE = 1024  # bytes per message


class Established(Recorder[Exchange]):
    """`clients` legitimate clients that keep their connections, each sending
    `ESTABLISHED_MESSAGE` bytes every `think` seconds (staggered) and checking the echo."""

    def __init__(
        self,
        address: tuple[str, int],
        origin: float,
        clients: int = 4,
        think: float = 3.0,
        timeout: float = 2.0,
    ) -> None:
        super().__init__("established", origin)
        self._clients = [EchoClient(address, timeout, seed=n) for n in range(clients)]
        self._think = think

    def run(self) -> None:
        count = len(self._clients)
        start = time.monotonic()
        due = [start + self._think * n / count for n in range(count)] if count else []
        try:
            while count and not self._stop_event.is_set():
                n = min(range(count), key=due.__getitem__)
                if self._stop_event.wait(max(0.0, due[n] - time.monotonic())):
                    break
                self._send(n)
                due[n] = max(due[n] + self._think, time.monotonic())
        finally:
            for client in self._clients:
                client.close()

    def _send(self, n: int) -> None:
        client = self._clients[n]
        kept = client.connection.connected  # a connection from an earlier message
        started = time.monotonic()
        results = client.echo(ESTABLISHED_MESSAGE)
        failure = next((r.failure for r in results if r.failure is not None), None)
        kind = failure.kind if failure else ""
        self._record(
            Exchange(
                at=started - self._origin,
                ok=failure is None,
                seconds=time.monotonic() - started,
                failure=kind,
                client=n,
                cut=kept and kind in ("closed", "reset"),
            )
        )


def echo_check(address: tuple[str, int], timeout: float = 2.0) -> Callable[[int], None]:
    """A legitimate client: a fresh connection and one echo round trip."""
    connection = LazyConnection(address, timeout)

    def check(sequence: int) -> None:
        with connection as sock:
            exchange(sock, b"probe %08d" % sequence)

    return check


def scrape_check(metrics: tuple[str, int], timeout: float = 2.0) -> Callable[[int], None]:
    """Prometheus: a scrape of /metrics that must answer in full within `timeout`."""

    def check(_sequence: int) -> None:
        scrape(metrics, timeout)

    return check


class Probe(Recorder[ProbeResult]):
    """Runs `check` every `interval` seconds and records whether it raised."""

    def __init__(self, check: Callable[[int], None], origin: float, interval: float = 0.2) -> None:
        super().__init__("probe", origin)
        self._check = check
        self._interval = interval

    def run(self) -> None:
        sequence = 0
        while not self._stop_event.is_set():
            sequence += 1
            started = time.monotonic()
            failure = ""
            try:
                self._check(sequence)
            except (OSError, EchoFailure) as error:
                failure = classify(error).kind
            except ValueError:  # a scrape that came back cut short or garbled
                failure = "bad_response"
            result = ProbeResult(
                at=started - self._origin,
                ok=not failure,
                seconds=time.monotonic() - started,
                failure=failure,
            )
            self._record(result)
            self._stop_event.wait(max(0.0, self._interval - result.seconds))


# The unlabelled values the sampler keeps from each scrape: {key: metric name}.
_WANTED = {
    "threads": "echo_threads",
    "rss_bytes": "process_resident_memory_bytes",
    "open_fds": "process_open_fds",
    "active": "echo_connections_active",
    "capacity": "echo_connection_capacity",
    "queue_depth": "echo_queue_depth",
    "workers_busy": "echo_workers_busy",
    "accepted": "echo_connections_accepted_total",
    "thread_start_failures": "echo_thread_start_failures_total",
    "listen_overflows": "echo_listen_overflows_total",
    "start_time": "process_start_time_seconds",
}


@dataclass(frozen=True)
class Sample:
    at: float
    values: dict[str, float]  # empty when the scrape failed
    rejected: dict[str, float]
    closed: dict[str, float]
    info: dict[str, str]

    @property
    def ok(self) -> bool:
        return bool(self.values)


def parse_metrics(
    text: str,
) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, str]]:
    values: dict[str, float] = {}
    rejected: dict[str, float] = {}
    closed: dict[str, float] = {}
    info: dict[str, str] = {}
    by_name = {name: key for key, name in _WANTED.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in by_name:
                values[by_name[sample.name]] = sample.value
            elif sample.name == "echo_connections_rejected_total":
                rejected[sample.labels["reason"]] = sample.value
            elif sample.name == "echo_connections_closed_total":
                closed[sample.labels["reason"]] = sample.value
            elif sample.name == "echo_server_info":
                info = dict(sample.labels)
    return values, rejected, closed, info


Reading = tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, str]]
NOTHING_READ: Reading = ({}, {}, {}, {})


def metrics_reader(metrics: tuple[str, int], timeout: float = 2.0) -> Callable[[], Reading]:
    """A scrape of the target's /metrics (the project's servers)."""
    url = f"http://{metrics[0]}:{metrics[1]}/metrics"

    def read() -> Reading:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return parse_metrics(response.read().decode())
        except (OSError, ValueError):
            return NOTHING_READ

    return read


def process_reader(pid: int, find: Callable[[], int | None] | None = None) -> Callable[[], Reading]:
    """What /proc says of a server with no metrics of its own: its threads, RSS, open
    descriptors and start time. A process that is gone reads as nothing, unless `find`
    names its successor (a container restarted: its new main process), which is read
    from then on; its start time tells the verdict it restarted."""
    current = [pid]

    def read_one(pid: int) -> Reading:
        try:
            status = procfs.status(pid)
            values = {
                "threads": float(status["Threads"]),
                "rss_bytes": float(status["VmRSS"]),
                "start_time": procfs.start_ticks(pid),
            }
        except (OSError, KeyError, ValueError):
            return NOTHING_READ
        # Another user's descriptors (a container's, run as its own uid) are root's to
        # list: without them the process is still read, its descriptors unknown.
        with contextlib.suppress(PermissionError, FileNotFoundError):
            values["open_fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
        return values, {}, {}, {}

    def read() -> Reading:
        reading = read_one(current[0])
        if reading is NOTHING_READ and find is not None:
            successor = find()
            if successor and successor != current[0]:
                current[0] = successor
                reading = read_one(successor)
        return reading

    return read


class Sampler(Recorder[Sample]):
    """Reads the target every `interval` seconds; `read` is one of the readers above."""

    def __init__(self, read: Callable[[], Reading], origin: float, interval: float = 0.5) -> None:
        super().__init__("sampler", origin)
        self._read = read
        self._interval = interval

    def samples(self) -> list[Sample]:
        return self.results()

    def scrape_once(self) -> Sample:
        at = time.monotonic() - self._origin
        values, rejected, closed, info = self._read()
        return Sample(at, values, rejected, closed, info)

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            self._record(self.scrape_once())
            self._stop_event.wait(max(0.0, self._interval - (time.monotonic() - started)))
