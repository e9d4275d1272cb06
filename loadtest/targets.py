"""What a flood attacks: the project's services by name, or any TCP echo server.

    --targets executor,queue          the services: their containers, else loopback
    --target NAME=HOST:PORT[,pid=N|container=NAME][,metrics=PORT]    any echo server

A server of the project exports /metrics, which the sampler reads. Any other is
watched through /proc: its own process (`pid=`) or a container's main process
(`container=`, the container's own address only). With neither, only its clients
are judged, and the table says so (`Summary.watched`).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from pathlib import Path

from loadtest.attacks import AttackRefused
from loadtest.containers import (
    NETWORKS,
    container_address,
    container_network,
    docker_output,
    parse_networks,
)
from loadtest.floodrun import Target
from services.models import MODELS

VIAS = ("auto", "network", "published")  # how the containers are reached (--via)
LOOPBACK = "127.0.0.1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_SPEC_FORM = "NAME=HOST:PORT[,pid=N|container=NAME][,metrics=PORT]"


def targets_from(args: argparse.Namespace) -> list[Target]:
    if args.target:
        targets = [parse_target(spec, args.docker_project) for spec in args.target]
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise AttackRefused(f"--target: each name once ({', '.join(names)})")
        return targets
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise AttackRefused(
            f"targets: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}"
        )
    if (args.port or args.metrics_port) and len(names) != 1:
        raise AttackRefused("--port/--metrics-port need exactly one target")
    if args.via == "network" and (args.port or args.metrics_port or args.host):
        raise AttackRefused(
            "--via network: the containers' own addresses and ports, not --host/--port"
        )
    return [target_of(name, args) for name in names]


def target_of(name: str, args: argparse.Namespace) -> Target:
    spec = MODELS[name]
    as_given = args.host or args.port or args.metrics_port
    address = None
    if args.via == "network" or (args.via == "auto" and not as_given):
        address = container_address(args.docker_project, name)
        if address is None and args.via == "network":
            raise AttackRefused(
                f"--via network: no running container of {name!r} in compose project "
                f"{args.docker_project!r} (make up)"
            )
    if address is not None:
        network = container_network(args.docker_project, name)
        return Target(
            name,
            (address, spec.port),
            (address, spec.metrics_port),
            container=True,
            network=network,
        )
    host = args.host or LOOPBACK
    return Target(
        name, (host, args.port or spec.port), (host, args.metrics_port or spec.metrics_port)
    )


def parse_target(spec: str, project: str) -> Target:
    """One `--target`; AttackRefused, in one line, for anything else. A container must
    be of compose project `project`: floods reach only the project's own."""
    name, equals, rest = spec.partition("=")
    if not equals or not _NAME.fullmatch(name):
        raise AttackRefused(f"--target {spec!r}: give {_SPEC_FORM}")
    where, *options = rest.split(",")
    host, port = _host_port(where, spec)
    given: dict[str, str] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or key not in ("pid", "container", "metrics") or key in given:
            raise AttackRefused(f"--target {spec!r}: options are pid=, container=, metrics=")
        given[key] = value
    if "pid" in given and "container" in given:
        raise AttackRefused(f"--target {spec!r}: pid= or container=, not both")
    metrics = (host, _port(given["metrics"], spec)) if "metrics" in given else None
    if "container" in given:
        box = given["container"]
        pid, network = _container(box, host, project, spec)
        return Target(
            name, (host, port), metrics, container=True, network=network, pid=pid, box=box
        )
    return Target(
        name, (host, port), metrics, pid=_pid(given["pid"], spec) if "pid" in given else None
    )


def _host_port(where: str, spec: str) -> tuple[str, int]:
    host, colon, port = where.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AttackRefused(f"--target {spec!r}: HOST is an IP address") from None
    if not colon:
        raise AttackRefused(f"--target {spec!r}: give {_SPEC_FORM}")
    return host, _port(port, spec)


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AttackRefused(f"--target {spec!r}: a port is 1 to 65535")
    return int(text)


def _pid(text: str, spec: str) -> int:
    if not text.isdigit() or not Path(f"/proc/{text}/status").exists():
        raise AttackRefused(f"--target {spec!r}: no process {text} here")
    return int(text)


def _container(name: str, host: str, project: str, spec: str) -> tuple[int, str]:
    """The container's main process and the network on which `host` is its address:
    a container address is accepted only as Docker gives it, of the project's own."""
    template = '{{index .Config.Labels "com.docker.compose.project"}}/ {{.State.Pid}} ' + NETWORKS
    try:
        owner, pid, *networks = docker_output("inspect", "-f", template, name).split()
    except (AttackRefused, ValueError) as error:
        raise AttackRefused(f"--target {spec!r}: {error}") from None
    if owner != f"{project}/":
        raise AttackRefused(f"--target {spec!r}: {name!r} is not of compose project {project!r}")
    on = [net for net, address in parse_networks(networks).items() if address == host]
    if not on or pid == "0":
        raise AttackRefused(
            f"--target {spec!r}: {host} is not the address of running container {name!r}"
        )
    return int(pid), on[0]
