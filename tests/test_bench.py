"""`make bench QUICK=1` runs and says something well formed; the numbers are the bench's job."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import client, hardened_echo, locks, peer_client, report
from bench.servers import compile_c
from support import EVENTUALLY, ROOT, FaultyEcho, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_quick_bench_prints_and_saves_a_well_formed_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--rounds",
            "2",  # two, so that the interleaving rotates once
            "--seconds",
            "0.5",
            "--json",
            str(tmp_path / "bench.json"),
            "--chart",
            str(tmp_path / "bench.png"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    servers = [
        "executor/ready",
        "executor/connection",
        "executor/ready/no-linger",
        "queue/ready",
        "queue/connection",
        "queue/ready/no-linger",
        "threads",
        "asyncio",
        "uvloop-streams",
        "uvloop-protocol",
    ]
    if shutil.which("cc") or shutil.which("gcc"):
        servers.append("c-epoll")
    assert report["throughput"]["servers"] == servers
    (config,) = report["throughput"]["configs"].values()
    for server in servers:
        rounds = config[server]
        assert len(rounds) == 2
        assert all(r["completions"] > 0 and r["errors"] == 0 for r in rounds), (server, rounds)
        assert all(r["server_cpu_us"] > 0 and r["client_cpu_us"] > 0 for r in rounds), rounds
        if server != "threads":  # whose threads end, with their counts, inside the window
            assert all(r["switches_per_request"] >= 0 for r in rounds), rounds
        else:
            assert all("switches_per_request" not in r for r in rounds), rounds
    for pool in ("executor/connection", "queue/connection"):  # a thread wakes per round trip
        assert all(r["switches_per_request"] >= 0.5 for r in config[pool]), config[pool]
    native = bool(shutil.which("cc") or shutil.which("gcc"))
    assert report["throughput"]["client"] == ("c-epoll" if native else "python")
    assert "vs uvloop streams" in result.stdout and "vs C epoll" in result.stdout
    if native:
        assert "client: " in result.stdout and "round trips/s on 1 process(es)" in result.stdout
    idle = {row["server"]: row for row in report["idle_costs"]}
    assert set(idle) == {"executor", "queue", "threads 64 KiB", "threads default"}
    assert idle["threads 64 KiB"]["threads_after"] >= idle["threads 64 KiB"]["connections"]
    small, default = report["capacity_under_as_limit"]
    assert small["held"] > default["held"] > 0
    assert {row["strategy"] for row in report["locks"]} >= {"SharedCounter (Lock)", "unlocked +="}
    burst = report["burst"]
    assert len(burst["stock_seconds"]) == len(burst["prompt_seconds"]) == len(burst["ratios"]) == 2
    assert all(seconds > 0 for seconds in burst["stock_seconds"] + burst["prompt_seconds"])
    assert "burst of 64 jobs to idle workers" in result.stdout


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, task.read_text().split()):
                found |= {child, *_descendants(child)}
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_bench_stopped_by_sigterm_stops_every_server_it_started(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--json", str(tmp_path / "b.json")],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert bench.stderr is not None
    with bench:
        deadline = time.monotonic() + 120
        while "round 1/" not in bench.stderr.readline():  # every server is up
            assert time.monotonic() < deadline and bench.poll() is None
        started = _descendants(bench.pid)
        assert len(started) >= 10  # the servers, and the client of the moment
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(EVENTUALLY) == 128 + signal.SIGTERM
    wait_until(lambda: all(map(_gone, started)), what="every server the bench started to end")


def test_locked_counters_lose_nothing() -> None:
    for result in locks.run(40_000, thread_counts=(4,)):
        if result.strategy != "unlocked +=":
            assert result.lost == 0, result
        assert result.ops_per_second > 0


@pytest.mark.parametrize("native", [True, False], ids=["c-client", "python-client"])
def test_client_counts_round_trips_and_every_wrong_or_cut_echo(native: bool) -> None:
    binary = compile_c("pingpong") if native else None
    if native and binary is None:
        pytest.skip("no C compiler")
    for fault, expect_errors in (("none", False), ("flip", True), ("close", True)):
        with FaultyEcho(fault) as server:
            result = client.run(
                server.address, connections=4, size=3000, duration=0.5, processes=2, binary=binary
            )
        if expect_errors:  # every connection fails on its first echo
            assert (result.completions, result.errors) == (0, 4), (fault, result)
        else:
            assert result.completions > 4 and result.errors == 0, result
            assert 0 < result.p50_ms <= result.p99_ms <= result.p999_ms


def test_peer_client_counts_its_messages_and_fails_on_a_cut_or_silent_echo() -> None:
    with FaultyEcho("none") as server:
        result = peer_client.run(
            server.address, connections=3, size=1000, messages=40, timeout=EVENTUALLY
        )
    assert result.messages == 120 and result.rate > 0 and result.client_cpu_us > 0, result
    # The script itself would print a full count for both: its jobs' failures go unseen.
    with FaultyEcho("close") as server, pytest.raises(peer_client.PeerClientError, match="a con"):
        peer_client.run(server.address, connections=2, size=1000, messages=5, timeout=EVENTUALLY)
    with FaultyEcho("silent") as server, pytest.raises(peer_client.PeerClientError, match="over"):
        peer_client.run(server.address, connections=2, size=1000, messages=5, timeout=2)


def test_the_peer_client_is_the_copy_its_readme_names() -> None:
    readme = (ROOT / "bench" / "peer" / "README.md").read_text()
    digest = hashlib.sha256(peer_client.SCRIPT.read_bytes()).hexdigest()
    assert f"| file sha256 | `{digest}` |" in readme


def test_the_peer_table_pairs_each_round_with_the_references_of_that_round() -> None:
    def rounds(*rates: float, cpu: float = 10.0) -> list[dict[str, float]]:
        return [
            {"rate": r, "server_cpu_us": cpu, "client_cpu_us": 20.0, "messages": 640} for r in rates
        ]

    per_server = {
        "executor/ready": rounds(50, 90, 60, cpu=15.0),
        "uvloop-streams": rounds(100, 100, 50),
        "uvloop-protocol": rounds(100, 100, 100, cpu=10.0),
        "c-epoll": rounds(200, 100, 100),
    }
    table = report.format_peer({"peer_client": {"32 conn x 1 KiB": per_server}, "client_cpus": [0]})
    row = next(line for line in table.splitlines() if "executor/ready" in line)
    # vs uvloop streams: 0.5, 0.9, 1.2 per round; vs C: 0.25, 0.9, 0.6; CPU 1.5 each round
    assert row.split()[4:] == [
        "0.90x",
        "(0.50-1.20)",
        "0.60x",
        "(0.25-0.90)",
        "1.50x",
        "(1.50-1.50)",
    ]
    assert "640 messages a run" in table
    assert "at most 50000 round trips/s on 1 CPU(s): 500.0x what the C server took" in table


def test_c_client_refuses_bad_arguments() -> None:
    binary = compile_c("pingpong")
    if binary is None:
        pytest.skip("no C compiler")
    result = subprocess.run(
        [str(binary), "127.0.0.1", "1", "0", "10", "1", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "pingpong: bad arguments"


def test_the_hardened_asyncio_peer_echoes_and_closes_the_idle_and_the_over_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `bench.hardened_echo` adds to the naive peer, each measured by a flood."""
    monkeypatch.setattr(hardened_echo, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(hardened_echo, "MAX_CONNECTIONS", 2)

    async def scenario() -> tuple[bytes, bytes, bytes, float]:
        server = await asyncio.start_server(hardened_echo.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            one = await asyncio.open_connection("127.0.0.1", port)
            two = await asyncio.open_connection("127.0.0.1", port)
            one[1].write(b"ping")
            echoed = await asyncio.wait_for(one[0].readexactly(4), EVENTUALLY)
            over = await asyncio.open_connection("127.0.0.1", port)  # the third: refused
            refused = await asyncio.wait_for(over[0].read(), EVENTUALLY)
            started = time.monotonic()
            idle = await asyncio.wait_for(two[0].read(), EVENTUALLY)  # closed by the timeout
            waited = time.monotonic() - started
            for _, writer in (one, two, over):
                writer.close()
                await writer.wait_closed()
        return echoed, refused, idle, waited

    echoed, refused, idle, waited = asyncio.run(scenario())
    assert (echoed, refused, idle) == (b"ping", b"", b"")
    assert waited < EVENTUALLY  # closed by its idle timeout, not by the test's deadline
