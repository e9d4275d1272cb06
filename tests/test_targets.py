"""Any TCP echo server as a flood target: `--target NAME=HOST:PORT[,pid=N|container=NAME]`,
watched through its /metrics, /proc, or not at all, and said which."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import loadtest.peers
from bench.servers import peer_specs
from harness.launcher import ServerProcess
from loadtest import flood
from loadtest.attacks import AttackRefused
from loadtest.floodrun import RunSettings, Target
from loadtest.observe import NOTHING_READ, ProbeResult, Sample, process_reader
from loadtest.peers import main as peers_main
from loadtest.targets import parse_target
from loadtest.verdict import Limits, Timeline, judge_flood
from services.models import MODELS
from support import EVENTUALLY

PROJECT = "echo-cluster"


def test_a_target_is_a_name_an_address_and_how_it_is_watched() -> None:
    me = os.getpid()
    assert parse_target(f"asyncio=127.0.0.1:8000,pid={me}", PROJECT) == Target(
        "asyncio", ("127.0.0.1", 8000), None, pid=me
    )
    plain = parse_target("c=[::1]:9", PROJECT)
    assert (plain.address, plain.watched) == (("::1", 9), "probes only")
    ours = parse_target("queue=127.0.0.1:15002,metrics=9102", PROJECT)
    assert (ours.metrics, ours.watched) == (("127.0.0.1", 9102), "metrics")
    assert parse_target(f"p=127.0.0.1:1,pid={me}", PROJECT).watched == "process"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("127.0.0.1:8000", "give NAME=HOST:PORT"),
        ("a b=127.0.0.1:8000", "give NAME=HOST:PORT"),
        ("x=localhost:8000", "HOST is an IP address"),
        ("x=127.0.0.1", "HOST is an IP address"),
        ("x=127.0.0.1:0", "a port is 1 to 65535"),
        ("x=127.0.0.1:8000,metrics=70000", "a port is 1 to 65535"),
        ("x=127.0.0.1:8000,colour=red", "options are pid=, container=, metrics="),
        ("x=127.0.0.1:8000,pid=1,pid=2", "options are pid=, container=, metrics="),
        ("x=127.0.0.1:8000,pid=999999999", "no process 999999999 here"),
        ("x=127.0.0.1:8000,pid=1,container=c", "pid= or container=, not both"),
    ],
)
def test_a_bad_target_is_refused_in_one_line(spec: str, says: str) -> None:
    with pytest.raises(AttackRefused, match=says):
        parse_target(spec, PROJECT)


def test_a_bad_target_exits_2_before_any_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    assert flood.main(["--target", "x=8.8.8.8:7"]) == 2  # the attack tool's own rule
    assert "loopback addresses only" in capsys.readouterr().err
    assert flood.main(["--target", "a=127.0.0.1:7", "--target", "a=127.0.0.1:8"]) == 2
    assert "each name once" in capsys.readouterr().err


@pytest.fixture
def docker_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker` first on PATH whose `inspect` prints what the test wrote in `said`."""
    said = tmp_path / "said"
    docker = tmp_path / "docker"
    docker.write_text(f"#!{sys.executable}\nprint(open({str(said)!r}).read())\n")
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return said


def test_a_container_target_is_one_of_the_projects_at_its_own_address(docker_says: Path) -> None:
    docker_says.write_text(f"{PROJECT}/ 4242 {PROJECT}_peers=172.18.0.7 ")
    target = parse_target("uv=172.18.0.7:15011,container=uv", PROJECT)
    assert (target.container, target.network, target.pid) == (True, f"{PROJECT}_peers", 4242)
    assert target.box == "uv"  # whose next main process the watch follows
    with pytest.raises(AttackRefused, match="not the address of running container 'uv'"):
        parse_target("uv=172.18.0.8:15011,container=uv", PROJECT)
    docker_says.write_text("other/ 4242 other_default=172.18.0.7 ")
    with pytest.raises(AttackRefused, match="not of compose project 'echo-cluster'"):
        parse_target("uv=172.18.0.7:15011,container=uv", PROJECT)


def test_without_a_metrics_port_its_scenarios_are_skipped_and_said() -> None:
    peer = Target("asyncio", ("127.0.0.1", 8000), None)
    ours = Target("queue", ("127.0.0.1", 15002), ("127.0.0.1", 9102))
    scenarios = ["idle", "metrics-slowloris", "fd-squeeze"]
    assert flood.runs_of(scenarios, [peer, ours]) == [
        ("idle", peer), ("idle", ours), ("metrics-slowloris", ours), ("fd-squeeze", ours),
    ]  # fmt: skip
    assert flood.skipped(scenarios, [peer, ours]) == [
        "metrics-slowloris skipped for asyncio: it has no metrics port to attack",
        "fd-squeeze skipped for asyncio: it has no metrics port to attack",
    ]
    with pytest.raises(AttackRefused, match="no metrics port"):
        RunSettings().plan("fd-squeeze", peer)


@contextmanager
def python_process() -> Iterator[subprocess.Popen[str]]:
    """A Python process that runs (not still starting) until the block ends."""
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "up\n"
        yield child
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()


def test_a_process_is_read_in_proc_and_reads_as_nothing_once_gone() -> None:
    with python_process() as child:
        values, rejected, closed, info = process_reader(child.pid)()
        assert values["threads"] == 1 and values["rss_bytes"] > 1_000_000
        assert values["open_fds"] >= 3 and values["start_time"] > 0
        assert (rejected, closed, info) == ({}, {}, {})
    assert process_reader(child.pid)() == NOTHING_READ


