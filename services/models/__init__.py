"""The model registry: the one place that knows each threading model.

A model is one module with a `Server` subclass plus one `ModelSpec` here. Config
defaults, the local cluster, the load and flood tools, the bench and the tests
read the list and every per-model fact from `MODELS`; nothing else spells out
the models' names or ports.

The registry imports no server: `app.build_server` imports a model's class when it
builds one, so that reading the registry (config, the flood tool) never imports the
threading code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    server: str  # "package.module:ClassName" of its `Server` subclass (`app.build_server`)
    summary: str  # one line, for --help and the docs
    bounded: bool  # a fixed pool of workers; False means a thread per connection
    port: int  # default echo port (compose, `make up-local`, load and flood tools)
    metrics_port: int  # default /metrics port
    # Default defences: only the bounded models defend their workers; the unbounded
    # control group has none, so that what it lacks is measured, not masked.
    idle_timeout: float | None
    send_timeout: float | None
    # How an admitted connection reaches a worker; the first is the default. `ready`:
    # it waits in the event loop and a worker echoes only what is there (the pools);
    # `connection`: it owns a worker (or a thread) for its whole life (the recipe's).
    dispatch_modes: tuple[str, ...] = ("ready", "connection")


_DEFENDED = 10.0  # seconds, idle and send timeout of the bounded models

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="executor",
            server="services.models.executor:ExecutorServer",
            summary="a bounded concurrent.futures.ThreadPoolExecutor",
            bounded=True,
            port=15001,
            metrics_port=9101,
            idle_timeout=_DEFENDED,
            send_timeout=_DEFENDED,
        ),
        ModelSpec(
            name="queue",
            server="services.models.queue_pool:QueueServer",
            summary="a hand-rolled pool: a bounded queue.Queue and N worker threads",
            bounded=True,
            port=15002,
            metrics_port=9102,
            idle_timeout=_DEFENDED,
            send_timeout=_DEFENDED,
        ),
        ModelSpec(
            name="threads",
            server="services.models.threads:ThreadPerConnectionServer",
            summary="a new thread per connection with a small stack; unbounded (the control)",
            bounded=False,
            port=15003,
            metrics_port=9103,
            idle_timeout=None,
            send_timeout=None,
            dispatch_modes=("connection",),
        ),
    )
}


def model_names() -> tuple[str, ...]:
    return tuple(MODELS)


def spec_of(name: str) -> ModelSpec:
    """The spec of a registered model; KeyError names the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not one of {', '.join(MODELS)}") from None


@contextmanager
def registered(spec: ModelSpec) -> Iterator[ModelSpec]:
    """Add a model for the length of a `with` block (plug-in models, tests)."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered already")
    MODELS[spec.name] = spec
    try:
        yield spec
    finally:
        del MODELS[spec.name]
