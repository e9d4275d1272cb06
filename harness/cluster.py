"""`make up-local`: every registered model on loopback, in the foreground, until Ctrl-C.

Each server is its own process, as in the containers, so one model's threads,
memory and descriptors never affect another's. If one dies, the rest are
stopped too: a half-running cluster would give misleading comparisons.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from harness.launcher import ServerProcess, launch, services_command
from services.cli import OneLineParser
from services.models import MODELS

_STOP_GRACE = 10.0
_POLL = 0.2  # seconds between looks at the children


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def busy_ports(host: str) -> list[str]:
    return [
        f"{host}:{port} ({spec.name} {kind})"
        for spec in MODELS.values()
        for kind, port in (("echo", spec.port), ("metrics", spec.metrics_port))
        if port_in_use(host, port)
    ]


def start_all(host: str, dispatch: str | None = None) -> dict[str, ServerProcess]:
    """Every model on its registered ports, in `dispatch` mode where the model has it;
    all or nothing."""
    # The registry's ports for each model, whatever ECHO_PORT says in this shell.
    env = {k: v for k, v in os.environ.items() if k not in ("ECHO_PORT", "ECHO_METRICS_PORT")}
    children: dict[str, ServerProcess] = {}
    try:
        for name in MODELS:
            mode = ("--dispatch", dispatch) if dispatch in MODELS[name].dispatch_modes else ()
            command = services_command("--model", name, "--host", host, *mode)
            children[name] = launch(command, env=env, inherit_output=True)
    except BaseException:
        stop_all(children)
        raise
    return children


def watch(children: dict[str, ServerProcess], stop_requested: threading.Event) -> int:
    """Until a stop is requested (0) or a child exits (1, having said which)."""
    while not stop_requested.wait(_POLL):
        exited = {name: c.process.poll() for name, c in children.items()}
        exited = {name: code for name, code in exited.items() if code is not None}
        if exited:
            said = ", ".join(f"{name} exited with {code}" for name, code in exited.items())
            print(f"up-local: {said}; stopping the rest", file=sys.stderr)
            return 1
    return 0


def stop_all(children: dict[str, ServerProcess]) -> int:
    """SIGTERM each, then wait for all; 1 if any exited unclean or had to be killed."""
    for child in children.values():
        child.signal(signal.SIGTERM)
    status = 0
    for name, child in children.items():
        code = child.stop(_STOP_GRACE)
        if code == -signal.SIGKILL:
            print(f"up-local: {name} did not stop in {_STOP_GRACE:g} s; killed", file=sys.stderr)
        status = max(status, 1 if code else 0)
        child.close()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m harness.cluster",
        description="Run every model's server on loopback until Ctrl-C. "
        "Extra ECHO_* variables (e.g. ECHO_LOG_LEVEL) apply to all of them.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address for all the servers")
    modes = sorted({mode for spec in MODELS.values() for mode in spec.dispatch_modes})
    parser.add_argument(
        "--dispatch",
        choices=modes,
        help="dispatch mode for every model that has it [each model's default]",
    )
    args = parser.parse_args(argv)

    if busy := busy_ports(args.host):
        print(f"up-local: port already in use: {', '.join(busy)}", file=sys.stderr)
        return 1
    stop_requested = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        children = start_all(args.host, args.dispatch)
    except RuntimeError as error:
        print(f"up-local: a server did not start: {error}", file=sys.stderr)
        return 1
    for name, child in children.items():
        (host, port), metrics = child.address, child.metrics_address
        print(
            f"up-local: {name:8} echo {host}:{port}  metrics http://{metrics[0]}:{metrics[1]}/metrics",
            file=sys.stderr,
        )
    print(f"up-local: Ctrl-C stops all {len(children)}", file=sys.stderr)
    status = watch(children, stop_requested)
    return max(status, stop_all(children))


if __name__ == "__main__":
    sys.exit(main())
