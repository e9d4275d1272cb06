from __future__ import annotations

import pytest

from services.budget import default_cap
from services.cli import parse_config
from services.config import Config, ConfigError
from services.models import MODELS, ModelSpec


def test_defaults_follow_the_model() -> None:
    executor = parse_config(["--model", "executor"], env={})
    threads = parse_config(["--model", "threads"], env={})
    assert (executor.port, executor.metrics_port) == (15001, 9101)
    assert (parse_config(["--model", "queue"], env={}).port) == 15002
    assert (threads.port, threads.metrics_port) == (15003, 9103)
    assert executor.idle_timeout == 10.0 and executor.send_timeout == 10.0
    assert threads.idle_timeout is None and threads.send_timeout is None
    assert threads.stack_size == 65536


def test_environment_fills_in_and_flags_win() -> None:
    env = {"ECHO_MODEL": "queue", "ECHO_WORKERS": "7", "ECHO_IDLE_TIMEOUT": "2.5", "ECHO_PORT": "0"}
    from_env = parse_config([], env=env)
    assert (from_env.model, from_env.workers, from_env.idle_timeout, from_env.port) == (
        "queue",
        7,
        2.5,
        0,
    )
    flagged = parse_config(["--workers", "9", "--idle-timeout", "0"], env=env)
    assert flagged.workers == 9
    assert flagged.idle_timeout is None  # 0 turns it off


@pytest.mark.parametrize("spec", list(MODELS.values()), ids=list(MODELS))
def test_a_config_built_directly_gets_its_own_models_defaults(spec: ModelSpec) -> None:
    config = Config(model=spec.name)
    assert (config.port, config.metrics_port) == (spec.port, spec.metrics_port)
    assert (config.idle_timeout, config.send_timeout) == (spec.idle_timeout, spec.send_timeout)
    assert config.bounded == spec.bounded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "-1"], "--port: '-1' is not a valid port number"),
        (["--metrics-port", "-1"], "--metrics-port: '-1' is not a valid port number"),
        (["--idle-timeout", "-1"], "--idle-timeout: '-1' is not a valid seconds"),
    ],
)
def test_the_model_default_markers_cannot_be_given(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(["--model", "queue", *args], env={})


@pytest.mark.parametrize(
    ("descriptors", "cap"), [(64, 1), (300, 28), (1024, 752), (2000, 1728), (1 << 20, 10_000)]
)
def test_the_connection_cap_follows_the_descriptor_limit(descriptors: int, cap: int) -> None:
    assert default_cap(descriptors) == cap


def test_the_threads_model_has_only_connection_dispatch() -> None:
    assert Config(model="threads").dispatch == "connection"
    with pytest.raises(ConfigError, match="--dispatch: threads supports connection"):
        Config(model="threads", dispatch="ready")


def test_with_ready_dispatch_the_watchdog_may_be_shorter_than_the_timeouts() -> None:
    # No worker ever waits on a client, so a long timeout is no stall.
    config = Config(model="queue", idle_timeout=120.0, watchdog_timeout=10.0)
    assert config.dispatch == "ready" and config.ready_dispatch


def test_the_config_is_frozen() -> None:
    config = Config(model="queue")
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workers": 0}, "--workers"),
        ({"queue_size": 0}, "--queue-size"),
        ({"port": 70000}, "--port"),
        ({"port": -2}, "--port"),
        ({"port": 9000, "metrics_port": 9000}, "--metrics-port: 9000 is also the echo port"),
        ({"stack_size": 40000}, "--stack-size"),
        ({"idle_timeout": -2.0}, "--idle-timeout"),
        ({"log_level": "LOUD"}, "--log-level"),
        (
            {"watchdog_timeout": 10.0, "dispatch": "connection"},
            "--watchdog-timeout: must be longer than --idle-timeout",
        ),
        ({"dispatch": "fibers"}, "--dispatch: queue supports ready or connection"),
        ({"max_connections": 0}, "--max-connections"),
        ({"output_budget": 1000}, "--output-budget"),
        ({"turn_messages": 0}, "--turn-messages"),
        ({"linger": 2.0}, "--linger"),
    ],
)
def test_bad_values_are_refused_up_front(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(model="queue", **fields)  # type: ignore[arg-type]


def test_an_environment_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"ECHO_QUEUE_SIZE \(environment\): must be between"):
        parse_config(["--model", "queue"], env={"ECHO_QUEUE_SIZE": "0"})


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--model", "executor"], "behind_min_rate"),
        (["--model", "queue", "--min-rate", "0"], "quietest"),
        (["--model", "queue", "--dispatch", "connection"], "never"),
        (["--model", "threads"], "never"),
    ],
)
def test_the_info_metric_says_whom_the_cap_evicts(args: list[str], rule: str) -> None:
    config = parse_config(args, env={})
    assert config.evicts_at_cap == rule
