"""What the flood tool watches: an availability probe and a metrics sampler, each on its own thread.

The probe is a legitimate client: a fresh connection every round and one echo
round trip with a timeout, through the Cookbook's `LazyConnection` in its
`with` form. The sampler scrapes the target's /metrics. Neither ever raises:
a target that vanishes is recorded as failures, not crashed on.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from loadtest.echo_client import EchoFailure, classify, exchange
from loadtest.lazy import LazyConnection
from services.metrics import scrape


@dataclass(frozen=True)
class ProbeResult:
    at: float  # seconds since the run started
    ok: bool
    seconds: float
    failure: str = ""


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


class Probe(threading.Thread):
    """Runs `check` every `interval` seconds and records whether it raised."""

    def __init__(self, check: Callable[[int], None], origin: float, interval: float = 0.2) -> None:
        super().__init__(name="probe", daemon=True)
        self._check = check
        self._origin = origin
        self._interval = interval
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._results: list[ProbeResult] = []

    def results(self) -> list[ProbeResult]:
        with self._lock:
            return list(self._results)

    def stop(self) -> None:
        self._stop_event.set()

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
            with self._lock:
                self._results.append(result)
            self._stop_event.wait(max(0.0, self._interval - result.seconds))


# The unlabelled values the sampler keeps from each scrape: {key: metric name}.
_WANTED = {
    "threads": "echo_threads",
    "rss_bytes": "process_resident_memory_bytes",
    "open_fds": "process_open_fds",
    "active": "echo_connections_active",
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


class Sampler(threading.Thread):
    def __init__(
        self, metrics: tuple[str, int], origin: float, interval: float = 0.5, timeout: float = 2.0
    ) -> None:
        super().__init__(name="sampler", daemon=True)
        host, port = metrics
        self._url = f"http://{host}:{port}/metrics"
        self._origin = origin
        self._interval = interval
        self._timeout = timeout
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def stop(self) -> None:
        self._stop_event.set()

    def scrape_once(self) -> Sample:
        at = time.monotonic() - self._origin
        try:
            with urllib.request.urlopen(self._url, timeout=self._timeout) as response:  # noqa: S310 (our own loopback target)
                text = response.read().decode()
            values, rejected, closed, info = parse_metrics(text)
        except (OSError, ValueError):
            return Sample(at, {}, {}, {}, {})
        return Sample(at, values, rejected, closed, info)

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            sample = self.scrape_once()
            with self._lock:
                self._samples.append(sample)
            self._stop_event.wait(max(0.0, self._interval - (time.monotonic() - started)))