def test_a_restarted_container_is_followed_to_its_new_process_and_judged_restarted() -> None:
    successor: list[int] = []
    with python_process() as first:
        read = process_reader(first.pid, find=lambda: successor[0] if successor else None)
        before = read()[0]
    assert read() == NOTHING_READ  # gone, and no successor yet
    with python_process() as second:
        successor.append(second.pid)
        after = read()[0]
        assert after["start_time"] > before["start_time"] and read()[0]  # and stays on it
    timeline = Timeline(attack_start=1.0, attack_end=3.0, run_end=4.0, settle=0.5)
    samples = [Sample(at, values, {}, {}, {}) for at, values in ((0.5, before), (2.0, after))]
    probes = [ProbeResult(at=t / 5, ok=True, seconds=0.001) for t in range(20)]
    summary = judge_flood(samples, probes, timeline, Limits(), watched="process")
    assert "the process restarted during the run" in summary.reasons


def test_a_target_watched_by_nothing_is_judged_on_its_clients_alone() -> None:
    timeline = Timeline(attack_start=2.0, attack_end=12.0, run_end=14.0, settle=1.0)
    silent = [Sample(at, {}, {}, {}, {}) for at in range(14)]
    probes = [ProbeResult(at=t / 5, ok=True, seconds=0.001) for t in range(70)]
    alone = judge_flood(silent, probes, timeline, Limits(), watched="probes only")
    assert (alone.verdict, alone.reasons, alone.watched) == ("held", [], "probes only")
    gone = judge_flood(silent, probes, timeline, Limits(), watched="process")
    assert gone.verdict == "down"
    assert gone.reasons == ["its process (/proc) never answered"]


def test_the_peers_runner_chooses_its_targets_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert peers_main(["--target", "x=127.0.0.1:1"]) == 2
    assert "it chooses the targets itself" in capsys.readouterr().err


def test_in_containers_the_peers_runner_finds_the_models_and_the_peers_that_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    running = {"executor", "queue", "threads", "peer-asyncio", "peer-uvloop-protocol"}
    monkeypatch.setattr(
        loadtest.peers, "container_id", lambda _p, s: f"id-{s}" if s in running else None
    )
    monkeypatch.setattr(loadtest.peers, "container_address", lambda _p, s: "172.18.0.9")
    flags = loadtest.peers.container_flags(PROJECT)
    assert flags == [
        "--target=executor=172.18.0.9:15001,container=id-executor,metrics=9101",
        "--target=queue=172.18.0.9:15002,container=id-queue,metrics=9102",
        "--target=threads=172.18.0.9:15003,container=id-threads,metrics=9103",
        "--target=asyncio=172.18.0.9:15011,container=id-peer-asyncio",
        "--target=uvloop-protocol=172.18.0.9:15013,container=id-peer-uvloop-protocol",
    ]
    assert "uvloop-streams: no running container of 'peer-uvloop-streams', left out" in (
        capsys.readouterr().err
    )
    running.discard("queue")
    with pytest.raises(AttackRefused, match="no running container of 'queue' \\(make up\\)"):
        loadtest.peers.container_flags(PROJECT)


def test_every_server_in_a_chart_has_a_colour_of_its_own() -> None:
    from loadtest.charts import PALETTE, colors_of  # noqa: PLC0415 (matplotlib: slow import)

    peers = ["asyncio", "uvloop-streams", "uvloop-protocol", "c-epoll", "asyncio-hardened"]
    colors = colors_of([*MODELS, *peers, "asyncio"])
    assert len(colors) == len(MODELS) + len(peers)
    assert len(set(colors.values())) == len(colors)  # none shared
    assert [colors[m] for m in MODELS] == list(PALETTE[: len(MODELS)])  # as in every chart
    assert colors_of(["threads"]) == {"threads": colors["threads"]}


def test_a_process_whose_descriptors_may_not_be_listed_is_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not root, a container's process (its own uid) shows its status, not its fds."""

    def refused(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    with python_process() as child, monkeypatch.context() as patched:
        patched.setattr(os, "listdir", refused)  # as observe calls it; undone at once
        values = process_reader(child.pid)()[0]
    assert values["threads"] == 1 and values["rss_bytes"] > 0 and "open_fds" not in values


def test_a_server_without_metrics_is_flooded_and_watched_through_proc(tmp_path: Path) -> None:
    """Any echo server is a target: the naive asyncio peer, its threads, memory and
    descriptors read from /proc (`--target NAME=HOST:PORT,pid=N`). Nothing here is
    timed, so it runs beside other tests."""
    peer = ServerProcess(peer_specs()["asyncio"], log_path=tmp_path / "peer.log")
    settings = RunSettings(connections=300, rate=2500.0, duration=4.0, baseline=1.0, settle=2.0)
    try:
        peer.wait_ready(EVENTUALLY)
        target = parse_target(f"asyncio={peer.address[0]}:{peer.address[1]},pid={peer.pid}", "-")
        run = flood.flood(target, "idle", settings)
    finally:
        peer.close()
    summary = run.summary
    assert (summary.watched, summary.scrape_failures) == ("process", 0), summary
    assert summary.peak_open_fds >= 300, summary  # every attacker connection, seen by /proc
    assert summary.baseline_threads == summary.peak_threads == 1, summary  # one event loop
    assert summary.rejected == summary.closed == {}, summary  # nothing known of those
    assert run.counts.peak_open == 300
