"""The same floods against echo servers the project did not design (`make flood-peers`).

    python -m loadtest.peers [--containers] [flood flags, e.g. --scenarios idle,slow-reader]

Locally it starts, on free loopback ports, the three models (their defaults, as
`make up-local`) and the peers of `bench.servers.peer_specs`: asyncio streams,
uvloop streams and protocol, C epoll, each as a naive user writes it, and asyncio
hardened as its docs advise (`bench.hardened_echo`); then stops them all.

With `--containers` it finds them running instead: the models of `make up` and the
peers of compose's `peers` profile (`make flood-peers-containers` starts and removes
those), at their containers' own addresses, with the same limits.

Either way: one `python -m loadtest.flood` run with every one of them as a `--target`
(the models watched through their /metrics, the peers through /proc), one table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from bench.servers import model_command, peer_specs, started
from harness.launcher import ServerProcess
from loadtest import flood
from loadtest.attacks import AttackRefused
from loadtest.containers import container_address, container_id
from services.models import MODELS

PROJECT = "echo-cluster"
# The peers' ports in their containers (compose.yaml's `peers` profile says the same;
# tests/test_registry.py checks it).
PEER_PORTS = {
    "asyncio": 15011,
    "uvloop-streams": 15012,
    "uvloop-protocol": 15013,
    "c-epoll": 15014,
    "asyncio-hardened": 15015,
}
CHOSEN_HERE = ("--target", "--targets", "--host", "--port", "--metrics-port", "--via")


def target_flag(name: str, server: ServerProcess) -> str:
    host, port = server.address
    try:
        watched = f"metrics={server.metrics_address[1]}"
    except RuntimeError:  # no metrics port: a peer
        watched = f"pid={server.pid}"
    return f"--target={name}={host}:{port},{watched}"


def container_flags(project: str) -> list[str]:
    """A --target for each model and peer whose container runs in `project`; the peers
    of which none runs are left out (a static C build may be missing), said on stderr."""
    flags = []
    wanted: dict[str, tuple[str, int, int | None]] = {
        name: (name, spec.port, spec.metrics_port) for name, spec in MODELS.items()
    }
    wanted |= {name: (f"peer-{name}", port, None) for name, port in PEER_PORTS.items()}
    for name, (service, port, metrics) in wanted.items():
        box, address = container_id(project, service), container_address(project, service)
        if box is None or address is None:
            if name in MODELS:
                raise AttackRefused(f"no running container of {name!r} (make up)")
            print(f"{name}: no running container of {service!r}, left out", file=sys.stderr)
            continue
        watched = f",metrics={metrics}" if metrics else ""
        flags.append(f"--target={name}={address}:{port},container={box}{watched}")
    return flags


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    in_containers = "--containers" in given
    given = [arg for arg in given if arg != "--containers"]
    if any(arg.startswith(CHOSEN_HERE) for arg in given):
        print("python -m loadtest.peers: error: it chooses the targets itself", file=sys.stderr)
        return 2
    if in_containers:
        try:
            targets = container_flags(PROJECT)
        except AttackRefused as error:
            print(f"python -m loadtest.peers: error: {error}", file=sys.stderr)
            return 2
        return flood.main([*given, *targets], out)
    specs: dict[str, Sequence[str]] = {name: model_command(name) for name in MODELS}
    specs |= peer_specs(hardened=True)
    with started(specs) as servers:
        return flood.main([*given, *(target_flag(n, s) for n, s in servers.items())], out)


if __name__ == "__main__":
    sys.exit(main())
