"""Run a server as a child process and learn where it listens: for tests, the bench and
`make up-local`.

The child writes a ready file (JSON: pid, echo and metrics addresses) once both
ports listen; the launcher waits for it. No log line is parsed, so any address
family and any log format works. Any command that honours `--ready-file PATH`
can be launched: `python -m services`, and the bench's reference servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from services import procfs
from services.readyfile import read_ready_file

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0  # generous: this machine can freeze a process for seconds

# `python -c UNDER_AS_LIMIT MiB ARGS...`: the server under RLIMIT_AS = what it maps
# at start-up plus a budget, to run a model out of address space on purpose.
UNDER_AS_LIMIT = """
import resource, sys
from pathlib import Path
from services.app import main
mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def services_command(*args: str, code: str | None = None) -> list[str]:
    """`python -m services ARGS`, or `python -c CODE ARGS` (code that ends in services' main)."""
    return [sys.executable, *(("-c", code) if code else ("-m", "services")), *args]


class ServerProcess:
    """A launched server: its process, log, and the addresses from its ready file."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        inherit_output: bool = False,
    ) -> None:
        """The child's output goes to `log_path` (a file of the launcher's by default), or
        to this process's own stdout and stderr with `inherit_output`."""
        self._dir = Path(tempfile.mkdtemp(prefix="echo-launch-"))
        self.log_path = log_path or self._dir / "server.log"
        self._ready_path = self._dir / "ready.json"
        self.command = [*command, "--ready-file", str(self._ready_path)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own commands)
                self.command,
                stdout=None if inherit_output else log,
                stderr=None if inherit_output else subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ if env is None else env),
                # A Ctrl-C in the terminal reaches only the launcher, which then stops
                # each child once, by SIGTERM.
                start_new_session=True,
            )
        self.address: tuple[str, int] = ("", 0)
        self._metrics_address: tuple[str, int] | None = None
        self._terminated = False

    @property
    def metrics_address(self) -> tuple[str, int]:
        if self._metrics_address is None:
            raise RuntimeError(f"{self.command[0]} has no metrics port (or is not ready)")
        return self._metrics_address

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Wait for the ready file; RuntimeError with the log if the child exits first."""
        deadline = time.monotonic() + timeout
        interval = 0.005
        while not self._ready_path.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.command[0]} exited with {self.process.returncode} before it was "
                    f"ready:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {timeout:g} s:\n{self.log()[-4000:]}")
            time.sleep(interval)  # a poll step under a deadline
            interval = min(interval * 2, 0.05)
        self.address, metrics = read_ready_file(str(self._ready_path))
        if metrics is not None:
            self._metrics_address = metrics
        return self

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self._terminated |= signum == signal.SIGTERM

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM (once: a server takes a second one as "exit now"), then SIGKILL after
        `grace` seconds; the exit status (negative: killed)."""
        if not self._terminated:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def close(self) -> None:
        """Kill it if it still runs and remove the launcher's files."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        return procfs.cpu_seconds(self.pid)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def launch(
    command: Sequence[str],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    inherit_output: bool = False,
) -> ServerProcess:
    """Start `command` with `--ready-file` and wait until it is ready (killed if it never is)."""
    server = ServerProcess(command, log_path=log_path, env=env, inherit_output=inherit_output)
    try:
        return server.wait_ready(timeout)
    except BaseException:
        server.close()
        raise
