"""Prometheus exposition: a collector that reads the lock-protected counters at scrape time.

The endpoint that serves it is `services.metrics_http` (one thread, no client can
hold it); `harness.scrape` reads it back, for the tests and the tools.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from services import procfs
from services.base import Server
from services.ready import ReadyDispatch
from services.stats import Histogram, StatsSnapshot
from services.watchdog import Watchdog

log = logging.getLogger("echo.metrics")


class EchoCollector(Collector):
    def __init__(self, server: Server, watchdog: Watchdog | None = None) -> None:
        self._server = server
        self._watchdog = watchdog

    def collect(self) -> Iterator[Metric]:
        stats = self._server.stats.snapshot()  # one snapshot: the counts balance
        yield self._settings()
        yield from self._connections(stats)
        yield from self._latency()
        yield from self._kernel()
        if self._watchdog is not None:
            yield from self._watchdog_metrics(self._watchdog)

    def _settings(self) -> Metric:
        config = self._server.config
        return InfoMetricFamily(
            "echo_server",
            "The threading model and its settings.",
            value={
                "model": config.model,
                "dispatch": config.dispatch,
                "workers": str(config.workers) if config.bounded else "unbounded",
                "queue_size": str(config.queue_size) if config.bounded else "none",
                "idle_timeout_seconds": _seconds_label(config.idle_timeout),
                "send_timeout_seconds": _seconds_label(config.send_timeout),
                "stack_size_bytes": str(config.stack_size) if not config.bounded else "default",
                "evicts_at_cap": config.evicts_at_cap,
                "min_rate_bytes_per_second": str(config.min_rate),
            },
        )

    def _connections(self, stats: StatsSnapshot) -> Iterator[Metric]:
        """Connections by state and by how they ended, traffic, workers."""
        server = self._server
        yield _counter("connections_accepted", "Connections accepted.", stats.accepted)
        yield _gauge("connections_active", "Connections open: queued or served.", stats.active)
        yield _labeled_counter(
            "connections_rejected", "Connections closed unserved, by reason.", stats.rejected
        )
        yield _labeled_counter(
            "connections_closed", "Served connections that ended, by reason.", stats.closed
        )
        yield _labeled_counter(
            "accept_errors",
            "accept() failures, by errno name.",
            server.stats.accept_errors.values(),
            label="errno",
        )
        yield _counter("received_bytes", "Bytes read from clients.", stats.received_bytes)
        yield _counter("sent_bytes", "Bytes echoed back to clients.", stats.sent_bytes)
        yield _counter("messages", "Reads echoed back (one per recv).", stats.messages)
        yield _gauge(
            "worker_threads",
            "Threads that serve connections (pool size, or one per connection).",
            server.stats.worker_threads.value,
        )
        yield _gauge("workers_busy", "Connections being served right now.", stats.busy)
        dispatch = server.dispatch
        yield _counter(
            "leader_busy_seconds",
            "Seconds the pool's leader spent serving rather than waiting for events "
            "(ready dispatch): one thread serves every event, and this rate is how near "
            "it is to its limit (1: saturated). 0 where no thread leads (connection "
            "dispatch, threads), so that every model has the series.",
            dispatch.leader_busy_seconds if isinstance(dispatch, ReadyDispatch) else 0.0,
        )
        yield _gauge("queue_depth", "Connections waiting for a worker.", stats.queued)
        yield _gauge("queue_capacity", "Connections that may wait.", server.queue_capacity)
        states = GaugeMetricFamily(
            "echo_connections",
            "Open connections by state: waiting (for bytes, in the event loop), queued "
            "(for a worker), busy (in a worker), writing (for the client to read its echo).",
            labels=["state"],
        )
        for state in ("waiting", "queued", "busy", "writing"):
            states.add_metric([state], getattr(stats, state))
        yield states
        yield _gauge(
            "connection_capacity",
            "Connections admitted at once (-1: no limit).",
            -1 if server.capacity is None else server.capacity,
        )
        yield _gauge(
            "pending_output_bytes",
            "Echoes the clients have not taken yet (ready dispatch).",
            server.stats.pending_output.value,
        )

    def _latency(self) -> Iterator[Metric]:
        server = self._server
        yield _histogram(
            "dispatch_wait",
            "From the leader taking a connection's event to its turn starting (ready "
            "dispatch): the wait behind the rest of the leader's batch.",
            server.stats.dispatch_wait,
        )
        yield _histogram(
            "loop_lag",
            "From the event loop waking to the end of its pass: accepting, timeouts, "
            "eviction (ready dispatch). What a newcomer's accept can wait behind.",
            server.stats.loop_lag,
        )

    def _kernel(self) -> Iterator[Metric]:
        """What the kernel says: the accept queue, dropped handshakes, threads."""
        server = self._server
        if (queue := server.accept_queue()) is not None:
            yield _gauge(
                "accept_queue",
                "Connections the kernel has completed that wait for accept().",
                queue[0],
            )
            yield _gauge("accept_queue_capacity", "The listen backlog in effect.", queue[1])
        if (overflows := procfs.listen_overflows()) is not None:
            yield _counter(
                "listen_overflows",
                "Handshakes dropped because an accept queue was full, in this network "
                "namespace (a container's own; on a shared host, every listener's).",
                overflows,
            )
        yield _gauge("threads", "Live OS threads in the process.", os_thread_count())
        yield _counter(
            "thread_start_failures",
            "Connection threads the OS refused to start.",
            server.stats.thread_start_failures.value,
        )

    @staticmethod
    def _watchdog_metrics(watchdog: Watchdog) -> Iterator[Metric]:
        yield _gauge("watchdog_timeout_seconds", "Stall allowed.", watchdog.timeout)
        yield _gauge(
            "watchdog_stalled_seconds",
            "How long work has waited without progress.",
            watchdog.stalled_seconds,
        )
        yield _gauge("watchdog_tripped", "1 once a hang was detected.", int(watchdog.tripped))
        yield _counter(
            "watchdog_freezes",
            "Times the process was found to have been stopped (clocks restarted, no trip).",
            watchdog.freezes,
        )


def os_thread_count() -> int:
    """Threads the kernel sees; `threading.active_count()` misses low-level `_thread` ones."""
    counted = procfs.thread_count()
    return threading.active_count() if counted is None else counted


def _seconds_label(seconds: float | None) -> str:
    return "off" if seconds is None else f"{seconds:g}"


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"echo_{name}", documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"echo_{name}", documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets, total = histogram.cumulative()
    return HistogramMetricFamily(
        f"echo_{name}_seconds", documentation, buckets=buckets, sum_value=total
    )


def _labeled_counter(
    name: str, documentation: str, values: dict[str, int], label: str = "reason"
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"echo_{name}", documentation, labels=[label])
    for value_label, value in sorted(values.items()):
        family.add_metric([value_label], value)
    return family


def build_registry(server: Server, watchdog: Watchdog | None = None) -> CollectorRegistry:
    """A fresh registry with the echo collector and the standard process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EchoCollector(server, watchdog))
    ProcessCollector(registry=registry)
    return registry
