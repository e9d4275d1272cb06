"""`make up-local`: the three servers on loopback, in the foreground, until Ctrl-C.

Each server is its own process, as in the containers, so one model's threads,
memory and descriptors never affect another's. If one dies, the rest are
stopped too: a half-running cluster would give misleading comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from services.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, MODELS

_STOP_GRACE = 10.0


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.cluster",
        description="Run the executor, queue and threads servers on loopback until Ctrl-C. "
        "Extra ECHO_* variables (e.g. ECHO_LOG_LEVEL) apply to all three.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address for all three servers")
    args = parser.parse_args(argv)

    busy = [
        f"{args.host}:{port} ({model} {kind})"
        for model in MODELS
        for kind, port in (
            ("echo", DEFAULT_PORTS[model]),
            ("metrics", DEFAULT_METRICS_PORTS[model]),
        )
        if port_in_use(args.host, port)
    ]
    if busy:
        print(f"up-local: port already in use: {', '.join(busy)}", file=sys.stderr)
        return 1

    env = {k: v for k, v in os.environ.items() if k not in ("ECHO_PORT", "ECHO_METRICS_PORT")}
    children = {
        model: subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "services", "--model", model, "--host", args.host],
            env=env,
            # Ctrl-C reaches only this process, which then stops each child once, by SIGTERM.
            start_new_session=True,
        )
        for model in MODELS
    }
    stop_requested = False

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for model in MODELS:
        print(
            f"up-local: {model:8} echo {args.host}:{DEFAULT_PORTS[model]}  "
            f"metrics http://{args.host}:{DEFAULT_METRICS_PORTS[model]}/metrics",
            file=sys.stderr,
        )
    print("up-local: Ctrl-C stops all three", file=sys.stderr)

    status = 0
    while not stop_requested:
        exited = {m: c.returncode for m, c in children.items() if c.poll() is not None}
        if exited:
            print(
                f"up-local: {', '.join(f'{m} exited with {rc}' for m, rc in exited.items())}; "
                "stopping the rest",
                file=sys.stderr,
            )
            status = 1
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            children[MODELS[0]].wait(0.2)
    return max(status, _stop(children))


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> int:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    status = 0
    for model, child in children.items():
        try:
            code = child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
            print(f"up-local: {model} did not stop in {_STOP_GRACE:g} s; killed", file=sys.stderr)
        status = max(status, 1 if code else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
