"""Server configuration: one frozen dataclass, filled from CLI flags or `ECHO_*` variables
(`services/cli.py`).

Every value is checked here, before anything binds a port or starts a thread,
so a bad value ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from services.budget import default_cap
from services.models import MODELS, ModelSpec
from services.watchdog import MIN_TIMEOUT as MIN_WATCHDOG_TIMEOUT

# Field values that mean "this model's default, from the registry". Neither can come
# from the command line or the environment: ports and seconds parse as 0 or more.
FROM_MODEL = -1
FROM_MODEL_SECONDS = -1.0
MIN_STACK_SIZE = 32 * 1024  # CPython refuses smaller thread stacks
MAX_STACK_SIZE = 256 * 1024 * 1024  # 32 times the usual default: no echo thread needs more
PAGE_SIZE = 4096


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the flag or variable."""


@dataclass(frozen=True)
class Config:
    model: str
    host: str = "127.0.0.1"
    port: int = FROM_MODEL
    metrics_port: int = FROM_MODEL
    workers: int = 32
    queue_size: int = 64
    idle_timeout: float | None = FROM_MODEL_SECONDS
    send_timeout: float | None = FROM_MODEL_SECONDS
    stack_size: int = 64 * 1024
    backlog: int = 1024
    watchdog_timeout: float | None = 60.0
    log_level: str = "INFO"
    ready_file: str | None = None  # written once both ports listen (see harness.launcher)
    dispatch: str = ""  # "" is the model's default (its first dispatch mode)
    max_connections: int = FROM_MODEL  # ready dispatch: admitted at once; see default_cap()
    output_budget: int = 4 * 2**20  # ready dispatch: bytes of echoes clients have not taken
    turn_messages: int = 16  # ready dispatch: messages a worker echoes before it yields
    # ready dispatch: seconds a worker with nothing else waiting keeps its connection for
    # the next message (a ping-pong client's next message then costs no hand-offs); the
    # floods hold with it (docs/history/performance.md, 2026-11-28)
    linger: float = 0.002
    # ready dispatch, at the cap: only a connection that has sent fewer than `min_rate`
    # bytes a second over its life makes room for a newcomer (0: the quietest does).
    # Kestrel's minimum data rate.
    min_rate: int = 240

    def __post_init__(self) -> None:
        _check(self.model in MODELS, "--model", f"must be one of {', '.join(MODELS)}")
        self._fill_from_model()
        self._check_network()
        self._check_pool()
        self._check_timeouts()
        _check(
            logging.getLevelName(self.log_level) != f"Level {self.log_level}",
            "--log-level",
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        )

    def _fill_from_model(self) -> None:
        """The values left to the model take its defaults (frozen: only here, at creation)."""
        spec = self.spec
        for name, default in (
            ("port", spec.port),
            ("metrics_port", spec.metrics_port),
            ("idle_timeout", spec.idle_timeout),
            ("send_timeout", spec.send_timeout),
        ):
            if getattr(self, name) in (FROM_MODEL, FROM_MODEL_SECONDS):
                object.__setattr__(self, name, default)
        if not self.dispatch:
            object.__setattr__(self, "dispatch", spec.dispatch_modes[0])
        if self.max_connections == FROM_MODEL:
            object.__setattr__(self, "max_connections", default_cap())
        _check(
            self.dispatch in spec.dispatch_modes,
            "--dispatch",
            f"{self.model} supports {' or '.join(spec.dispatch_modes)}",
        )

    def _check_network(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"--host: {self.host!r} is not an IP address") from None
        for flag, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            _check(0 <= port <= 65535, flag, f"{port} is not a TCP port (0-65535)")
        _check(
            self.port == 0 or self.port != self.metrics_port,
            "--metrics-port",
            f"{self.metrics_port} is also the echo port",
        )
        _check(1 <= self.backlog <= 65535, "--backlog", "must be between 1 and 65535")

    def _check_pool(self) -> None:
        """The workers, what may wait for them, and what ready dispatch may hold."""
        _check(1 <= self.workers <= 10_000, "--workers", "must be between 1 and 10000")
        _check(1 <= self.queue_size <= 100_000, "--queue-size", "must be between 1 and 100000")
        _check(
            1 <= self.max_connections <= 1_000_000,
            "--max-connections",
            "must be between 1 and 1000000",
        )
        _check(self.output_budget >= 65536, "--output-budget", "must be at least 65536 bytes")
        _check(1 <= self.turn_messages <= 10_000, "--turn-messages", "must be 1 to 10000")
        _check(0 <= self.linger <= 1.0, "--linger", "must be 0 to 1 s")
        _check(0 <= self.min_rate <= 10**9, "--min-rate", "must be 0 to 1000000000 bytes/s")
        _check(
            self.stack_size == 0
            or (
                MIN_STACK_SIZE <= self.stack_size <= MAX_STACK_SIZE
                and self.stack_size % PAGE_SIZE == 0
            ),
            "--stack-size",
            f"must be 0 (system default) or a multiple of {PAGE_SIZE} from {MIN_STACK_SIZE} "
            f"to {MAX_STACK_SIZE}",
        )

    def _check_timeouts(self) -> None:
        for flag, seconds in (
            ("--idle-timeout", self.idle_timeout),
            ("--send-timeout", self.send_timeout),
            ("--watchdog-timeout", self.watchdog_timeout),
        ):
            _check(seconds is None or 0 < seconds <= 86_400, flag, "must be 0 (off) to 86400 s")
        _check(
            self.watchdog_timeout is None or self.watchdog_timeout >= MIN_WATCHDOG_TIMEOUT,
            "--watchdog-timeout",
            f"must be 0 (off) or at least {MIN_WATCHDOG_TIMEOUT:g} s (the event loop "
            "reports once a second, and a back-off can add a second)",
        )
        if self.watchdog_timeout is not None and self.dispatch == "connection":
            # A worker that owns a connection legitimately stalls for up to a timeout;
            # the watchdog must not mistake that for a hang. (With ready dispatch no
            # worker ever waits on a client.)
            for flag, seconds in (
                ("--idle-timeout", self.idle_timeout),
                ("--send-timeout", self.send_timeout),
            ):
                _check(
                    seconds is None or seconds < self.watchdog_timeout,
                    "--watchdog-timeout",
                    f"must be longer than {flag} ({seconds:g} s)" if seconds else "",
                )

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def bounded(self) -> bool:
        return self.spec.bounded

    @property
    def ready_dispatch(self) -> bool:
        """Connections wait in the event loop, not on a worker (`ready` dispatch)."""
        return self.dispatch == "ready"

    @property
    def evicts_at_cap(self) -> str:
        """Whom the cap's rule closes for a newcomer (`parking.Parking.behind`): the
        reason of every closed{evicted}; connection dispatch refuses instead."""
        if not (self.bounded and self.ready_dispatch):
            return "never"
        return "behind_min_rate" if self.min_rate else "quietest"

    @property
    def capacity(self) -> int | None:
        """Connections admitted at once, or None for no limit (thread per connection)."""
        if not self.bounded:
            return None
        return self.max_connections if self.ready_dispatch else self.workers + self.queue_size


def _check(ok: bool, flag: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {problem}")
