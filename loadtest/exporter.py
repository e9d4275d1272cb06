"""The load generator's numbers in Prometheus, beside the servers' (`--load-metrics-port`).

The locust master (or the only process) serves, read at scrape time:
- `echo_load_requests_total{service,kind}` and `echo_load_failures_total{service,kind}`
  from locust's own statistics (the master's are the sum of its workers');
- `echo_load_response_seconds{service,kind}`: a histogram from 100 us, which locust's
  statistics (whole milliseconds) cannot give: each worker counts its requests into
  one and sends it with every report to the master, which adds them up;
- `echo_load_workers`, `echo_load_users`, and `echo_load_cpu_warning` (1 once a
  load generator passed 90% CPU: its numbers are then limited by the client).

It runs on the servers' own metrics endpoint (`services.metrics_http`), so the load
generator answers scrapes the same way the servers do.

Nothing here imports locust at module level: importing locust monkey-patches the whole
process with gevent, which a process that is not a locust run (the test suite) must not
suffer. The environment and its runner arrive as arguments.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeGuard

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from services.metrics_http import MetricsServer
from services.stats import SUB_MS_BUCKETS, Histogram

if TYPE_CHECKING:
    from locust.env import Environment
    from locust.runners import MasterRunner

REPORT_KEY = "echo_load_histograms"  # in a worker's report to its master


class ResponseHistograms:
    """One response-time histogram per (service, kind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def _histogram(self, service: str, kind: str) -> Histogram:
        with self._lock:
            histogram = self._histograms.get((service, kind))
            if histogram is None:
                histogram = self._histograms[service, kind] = Histogram(SUB_MS_BUCKETS)
            return histogram

    def observe(self, service: str, kind: str, seconds: float) -> None:
        self._histogram(service, kind).observe(seconds)

    def take(self) -> list[list[Any]]:
        """Everything counted since the last take, as plain lists (for a report)."""
        with self._lock:
            items = list(self._histograms.items())
        taken = []
        for (service, kind), histogram in items:
            counts, total = histogram.take()
            if any(counts):
                taken.append([service, kind, counts, total])
        return taken

    def add(self, taken: list[list[Any]]) -> None:
        for service, kind, counts, total in taken:
            self._histogram(str(service), str(kind)).add(list(counts), float(total))

    def families(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "echo_load_response_seconds",
            "Response time of each connect and echo, as the load generator saw it.",
            labels=["service", "kind"],
        )
        with self._lock:
            items = sorted(self._histograms.items())
        for (service, kind), histogram in items:
            buckets, total = histogram.cumulative()
            family.add_metric([service, kind], buckets, total)
        yield family


class LoadCollector(Collector):
    def __init__(self, environment: Environment, histograms: ResponseHistograms) -> None:
        self._environment = environment
        self._histograms = histograms

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "echo_load_requests", "Requests made, by service and kind.", labels=["service", "kind"]
        )
        failures = CounterMetricFamily(
            "echo_load_failures",
            "Requests failed, by service and kind.",
            labels=["service", "kind"],
        )
        for (service, kind), entry in sorted(self._environment.stats.entries.items()):
            requests.add_metric([service, kind], entry.num_requests)
            failures.add_metric([service, kind], entry.num_failures)
        yield requests
        yield failures
        yield from self._histograms.families()
        runner = self._environment.runner
        workers = runner.worker_count if is_master(runner) else 1
        yield GaugeMetricFamily("echo_load_workers", "Load generator processes.", workers)
        users = runner.user_count if runner is not None else 0
        yield GaugeMetricFamily("echo_load_users", "Simulated users running.", users)
        yield GaugeMetricFamily(
            "echo_load_cpu_warning",
            "1 once a load generator passed 90% CPU: its numbers are limited by the client.",
            int(cpu_limited(self._environment)),
        )


def is_master(runner: object) -> TypeGuard[MasterRunner]:
    """A locust master's runner (it has workers, and no users of its own). By name, not
    isinstance: see the module's docstring."""
    return type(runner).__name__ == "MasterRunner"


def is_worker(runner: object) -> bool:
    return type(runner).__name__ == "WorkerRunner"


def cpu_limited(environment: Environment) -> bool:
    runner = environment.runner
    if runner is None:
        return False
    return bool(runner.cpu_warning_emitted or getattr(runner, "worker_cpu_warning_emitted", False))


class LoadExporter:
    """Wires the histograms into locust's events; serves them where this process reports
    (the master, or a lone process), on `port` (0: a free one)."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.histograms = ResponseHistograms()
        self.server: MetricsServer | None = None
        self.workers_seen: set[str] = set()  # workers that reported at all
        self.reporting_workers: set[str] = set()  # workers whose reports held requests
        events = environment.events
        events.request.add_listener(self._on_request)
        events.report_to_master.add_listener(self._on_report_to_master)
        events.worker_report.add_listener(self._on_worker_report)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        if is_worker(self.environment.runner):
            raise RuntimeError("a worker has nothing to export: its master does")
        registry = CollectorRegistry(auto_describe=True)
        registry.register(LoadCollector(self.environment, self.histograms))
        self.server = MetricsServer(registry, host, port)
        self.server.start()
        return self.server.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def _on_request(self, request_type: str, name: str, response_time: float, **_: Any) -> None:
        self.histograms.observe(name, request_type, response_time / 1000)

    def _on_report_to_master(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        data[REPORT_KEY] = self.histograms.take()

    def _on_worker_report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        taken = data.get(REPORT_KEY, [])
        self.workers_seen.add(client_id)
        if taken:
            self.reporting_workers.add(client_id)
        self.histograms.add(taken)
