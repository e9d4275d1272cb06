"""A botnet against a container: its plan shared out over members, their reports added up,
each member a process that reports and ends with its input. Against real containers:
tests/test_compose.py::test_a_botnet_at_a_container_comes_from_containers_of_its_own."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest
import yaml

from loadtest.attacker import main, plan_from_json, plan_to_json
from loadtest.attacks import AttackCounts, AttackPlan, AttackRefused
from loadtest.botnet import (
    ATTACKER_IMAGE,
    ContainerBotnet,
    added_up,
    check_attacker_image,
    member_plans,
)
from support import EVENTUALLY, ROOT, wait_until

BOXED = ("172.18.0.2", 15001)


def test_a_botnets_plan_is_shared_out_over_its_members() -> None:
    plan = AttackPlan("botnet", BOXED, connections=83, rate=800.0, sources=8, container=True)
    members = member_plans(plan)
    assert [m.connections for m in members] == [11, 11, 11, 10, 10, 10, 10, 10]
    assert {(m.rate, m.sources, m.container, m.address) for m in members} == {
        (100.0, 1, True, BOXED)
    }
    few = AttackPlan("botnet", BOXED, connections=3, sources=8, container=True)
    assert [m.connections for m in member_plans(few)] == [1, 1, 1]  # no member with nothing


def test_a_botnets_counts_add_up_its_members_latest_reports() -> None:
    one = AttackCounts(planned=5, opened=7, open_now=5, peak_open=5, connect_failures=1,
                       closed_by_server=2, replaced=2, bytes_sent=30, connect_p50_ms=1.0,
                       connect_p99_ms=9.0, errors={"ECONNRESET": 1})  # fmt: skip
    two = AttackCounts(planned=5, opened=5, open_now=4, peak_open=5, bytes_sent=10,
                       connect_p50_ms=3.0, connect_p99_ms=4.0, errors={"ECONNRESET": 2,
                       "ETIMEDOUT": 1})  # fmt: skip
    total = added_up([one, two, AttackCounts()], planned=10, peak_open=10)
    assert (total.planned, total.peak_open, total.opened, total.open_now) == (10, 10, 12, 9)
    assert (total.connect_failures, total.closed_by_server, total.replaced) == (1, 2, 2)
    assert total.bytes_sent == 40 and total.errors == {"ECONNRESET": 3, "ETIMEDOUT": 1}
    assert (total.connect_p50_ms, total.connect_p99_ms) == (1.0, 9.0)  # median, worst


def test_a_plan_goes_to_a_member_as_json_and_comes_back_the_same() -> None:
    plan = AttackPlan("fd-squeeze", BOXED, connections=9, side_address=("172.18.0.2", 9101),
                      side_connections=3, container=True)  # fmt: skip
    assert plan_from_json(plan_to_json(plan)) == plan


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not JSON"),
        ('{"address": ["127.0.0.1", 1]}', "a JSON object with a scenario"),
        ('{"scenario": "idle", "address": ["127.0.0.1", 1], "bogus": 1}', "fields of"),
        ('{"scenario": "idle", "address": "127.0.0.1:1"}', "address is \\[host, port\\]"),
        ('{"scenario": "idle", "address": ["127.0.0.1", 0]}', "address is \\[host, port\\]"),
        ('{"scenario": "idle", "address": ["8.8.8.8", 1]}', "loopback addresses only"),
        ('{"scenario": "nope", "address": ["127.0.0.1", 1]}', "choose from"),
    ],
)
def test_a_bad_plan_is_refused_in_one_line_with_exit_2(
    text: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AttackRefused, match=says):
        plan_from_json(text)
    assert main([text], out=io.StringIO(), stdin=io.StringIO()) == 2
    error = capsys.readouterr().err
    assert error.startswith("loadtest.attacker: ") and error.count("\n") == 1


def test_a_member_reports_while_it_attacks_and_ends_when_its_input_closes() -> None:
    read_end, write_end = os.pipe()
    out = io.StringIO()
    codes: list[int] = []
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        plan = AttackPlan("idle", listener.getsockname(), connections=5, duration=60.0)
        with os.fdopen(read_end) as stdin:
            member = threading.Thread(target=lambda: codes.append(main([plan_to_json(plan)],
                                      out=out, stdin=stdin)))  # fmt: skip
            member.start()
            try:
                wait_until(lambda: '"open_now": 5' in out.getvalue(), EVENTUALLY, "5 held")
            finally:
                os.close(write_end)  # well before its 60 s are over
                member.join(EVENTUALLY)
    assert codes == [0]
    last = json.loads(out.getvalue().splitlines()[-1])
    assert (last["peak_open"], last["open_now"]) == (5, 0)  # closed them all at the end


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker` first on PATH that fails as Docker does without the image."""
    docker = tmp_path / "docker"
    docker.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "print(f'Unable to find image {sys.argv[-4]!r} locally', file=sys.stderr)\n"
        "sys.exit(125)\n"
    )
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return docker


def test_a_member_that_cannot_start_is_said_and_counted(fake_docker: Path) -> None:
    plan = AttackPlan("botnet", BOXED, connections=4, duration=5.0, sources=2, container=True)
    botnet = ContainerBotnet(plan, "echo-cluster_default")
    botnet.start()
    botnet.join(EVENTUALLY)
    assert not botnet.is_alive()
    failures = botnet.failures()
    assert len(failures) == 2 and all("Unable to find image" in f for f in failures), failures
    assert sum(botnet.counts().errors.values()) == 2 and botnet.counts().opened == 0


def test_a_botnet_without_its_image_is_refused_before_any_traffic(fake_docker: Path) -> None:
    with pytest.raises(AttackRefused, match="runs from the image echo-cluster/locust"):
        check_attacker_image()


def test_the_botnet_runs_from_the_image_compose_builds_for_locust() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["locust-master"]["image"] == ATTACKER_IMAGE
