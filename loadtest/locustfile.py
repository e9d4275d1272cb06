"""Locust users that drive the three echo servers side by side over raw TCP.

The shape locust's docs recommend for other protocols: a client wrapper that
times each call and fires `events.request` (here `loadtest.echo_client` plus
`TimedEchoClient`), an abstract `EchoUser` that owns the client, and one
concrete user per service.

    locust -f loadtest/locustfile.py --headless -u 90 -t 30s
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Any

from locust import User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.echo_client import EchoClient, PayloadSize
from loadtest.exporter import LoadExporter, cpu_limited
from loadtest.report import LoadGenerator, Thresholds, judge_load, service_rows, write_summary
from services.models import MODELS


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    group = parser.add_argument_group("echo cluster")
    group.add_argument(
        "--echo-host",
        env_var="ECHO_LOAD_HOST",
        default="127.0.0.1",
        help="address of the echo servers",
    )
    for spec in MODELS.values():
        group.add_argument(
            f"--{spec.name}-host",
            env_var=f"ECHO_LOAD_{spec.name.upper()}_HOST",
            default="",
            help=f"{spec.name} server's address, if not --echo-host (a compose service name)",
        )
        group.add_argument(
            f"--{spec.name}-port",
            env_var=f"ECHO_LOAD_{spec.name.upper()}_PORT",
            type=int,
            default=spec.port,
            help=f"{spec.name} server's echo port",
        )
    group.add_argument(
        "--payload",
        env_var="ECHO_LOAD_PAYLOAD",
        default="64-4096",
        help="bytes per echo: N, or LOW-HIGH for a uniform random size",
    )
    group.add_argument(
        "--think",
        env_var="ECHO_LOAD_THINK",
        default="0.05-0.2",
        help="seconds each user waits between echoes: S, or LOW-HIGH",
    )
    group.add_argument(
        "--echo-timeout",
        env_var="ECHO_LOAD_TIMEOUT",
        type=float,
        default=10.0,
        help="seconds a connect or a round trip may take before it counts as a timeout",
    )
    group.add_argument(
        "--max-failure-ratio",
        env_var="ECHO_LOAD_MAX_FAILURE_RATIO",
        type=float,
        default=0.01,
        help="fail the run above this share of failed requests (any byte mismatch always fails it)",
    )
    group.add_argument(
        "--load-metrics-port",
        env_var="ECHO_LOAD_METRICS_PORT",
        type=int,
        default=0,
        help="serve the load's own Prometheus metrics on this port (master or lone process; "
        "0: off)",
    )
    group.add_argument(
        "--load-metrics-host",
        env_var="ECHO_LOAD_METRICS_HOST",
        default="127.0.0.1",
        help="address for --load-metrics-port",
    )
    group.add_argument(
        "--summary-json",
        env_var="ECHO_LOAD_SUMMARY_JSON",
        default="",
        help="also write the per-service summary to this JSON file",
    )


def parse_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        bounds = (float(low), float(high) if high else float(low))
    except ValueError:
        raise ValueError(f"{text!r}: expected S or LOW-HIGH seconds") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{text!r}: expected 0 <= LOW <= HIGH")
    return bounds


_exporters: dict[int, LoadExporter] = {}  # by id(environment): one per locust process


@events.init.add_listener
def start_exporter(environment: Environment, **_: Any) -> None:
    exporter = _exporters[id(environment)] = LoadExporter(environment)
    options = environment.parsed_options
    if options is None or not options.load_metrics_port:
        return
    if isinstance(environment.runner, WorkerRunner):
        return  # its counts travel to the master with each report
    host, port = exporter.serve(options.load_metrics_host, options.load_metrics_port)
    logging.getLogger("echo.load").info("load metrics on http://%s:%d/metrics", host, port)


@events.test_start.add_listener
def check_options(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    try:
        PayloadSize.parse(options.payload)
        parse_range(options.think)
    except ValueError as error:
        raise SystemExit(f"echo load test: {error}") from None


def options_of(environment: Environment) -> Any:
    if environment.parsed_options is None:
        raise RuntimeError("run these users through locust's command line")
    return environment.parsed_options


class TimedEchoClient:
    """Fires one locust request event per connect and per echo, with the failure's kind."""

    def __init__(self, environment: Environment, service: str, address: tuple[str, int]) -> None:
        options = options_of(environment)
        self._events = environment.events
        self._service = service
        self._size = PayloadSize.parse(options.payload)
        self._rng = random.Random()
        self._client = EchoClient(address, options.echo_timeout)

    def echo(self) -> None:
        for result in self._client.echo(self._size.pick(self._rng)):
            self._events.request.fire(
                request_type=result.kind,
                name=self._service,
                response_time=result.seconds * 1000,
                response_length=result.nbytes,
                exception=result.failure,
                context={},
            )

    def close(self) -> None:
        self._client.close()


class EchoUser(User):
    abstract = True
    service = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        options = options_of(environment)
        port = getattr(options, f"{self.service}_port")
        host = getattr(options, f"{self.service}_host") or options.echo_host
        self.client = TimedEchoClient(environment, self.service, (host, port))
        self._think = parse_range(options.think)

    def wait_time(self) -> float:
        return random.uniform(*self._think)

    @task
    def echo(self) -> None:
        self.client.echo()

    def on_stop(self) -> None:
        self.client.close()


def user_class_name(model: str) -> str:
    return "".join(part.title() for part in model.replace("-", "_").split("_")) + "User"


# One user class per registered model (ExecutorUser, QueueUser, ThreadsUser, ...), made
# here so that a new model needs no edit in this file; locust finds them in this module.
for _spec in MODELS.values():
    globals()[user_class_name(_spec.name)] = type(
        user_class_name(_spec.name), (EchoUser,), {"service": _spec.name, "__module__": __name__}
    )


@events.quitting.add_listener
def report(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return  # the master (or the only process) has the whole picture
    options = environment.parsed_options
    selected = [cls.service for cls in environment.user_classes if issubclass(cls, EchoUser)]
    rows = service_rows(environment.stats, selected)
    verdict = judge_load(rows, Thresholds(max_failure_ratio=options.max_failure_ratio))
    exporter = _exporters.pop(id(environment), None)
    runner = environment.runner
    generator = LoadGenerator(cpu_limited=cpu_limited(environment))
    if isinstance(runner, MasterRunner):
        # Counted from their reports: at the end, workers may have left already.
        seen = len(exporter.workers_seen) if exporter else 0
        reporting = len(exporter.reporting_workers) if exporter else 0
        generator = replace(
            generator, processes=max(seen, runner.worker_count), with_requests=reporting
        )
    write_summary(rows, verdict, options.summary_json or None, generator)
    environment.process_exit_code = 0 if verdict.ok else 1
    if exporter is not None:
        exporter.stop()
