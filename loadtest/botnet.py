"""A botnet against a container: the attack split over containers of its own.

Locally a botnet binds its connections to 127.0.0.2 onwards; a container's own
address is not reachable from those. So against a container the attack runs from
`plan.sources` containers of the locust image (which carries `loadtest`) on the
target's network, each with the address Docker gives it and a share of the
connections and of the rate (`python -m loadtest.attacker`). The server sees that
many sources, none of them this host. The flood watches it like an `Attack`:
`counts()` adds up the members' latest reports.

Each member is bounded like the stack's containers (memory, pids, no capabilities,
read-only) and by its plan's duration; it ends when its standard input closes, and
every member left is removed by name when the botnet ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
from dataclasses import fields, replace
from typing import IO

from loadtest.attacker import plan_to_json
from loadtest.attacks import AttackCounts, AttackPlan, AttackRefused
from loadtest.containers import docker_output

# The image compose.yaml builds for locust: it carries `loadtest` (tests/test_compose.py
# checks the two names agree).
ATTACKER_IMAGE = "echo-cluster/locust:latest"
BOTNET_CONTAINERS = 8
START_GRACE = 60.0  # seconds for the members' containers to start, past the attack's
STOP_GRACE = 15.0  # seconds for a member to close its sockets and report once stdin closes
MEMBER_LIMITS = ("--memory", "256m", "--pids-limit", "64", "--cpus", "1")
# Counts that add up over members; `planned` is the whole plan's, `peak_open` is watched.
_SUMMED = [
    f.name
    for f in fields(AttackCounts)
    if f.type == "int" and f.name not in ("planned", "peak_open")
]


def check_attacker_image() -> None:
    try:
        docker_output("image", "inspect", "--format", "{{.Id}}", ATTACKER_IMAGE)
    except AttackRefused:
        raise AttackRefused(
            f"a botnet against a container runs from the image {ATTACKER_IMAGE} (make images)"
        ) from None


def member_plans(plan: AttackPlan) -> list[AttackPlan]:
    """The plan split over `plan.sources` members: connections and rate shared out,
    each member one source."""
    members = plan.sources
    share, extra = divmod(plan.connections, members)
    return [
        replace(plan, connections=share + (i < extra), rate=plan.rate / members, sources=1)
        for i in range(members)
        if share + (i < extra) > 0
    ]


def added_up(reports: list[AttackCounts], planned: int, peak_open: int) -> AttackCounts:
    """One botnet's counts from its members' latest reports. Percentiles cannot be
    added: the connect p50 is the members' median, the p99 their worst."""
    total = AttackCounts(planned=planned, peak_open=peak_open)
    for name in _SUMMED:
        setattr(total, name, sum(getattr(r, name) for r in reports))
    for report in reports:
        for error, count in report.errors.items():
            total.errors[error] = total.errors.get(error, 0) + count
    if reports:
        total.connect_p50_ms = statistics.median(r.connect_p50_ms for r in reports)
        total.connect_p99_ms = max(r.connect_p99_ms for r in reports)
    return total


class ContainerBotnet(threading.Thread):
    """Runs `plan` from `plan.sources` containers on `network` until its duration ends
    or `stop()`; then every member is gone."""

    def __init__(self, plan: AttackPlan, network: str) -> None:
        if not plan.container or plan.from_loopback_sources:
            raise AttackRefused(f"{plan.scenario}: a container botnet needs a container target")
        super().__init__(name=f"botnet-{plan.scenario}", daemon=True)
        self.plan = plan
        self._network = network
        self._plans = member_plans(plan)
        self._names = [f"echo-botnet-{os.getpid()}-{i}" for i in range(len(self._plans))]
        self._reports = [AttackCounts() for _ in self._plans]
        self._peak_open = 0
        self._failures: list[str] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def counts(self) -> AttackCounts:
        with self._lock:
            total = added_up(self._reports, self.plan.target_count, self._peak_open)
            for failure in self._failures:
                total.errors[failure] = total.errors.get(failure, 0) + 1
        return total

    def stop(self) -> None:
        self._stop_event.set()

    def failures(self) -> list[str]:
        with self._lock:
            return list(self._failures)

    def run(self) -> None:
        members: list[subprocess.Popen[str]] = []
        readers: list[threading.Thread] = []
        try:
            for index, plan in enumerate(self._plans):
                member = subprocess.Popen(  # noqa: S603 (docker, fixed arguments and the plan)
                    self._command(self._names[index], plan),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                members.append(member)
                reader = threading.Thread(target=self._read, args=(index, member), daemon=True)
                reader.start()
                readers.append(reader)
            deadline = time.monotonic() + self.plan.duration + START_GRACE
            while time.monotonic() < deadline and any(m.poll() is None for m in members):
                if self._stop_event.wait(0.1):
                    break
        finally:
            self._end(members, readers)

    def _command(self, name: str, plan: AttackPlan) -> list[str]:
        return [
            "docker", "run", "--rm", "-i", "--name", name, "--network", self._network,
            *MEMBER_LIMITS, "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true",
            "--ulimit", f"nofile={plan.target_count + 256}",
            "--entrypoint", "python3", ATTACKER_IMAGE, "-m", "loadtest.attacker",
            plan_to_json(plan),
        ]  # fmt: skip

    def _read(self, index: int, member: subprocess.Popen[str]) -> None:
        for line in member.stdout or ():
            try:
                report = AttackCounts(**json.loads(line))
            except (ValueError, TypeError):
                continue  # not a report: a member prints nothing else on stdout
            with self._lock:
                self._reports[index] = report
                self._peak_open = max(self._peak_open, sum(r.open_now for r in self._reports))

    def _end(self, members: list[subprocess.Popen[str]], readers: list[threading.Thread]) -> None:
        for member in members:
            _close(member.stdin)
        for member, name in zip(members, self._names, strict=False):
            try:
                code = member.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                code = None
            if code:  # 0: done; None: removed below
                error = (_drain(member.stderr).strip().splitlines() or [f"exit {code}"])[-1]
                with self._lock:
                    self._failures.append(f"member {name}: {error}")
        with contextlib.suppress(AttackRefused):  # none left is the common case
            docker_output("rm", "-f", *self._names)
        for member in members:
            if member.poll() is None:
                member.kill()
            member.wait()
        for reader in readers:
            reader.join(STOP_GRACE)  # each ends at its member's end of output
        for member in members:
            _close(member.stdout)
            _close(member.stderr)


def _close(stream: IO[str] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


def _drain(stream: IO[str] | None) -> str:
    if stream is None:
        return ""
    with contextlib.suppress(OSError, ValueError):
        return stream.read()
    return ""
