"""The same floods against echo servers the project did not design (`make flood-peers`).

    python -m loadtest.peers [flood flags, e.g. --scenarios idle,slow-reader]

Starts, on free loopback ports, the three models (their defaults, as `make up-local`)
and the peers of `bench.servers.peer_specs`: asyncio streams, uvloop streams and
protocol, C epoll, each as a naive user writes it, and asyncio hardened as its docs
advise (`bench.hardened_echo`). Then one `python -m loadtest.flood` run with every one
of them as a `--target` (the models watched through their /metrics, the peers through
/proc), one table; then stops them all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from bench.servers import model_command, peer_specs, started
from harness.launcher import ServerProcess
from loadtest import flood
from services.models import MODELS


def target_flag(name: str, server: ServerProcess) -> str:
    host, port = server.address
    try:
        watched = f"metrics={server.metrics_address[1]}"
    except RuntimeError:  # no metrics port: a peer
        watched = f"pid={server.pid}"
    return f"--target={name}={host}:{port},{watched}"


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith(("--target", "--host", "--port", "--metrics-port")) for arg in given):
        print("python -m loadtest.peers: error: it chooses the targets itself", file=sys.stderr)
        return 2
    specs: dict[str, Sequence[str]] = {name: model_command(name) for name in MODELS}
    specs |= peer_specs(hardened=True)
    with started(specs) as servers:
        targets = [target_flag(name, server) for name, server in servers.items()]
        return flood.main([*given, *targets], out)


if __name__ == "__main__":
    sys.exit(main())
