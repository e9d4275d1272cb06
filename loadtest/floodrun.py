"""One flood run: attack a target, probe it and sample its metrics meanwhile, then judge it.

For each run: a baseline, the attack (which keeps its count, see
`loadtest.attacks`), a recovery watch, and a verdict (`loadtest.verdict`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.attacks import (
    AT_THE_CAP,
    BOTNET_SOURCES,
    Attack,
    AttackCounts,
    Attacker,
    AttackPlan,
    AttackRefused,
    ensure_descriptors,
)
from loadtest.botnet import BOTNET_CONTAINERS, ContainerBotnet
from loadtest.containers import main_pid
from loadtest.observe import (
    NOTHING_READ,
    Established,
    Exchange,
    Probe,
    ProbeResult,
    Reading,
    Sample,
    Sampler,
    echo_check,
    metrics_reader,
    process_reader,
    scrape_check,
)
from loadtest.verdict import DEFAULT_SETTLE, Limits, Summary, Timeline, judge_flood, recovered
from services.budget import METRICS_CLIENTS


@dataclass(frozen=True)
class Target:
    name: str
    address: tuple[str, int]
    metrics: tuple[str, int] | None  # None: a server with no /metrics (any echo server)
    container: bool = False  # the addresses are its container's own (loadtest.containers)
    network: str | None = None  # its container's network, where a botnet's containers join
    pid: int | None = None  # without metrics: its process, read in /proc (this host's view)
    box: str | None = None  # its container (container=NAME): whose next pid to follow

    @property
    def watched(self) -> str:
        """How its threads, memory and liveness are read: `WATCHED`."""
        return "metrics" if self.metrics else "process" if self.pid else "probes only"

    def reader(self) -> Callable[[], Reading]:
        if self.metrics is not None:
            return metrics_reader(self.metrics)
        if self.pid is not None:
            box = self.box
            return process_reader(self.pid, None if box is None else lambda: main_pid(box))
        return lambda: NOTHING_READ


# Scenarios that attack or fill the metrics port: not for a target without one.
NEED_METRICS = ("metrics-slowloris", "fd-squeeze")


def attacker_for(plan: AttackPlan, target: Target) -> Attacker:
    """The attack from this process, or a botnet against a container from containers."""
    if plan.sources > 1 and not plan.from_loopback_sources:
        if target.network is None:
            raise AttackRefused(f"{plan.scenario} at {target.name}: its container's network?")
        return ContainerBotnet(plan, target.network)
    return Attack(plan)


MAX_ESTABLISHED = 64
MAX_THINK = 30.0
# At the cap the attacker touches each connection this many times per established
# client's pause: always fresher than the honest clients.
STEER_TOUCHES = 3
# fd-squeeze: idle metrics clients past the endpoint's client cap, so that it holds all
# it may (and keeps pushing the oldest out for the rest).
SQUEEZE_BEYOND = 64


def botnet_sources(target: Target) -> int:
    """Loopback: 127.0.0.2 onwards; a container: containers of the botnet's own."""
    return BOTNET_CONTAINERS if target.container else BOTNET_SOURCES


