"""The command line: `python -m services` flags, each with its `ECHO_*` variable, parsed
into a `Config` (which checks every value)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

from services.budget import default_cap
from services.config import Config, ConfigError
from services.models import MODELS, ModelSpec


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
    _where_flags(add)
    _pool_flags(add)
    _dispatch_flags(add)
    add(
        "--ready-file",
        help="once both ports listen, write them to this file as JSON, for whatever started "
        "the server (harness.launcher) [ECHO_READY_FILE]",
    )
    return parser


def _where_flags(add: Callable[..., object]) -> None:
    """Which model, and where it listens."""
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


def _pool_flags(add: Callable[..., object]) -> None:
    """The workers, the defences every model may have, and the process."""
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


def _dispatch_flags(add: Callable[..., object]) -> None:
    """How a connection reaches a worker, and what ready dispatch holds."""
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
        help="ready dispatch: messages a turn echoes on one connection before it lets the "
        "others have theirs [ECHO_TURN_MESSAGES, default 16]",
    )
    add(
        "--linger",
        help="ready dispatch: while there are fewer connections than workers, seconds a "
        "worker waits on its connection for the next message before parking it; 0 parks "
        "at once [ECHO_LINGER, default "
        f"{Config.linger:g}]",
    )
    add(
        "--min-rate",
        help="ready dispatch, at the cap: a newcomer takes the place of a waiting connection "
        "that has sent fewer bytes a second than this over its life, the furthest behind "
        "first, and is refused if there is none; 0: the quietest makes room "
        f"[ECHO_MIN_RATE, default {Config.min_rate}]",
    )


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
