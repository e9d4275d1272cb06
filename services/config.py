"""Server configuration: one frozen dataclass, filled from CLI flags or `ECHO_*` variables.

Every value is checked here, before anything binds a port or starts a thread,
so a bad value ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

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
    # floods hold with it (docs/performance.md)
    linger: float = 0.002
    # ready dispatch, at the cap: only a connection that has sent fewer than `min_rate`
    # bytes a second over its life makes room for a newcomer (0: the quietest does).
    # Kestrel's minimum data rate.
    min_rate: int = 240

    def __post_init__(self) -> None:
        _check(self.model in MODELS, "--model", f"must be one of {', '.join(MODELS)}")
        spec = self.spec
        for name, default in (
            ("port", spec.port),
            ("metrics_port", spec.metrics_port),
            ("idle_timeout", spec.idle_timeout),
            ("send_timeout", spec.send_timeout),
        ):
            if getattr(self, name) in (FROM_MODEL, FROM_MODEL_SECONDS):
                object.__setattr__(self, name, default)  # frozen: only here, at creation
        if not self.dispatch:
            object.__setattr__(self, "dispatch", spec.dispatch_modes[0])
        if self.max_connections == FROM_MODEL:
            object.__setattr__(self, "max_connections", default_cap())
        _check(
            self.dispatch in spec.dispatch_modes,
            "--dispatch",
            f"{self.model} supports {' or '.join(spec.dispatch_modes)}",
        )
        _check(
            1 <= self.max_connections <= 1_000_000,
            "--max-connections",
            "must be between 1 and 1000000",
        )
        _check(self.output_budget >= 65536, "--output-budget", "must be at least 65536 bytes")
        _check(1 <= self.turn_messages <= 10_000, "--turn-messages", "must be 1 to 10000")
        _check(0 <= self.linger <= 1.0, "--linger", "must be 0 to 1 s")
        _check(0 <= self.min_rate <= 10**9, "--min-rate", "must be 0 to 1000000000 bytes/s")
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
        _check(1 <= self.workers <= 10_000, "--workers", "must be between 1 and 10000")
        _check(1 <= self.queue_size <= 100_000, "--queue-size", "must be between 1 and 100000")
        _check(1 <= self.backlog <= 65535, "--backlog", "must be between 1 and 65535")
        for flag, seconds in (
            ("--idle-timeout", self.idle_timeout),
            ("--send-timeout", self.send_timeout),
            ("--watchdog-timeout", self.watchdog_timeout),
        ):
            _check(seconds is None or 0 < seconds <= 86_400, flag, "must be 0 (off) to 86400 s")
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
        _check(
            self.watchdog_timeout is None or self.watchdog_timeout >= MIN_WATCHDOG_TIMEOUT,
            "--watchdog-timeout",
            f"must be 0 (off) or at least {MIN_WATCHDOG_TIMEOUT:g} s (the accept loop "
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
        _check(
            logging.getLevelName(self.log_level) != f"Level {self.log_level}",
            "--log-level",
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
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
    def capacity(self) -> int | None:
        """Connections admitted at once, or None for no limit (thread per connection)."""
        if not self.bounded:
            return None
        return self.max_connections if self.ready_dispatch else self.workers + self.queue_size


def _check(ok: bool, flag: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {problem}")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line and exit 2, never a usage dump or a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: str) -> str:
    """`text` with control characters escaped: a value given as input can hold a newline
    or a carriage return, and an error message quoting it must stay one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m services",
        description="A TCP echo server whose threading model is chosen at start. Every flag "
        "falls back to the ECHO_* variable shown; a flag given on the command line wins.",
    )
    add = parser.add_argument
    add(
        "--model",
        help="threading model: "
        + "; ".join(f"{spec.name} ({spec.summary})" for spec in MODELS.values())
        + " [ECHO_MODEL]",
    )
    add("--host", help="address to listen on, echo and metrics [ECHO_HOST, default 127.0.0.1]")
    add(
        "--port",
        help="echo port; 0 picks a free one [ECHO_PORT, default by model: "
        + _by_model(lambda spec: spec.port)
        + "]",
    )
    add(
        "--metrics-port",
        help="Prometheus /metrics port; 0 picks a free one "
        "[ECHO_METRICS_PORT, default by model: " + _by_model(lambda spec: spec.metrics_port) + "]",
    )
    add("--workers", help="worker threads of the bounded models [ECHO_WORKERS, default 32]")
    add(
        "--queue-size",
        help="connections that may wait for a worker before new ones are "
        "rejected (bounded models) [ECHO_QUEUE_SIZE, default 64]",
    )
    add(
        "--idle-timeout",
        help="seconds a connection may send nothing before it is closed; "
        "0 turns it off [ECHO_IDLE_TIMEOUT, default by model: "
        + _by_model(lambda spec: spec.idle_timeout)
        + "]",
    )
    add(
        "--send-timeout",
        help="seconds one echo may take to drain to a client that does not "
        "read; 0 turns it off [ECHO_SEND_TIMEOUT, default by model: "
        + _by_model(lambda spec: spec.send_timeout)
        + "]",
    )
    add(
        "--stack-size",
        help="bytes of stack per connection thread (threads model); 0 means "
        "the system default [ECHO_STACK_SIZE, default 65536]",
    )
    add("--backlog", help="listen backlog [ECHO_BACKLOG, default 1024]")
    add(
        "--watchdog-timeout",
        help="seconds without progress, while work waits, before the "
        "server reports a hang and exits with status 70; 0 turns it off "
        "[ECHO_WATCHDOG_TIMEOUT, default 60]",
    )
    add("--log-level", help="DEBUG, INFO, WARNING or ERROR [ECHO_LOG_LEVEL, default INFO]")
    add(
        "--dispatch",
        help="how a connection reaches a worker: ready (it waits in the event loop, and a "
        "worker echoes only what has arrived) or connection (it owns a worker for its whole "
        "life, the recipe's way) [ECHO_DISPATCH, default by model: "
        + _by_model(lambda spec: spec.dispatch_modes[0])
        + "; threads is always connection]",
    )
    add(
        "--max-connections",
        help="ready dispatch: connections admitted at once; at the cap a newcomer takes the "
        "place of one behind --min-rate or is refused [ECHO_MAX_CONNECTIONS, default 10000 "
        "or less by the descriptor limit]",
    )
    add(
        "--output-budget",
        help="ready dispatch: bytes of echoes that clients have not taken, over all "
        "connections; past half of it echoes wait in the kernel, over it the "
        "longest-stalled reader is closed [ECHO_OUTPUT_BUDGET, default 4194304]",
    )
    add(
        "--turn-messages",
        help="ready dispatch: messages a worker echoes on one connection before it serves "
        "the others, if others wait [ECHO_TURN_MESSAGES, default 16]",
    )
    add(
        "--linger",
        help="ready dispatch: seconds a worker with nothing else to do waits on its connection "
        "for the next message before parking it; 0 parks at once [ECHO_LINGER, default "
        f"{Config.linger:g}]",
    )
    add(
        "--min-rate",
        help="ready dispatch, at the cap: a newcomer takes the place of a waiting connection "
        "that has sent fewer bytes a second than this over its life, the furthest behind "
        "first, and is refused if there is none; 0: the quietest makes room "
        f"[ECHO_MIN_RATE, default {Config.min_rate}]",
    )
    add(
        "--ready-file",
        help="once both ports listen, write them to this file as JSON, for whatever started "
        "the server (harness.launcher) [ECHO_READY_FILE]",
    )
    return parser