@dataclass(frozen=True)
class RunSettings:
    connections: int = 1000
    rate: float = 1000.0
    duration: float = 20.0
    baseline: float = 2.0
    # Watched after the attack, at most: the verdict's recovery deadline + 1 s; the watch
    # ends sooner once the probe is served again (`verdict.recovered`).
    recovery: float = 6.0
    settle: float = DEFAULT_SETTLE
    trickle_interval: float = 2.0
    polite: bool = False
    established: int = 4  # legitimate clients that keep their connections
    think: float = 3.0  # seconds between an established client's messages
    limits: Limits = field(default_factory=Limits)

    def plan(self, scenario: str, target: Target, capacity: float = -1) -> AttackPlan:
        """The attack on `target`: its metrics port for metrics-slowloris, else its echo
        port. cap-steer and botnet hold more than the target's `capacity` (its connection
        cap, -1 for none) so that they sit at the cap throughout (a tenth more, at least
        20), touching each connection STEER_TOUCHES times per established client's
        pause; botnet from BOTNET_SOURCES addresses; fd-squeeze with idle clients of
        the metrics port past its client cap besides, so that the descriptors left for
        the echo port are as few as the server's budget allows."""
        if scenario in NEED_METRICS and target.metrics is None:
            raise AttackRefused(f"{scenario}: {target.name} has no metrics port to attack")
        connections, trickle = self.connections, self.trickle_interval
        if scenario in AT_THE_CAP:
            trickle = self.think / STEER_TOUCHES
            if capacity > 0:
                connections = max(connections, int(capacity) + max(int(capacity) // 10, 20))
        squeeze = scenario == "fd-squeeze"
        metrics = target.metrics or target.address  # (refused above where it matters)
        return AttackPlan(
            scenario=scenario,
            address=metrics if scenario == "metrics-slowloris" else target.address,
            connections=connections,
            rate=self.rate,
            duration=self.duration,
            trickle_interval=trickle,
            polite=self.polite,
            container=target.container,
            sources=botnet_sources(target) if scenario == "botnet" else 1,
            side_address=metrics if squeeze else None,
            side_connections=METRICS_CLIENTS + SQUEEZE_BEYOND if squeeze else 0,
        )

    def check(self) -> None:
        if self.settle >= self.duration:
            raise AttackRefused(
                f"settle: {self.settle:g} s is not shorter than the attack ({self.duration:g} s),"
                " so nothing would be judged under attack"
            )
        if self.recovery < self.limits.recovery_deadline:
            raise AttackRefused(
                f"recovery: watch at least {self.limits.recovery_deadline:g} s after the attack"
            )
        if not 0 <= self.established <= MAX_ESTABLISHED:
            raise AttackRefused(f"established: 0 to {MAX_ESTABLISHED} clients")
        if not 0 < self.think <= MAX_THINK:
            raise AttackRefused(f"think: more than 0, at most {MAX_THINK:g} s")


@dataclass(frozen=True)
class FloodRun:
    target: str
    scenario: str
    settings: RunSettings
    attack_start: float
    attack_end: float
    counts: AttackCounts
    summary: Summary
    samples: list[Sample]
    probes: list[ProbeResult]
    established: list[Exchange] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "settings": asdict(self.settings),
            "attack_start": self.attack_start,
            "attack_end": self.attack_end,
            "attack": asdict(self.counts),
            "summary": asdict(self.summary),
            "samples": [asdict(s) for s in self.samples],
            "probes": [asdict(p) for p in self.probes],
            "established": [asdict(e) for e in self.established],
        }


def probe_for(scenario: str, target: Target, origin: float) -> Probe:
    """What a legitimate user of the attacked port does: Prometheus scrapes /metrics
    every 0.5 s with a 2 s timeout; an echo client makes a round trip every 0.2 s."""
    if scenario == "metrics-slowloris" and target.metrics is not None:
        return Probe(scrape_check(target.metrics, timeout=2.0), origin, interval=0.5)
    return Probe(echo_check(target.address, timeout=2.0), origin, interval=0.2)


def flood(
    target: Target,
    scenario: str,
    settings: RunSettings,
    progress: Callable[[str], None] | None = None,
) -> FloodRun:
    """Run one scenario against one target and judge it. Blocks for the whole run."""
    settings.check()
    origin = time.monotonic()
    sampler = Sampler(target.reader(), origin)
    plan = settings.plan(scenario, target, sampler.scrape_once().values.get("capacity", -1))
    ensure_descriptors(plan.target_count)
    probe = probe_for(scenario, target, origin)
    established = Established(target.address, origin, settings.established, settings.think)
    attack = attacker_for(plan, target)
    sampler.start()
    probe.start()
    established.start()
    watch = _Watch(origin, target, scenario, attack, probe, sampler, progress)
    try:
        watch.wait(settings.baseline)
        attack_start = time.monotonic() - origin
        attack.start()
        watch.wait(settings.duration + 30, until=lambda: not attack.is_alive())
        attack.join()
        attack_end = time.monotonic() - origin
        watch.wait(settings.recovery, until=lambda: recovered(probe.results(), attack_end))
    finally:
        attack.stop()
        probe.stop()
        established.stop()
        sampler.stop()
        for thread in (attack, probe, established, sampler):
            if thread.is_alive():
                thread.join(30)
    timeline = Timeline(attack_start, attack_end, time.monotonic() - origin, settings.settle)
    samples, probes, exchanges = sampler.samples(), probe.results(), established.results()
    summary = judge_flood(
        samples, probes, timeline, settings.limits, exchanges, watched=target.watched
    )
    return FloodRun(
        target.name,
        scenario,
        settings,
        attack_start,
        attack_end,
        attack.counts(),
        summary,
        samples,
        probes,
        exchanges,
    )


@dataclass
class _Watch:
    """Waits through the phases of a run, reporting progress about once a second."""

    origin: float
    target: Target
    scenario: str
    attack: Attacker
    probe: Probe
    sampler: Sampler
    progress: Callable[[str], None] | None

    def wait(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + seconds
        said = 0.0
        while time.monotonic() < deadline and not until():
            if self.progress is not None and time.monotonic() - said >= 1.0:
                self.progress(self.line())
                said = time.monotonic()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def line(self) -> str:
        now = time.monotonic() - self.origin
        counts = self.attack.counts()
        recent = [p for p in self.probe.results() if p.at > now - 5]
        probe_text = f"{sum(p.ok for p in recent) / len(recent):4.0%}" if recent else "  - "
        sample = next((s for s in reversed(self.sampler.samples()) if s.ok), None)
        if sample:
            threads, rss = sample.values.get("threads", 0), sample.values.get("rss_bytes", 0)
            server = f"threads {threads:5.0f}  rss {rss / 2**20:6.1f} MiB"
        else:
            server = "metrics unreachable"
        return (
            f"[{self.scenario} -> {self.target.name}] {now:5.1f}s  open {counts.open_now:5d}  "
            f"replaced {counts.replaced:6d}  refused {counts.connect_failures:5d}  connect "
            f"p50/p99 {counts.connect_p50_ms:.0f}/{counts.connect_p99_ms:.0f} ms  "
            f"probe ok (5 s) {probe_text}  {server}"
        )
