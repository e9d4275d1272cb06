"""Start-up checks of the machine's limits: a configuration this machine cannot run is
one line and exit 2, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services import preflight, procfs
from services.budget import RESERVED, default_cap
from services.config import Config, ConfigError
from services.preflight import RESERVED_TASKS, Limits
from support import ROOT

ROOMY = Limits(descriptors=65536, tasks=None)


def test_more_workers_than_the_pid_limit_allows_is_refused() -> None:
    config = Config(model="queue", workers=300)
    with pytest.raises(ConfigError, match=r"--workers: 300 workers need 308 threads.* 256"):
        preflight.check(config, Limits(descriptors=65536, tasks=256))
    preflight.check(Config(model="queue", workers=256 - RESERVED_TASKS), Limits(65536, 256))


def test_the_unbounded_model_is_not_held_to_the_pid_limit() -> None:
    # Running into it is what the threads model is there to show.
    preflight.check(Config(model="threads"), Limits(descriptors=65536, tasks=16))


def test_connection_dispatch_needs_a_descriptor_per_worker_and_waiting_connection() -> None:
    limits = Limits(descriptors=RESERVED + 64, tasks=None)
    config = Config(model="executor", dispatch="connection", workers=32, queue_size=32)
    preflight.check(config, limits)
    with pytest.raises(ConfigError, match=r"--workers: 32 workers and 33 waiting need 337 file"):
        preflight.check(
            Config(model="executor", dispatch="connection", workers=32, queue_size=33), limits
        )


def test_the_cap_metrics_clients_and_own_files_must_fit_the_descriptor_limit() -> None:
    limits = Limits(descriptors=1024, tasks=None)
    preflight.check(Config(model="queue", max_connections=1024 - RESERVED), limits)
    with pytest.raises(
        ConfigError,
        match=r"--max-connections: 10000 connections need 10272 file descriptors with the 256 "
        r"metrics clients and 16 of the server's own, over this process's limit of 1024",
    ):
        preflight.check(Config(model="queue", max_connections=10_000), limits)
    # The default cap is what is left.
    assert default_cap(1024) == 1024 - RESERVED
    preflight.check(Config(model="queue", max_connections=default_cap(1024)), limits)


def test_a_stack_size_the_platform_refuses_is_refused_up_front() -> None:
    def platform_minimum_128k(size: int) -> int:
        if 0 < size < 128 * 1024:
            raise ValueError("size not valid")
        return 0

    with pytest.raises(ConfigError, match="--stack-size: 65536 bytes is below this platform"):
        preflight.check(Config(model="threads"), ROOMY, platform_minimum_128k)
    preflight.check(Config(model="threads", stack_size=128 * 1024), ROOMY, platform_minimum_128k)


def test_a_stack_size_check_puts_the_previous_size_back() -> None:
    sizes = [0]

    def record(size: int) -> int:
        previous, sizes[0] = sizes[0], size
        return previous

    preflight.check(Config(model="threads"), ROOMY, record)
    assert sizes == [0]


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        ("0::/\n", {"pids.max": "256\n"}, 256),  # v2, a container's own namespace
        ("0::/user.slice/a\n", {"user.slice/a/pids.max": "4096\n"}, 4096),  # v2, a host
        ("0::/\n", {}, None),  # v2 root: no limit file
        ("0::/x\n", {"x/pids.max": "max\n"}, None),
        ("8:pids:/docker/abc\n0::/\n", {"pids/pids.max": "256\n"}, 256),  # v1, in a container
        ("8:pids:/\n1:cpu:/\n", {}, None),  # v1 host root
    ],
)
def test_the_pid_limit_is_read_from_cgroup_v1_or_v2(
    membership: str, files: dict[str, str], expected: int | None, tmp_path: Path
) -> None:
    (tmp_path / "cgroup").write_text(membership)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert procfs.pid_limit(root, tmp_path / "cgroup") == expected


def test_a_descriptor_limit_too_low_for_the_pool_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [
            "bash", "-c",
            f"ulimit -n 20 && exec {sys.executable} -m services --model queue "
            "--dispatch connection --workers 8 --port 0 --metrics-port 0",
        ],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--workers: 8 workers and 64 waiting need 344 file descriptors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_stack_size_no_thread_can_start_with_is_refused_up_front() -> None:
    sizes = [0]

    def record(size: int) -> int:
        previous, sizes[0] = sizes[0], size
        return previous

    def no_room() -> None:
        raise RuntimeError("can't start new thread")

    config = Config(model="threads", stack_size=128 * 1024 * 1024)
    with pytest.raises(ConfigError, match=r"--stack-size: no thread with a stack of 134217728"):
        preflight.check(config, ROOMY, record, no_room)
    assert sizes == [0]  # put back all the same


@pytest.mark.parametrize("size", ["1099511627776", str(512 * 1024 * 1024)])
def test_a_stack_size_past_the_bound_is_one_line_and_exit_2(size: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services", "--model", "threads", "--stack-size", size],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--stack-size: must be 0 (system default) or a multiple of 4096" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_ready_file_in_a_missing_directory_is_refused_before_binding(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "ready.json"
    with pytest.raises(ConfigError, match="--ready-file: there is no directory"):
        preflight.check(Config(model="queue", ready_file=str(missing)), ROOMY)
    preflight.check(Config(model="queue", ready_file=str(tmp_path / "ready.json")), ROOMY)
    result = subprocess.run(
        [sys.executable, "-m", "services", "--model", "queue", "--port", "0",
         "--metrics-port", "0", "--ready-file", str(missing)],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