def _by_model(value: Callable[[ModelSpec], object]) -> str:
    def shown(item: object) -> str:
        return "off" if item is None else f"{item:g}" if isinstance(item, float) else str(item)

    return ", ".join(f"{shown(value(spec))} {spec.name}" for spec in MODELS.values())


T = TypeVar("T")


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a `Config` from flags, then `ECHO_*` variables, then defaults.

    Raises `ConfigError` for a bad value; `argparse` exits 2 for a bad flag.
    """
    args = vars(build_parser().parse_args(argv))
    env = os.environ if env is None else env

    def raw(name: str) -> tuple[str, str] | None:
        """The value and where it came from, for error messages."""
        flag, var = "--" + name.replace("_", "-"), "ECHO_" + name.upper()
        if args[name] is not None:
            return args[name], flag
        if env.get(var, "").strip():
            return env[var].strip(), f"{var} (environment)"
        return None

    def get(name: str, convert: Callable[[str], T], default: T) -> T:
        found = raw(name)
        if found is None:
            return default
        value, source = found
        try:
            return convert(value)
        except ValueError:
            raise ConfigError(
                f"{source}: {value!r} is not a valid {convert.__name__.replace('_', ' ')}"
            ) from None

    model_found = raw("model")
    if model_found is None:
        raise ConfigError(f"--model: required (or set ECHO_MODEL): {', '.join(MODELS)}")
    model, source = model_found
    if model not in MODELS:
        raise ConfigError(f"{source}: {model!r} is not one of {', '.join(MODELS)}")
    spec = MODELS[model]
    try:
        return Config(
            model=model,
            host=get("host", str, Config.host),
            port=get("port", port_number, spec.port),
            metrics_port=get("metrics_port", port_number, spec.metrics_port),
            workers=get("workers", integer, Config.workers),
            queue_size=get("queue_size", integer, Config.queue_size),
            idle_timeout=_off_if_zero(get("idle_timeout", seconds, spec.idle_timeout or 0.0)),
            send_timeout=_off_if_zero(get("send_timeout", seconds, spec.send_timeout or 0.0)),
            stack_size=get("stack_size", integer, Config.stack_size),
            backlog=get("backlog", integer, Config.backlog),
            watchdog_timeout=_off_if_zero(get("watchdog_timeout", seconds, 60.0)),
            log_level=get("log_level", str, Config.log_level).upper(),
            ready_file=get("ready_file", str, None),
            dispatch=get("dispatch", str, spec.dispatch_modes[0]),
            max_connections=get("max_connections", integer, default_cap()),
            output_budget=get("output_budget", integer, Config.output_budget),
            turn_messages=get("turn_messages", integer, Config.turn_messages),
            linger=get("linger", seconds, Config.linger),
            min_rate=get("min_rate", integer, Config.min_rate),
        )
    except ConfigError as error:
        raise ConfigError(_name_source(str(error), raw)) from None


def _name_source(message: str, raw: Callable[[str], tuple[str, str] | None]) -> str:
    """Rewrite '--flag: ...' as 'ECHO_FLAG (environment): ...' when the value came from there."""
    flag, _, rest = message.partition(":")
    found = raw(flag.removeprefix("--").replace("-", "_")) if flag.startswith("--") else None
    return f"{found[1]}:{rest}" if found else message


def _off_if_zero(value: float) -> float | None:
    return None if value == 0 else value


def integer(text: str) -> int:
    return int(text, 10)


def port_number(text: str) -> int:
    value = int(text, 10)
    if value < 0:  # a range check follows in Config; this keeps FROM_MODEL out
        raise ValueError(text)
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value
