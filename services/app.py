"""Wire one server together (listener, metrics, watchdog, signals) and run it to the end."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from services import budget, preflight
from services.base import PortInUseError, Server
from services.cli import one_line, parse_config
from services.config import Config, ConfigError
from services.logs import exit_now
from services.metrics import build_registry
from services.metrics_http import MetricsServer
from services.models import ModelSpec
from services.ready import ReadyDispatch
from services.readyfile import write_ready_file
from services.watchdog import Lane, Watchdog

log = logging.getLogger("echo")

EXIT_HUNG = 70  # EX_SOFTWARE: the watchdog found a hang
_TRIP_LINGER = 2.0  # keep /metrics up this long after a trip so a scrape can see it


def server_class(spec: ModelSpec) -> type[Server]:
    """A model's `Server` subclass, imported only now: reading the registry (config, the
    flood tool) never imports the threading code, and the registry imports no server."""
    module_name, _, class_name = spec.server.partition(":")
    cls: type[Server] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_server(config: Config) -> Server:
    return server_class(config.spec)(config)


def exit_hung(reason: str) -> None:
    """Exit from the watchdog thread: a hung worker may never let a normal shutdown
    finish, and the supervisor's restart is the recovery."""
    time.sleep(_TRIP_LINGER)  # /metrics still answers meanwhile, showing the trip
    exit_now(EXIT_HUNG, reason)  # logs from a helper thread: stderr may block


def build_watchdog(
    server: Server, timeout: float, on_trip: Callable[[str], None] = exit_hung
) -> Watchdog:
    stats = server.stats
    lanes = [
        # The accept loop ticks at least once a second whether or not clients come.
        Lane(
            "accept loop", lambda: stats.accept_loop_ticks.value, lambda: int(not server.stopping)
        ),
    ]
    config = server.config
    if config.ready_dispatch or not config.bounded or (config.idle_timeout and config.send_timeout):
        # With connection dispatch and a timeout off, a quiet client holds its worker
        # for good while others queue, which looks exactly like a hang: then only the
        # accept loop is watched.
        lanes.append(Lane("workers", stats.progress, lambda: stats.queued.value))
    else:
        log.info("watchdog: workers not watched (connection dispatch with a timeout off)")
    if isinstance(ready := server.dispatch, ReadyDispatch):
        # The leader serves every event: a turn of its that never ends leaves the rest
        # unserved in the kernel, where no counter sees them wait.
        lanes.append(Lane("leader", lambda: ready.leader_turns, lambda: ready.leader_in_turn))
    return Watchdog(lanes, timeout, on_trip)


class Service:
    """One server with its metrics endpoint and watchdog; binds both ports on creation."""

    def __init__(self, config: Config, on_trip: Callable[[str], None] = exit_hung) -> None:
        self.config = config
        self.server = build_server(config)
        self.watchdog = (
            build_watchdog(self.server, config.watchdog_timeout, on_trip)
            if config.watchdog_timeout is not None
            else None
        )
        self.registry = build_registry(self.server, self.watchdog)
        self.address = self.server.bind()
        try:
            self.metrics = MetricsServer(self.registry, config.host, config.metrics_port)
        except OSError:
            self.server.close()
            raise

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.metrics.address

    def run(self, on_ready: Callable[[], None] | None = None) -> bool:
        """Serve until `server.stop()`; True when the shutdown was clean. `on_ready` is
        called once both ports are served."""
        self.metrics.start()

        def serving() -> None:  # the workers and the accept loop run: now watch them
            if self.watchdog is not None:
                self.watchdog.start()
            if on_ready is not None:
                on_ready()

        try:
            return self.server.run(serving)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.metrics.stop()


def run_until_stopped(config: Config) -> int:
    """Serve `config` until SIGTERM or SIGINT; the process's exit status."""
    try:
        service = Service(config)
    except PortInUseError as error:
        log.error("%s", error.strerror)
        return 1
    except OSError as error:
        log.error("cannot listen on %s: %s", config.host, error.strerror or error)
        return 1
    _install_signal_handlers(service.server)
    (host, port), (mhost, mport) = service.address, service.metrics_address
    log.info(
        "echo server ready model=%s echo=%s:%d metrics=%s:%d workers=%s queue=%s "
        "idle_timeout=%s send_timeout=%s dispatch=%s max_connections=%s",
        config.model,
        host,
        port,
        mhost,
        mport,
        config.workers if config.bounded else "unbounded",
        config.queue_size if config.bounded and not config.ready_dispatch else "none",
        config.idle_timeout,
        config.send_timeout,
        config.dispatch,
        "unbounded" if config.capacity is None else config.capacity,
    )
    ready_file = config.ready_file

    def announce() -> None:  # the workers run: what the ready file promises
        if ready_file:
            write_ready_file(ready_file, service.address, service.metrics_address)

    if service.run(announce):
        log.info("echo server stopped")
        return 0
    # Some worker is stuck; interpreter exit would wait for it (an executor's threads
    # are joined at exit), so end here.
    exit_now(1, "echo server stopped with workers still busy; not waiting for them")


def _install_signal_handlers(server: Server) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        if server.stopping:  # a second Ctrl-C: stop waiting for anything
            os._exit(128 + signum)
        log.info("received %s; shutting down", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main(argv: Sequence[str] | None = None) -> int:
    budget.raise_soft_limit()  # first: the default cap follows the limit
    try:
        config = parse_config(argv)
        preflight.check(config)
    except ConfigError as error:
        print(f"python -m services: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    # Log records would otherwise call threading.current_thread(), which leaves a
    # never-freed dummy Thread behind for every `_thread` connection thread.
    logging.logThreads = False
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s {config.model}: %(message)s",
    )
    return run_until_stopped(config)
