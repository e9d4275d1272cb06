"""The container stack: healthy, echoing on its published ports, scraped, self-healing, removable.

Needs a Docker Engine. Without one these tests skip, except under CI=true where a
missing engine is a failure: CI must not pass by testing less.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness.dashboard import PAGE, Expression, expressions, page_url
from loadtest.attacks import AT_THE_CAP, SCENARIOS, AttackPlan
from loadtest.botnet import BOTNET_CONTAINERS, ContainerBotnet
from loadtest.containers import container_address, container_network
from loadtest.flood import RunSettings, Target
from loadtest.peers import PEER_PORTS
from services.models import MODELS
from support import (
    EVENTUALLY,
    ROOT,
    UNBOUNDED_BREAKERS,
    Flooder,
    assert_landed,
    echo_once,
    ready_holds,
    wait_until,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

PROJECT = "echo-cluster"
PORTS = {name: spec.port for name, spec in MODELS.items()}
PAGE_URL = page_url()
BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # as the Makefile's BROWSER


def run(*command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def engine_answers() -> bool:
    try:
        return run("docker", "info", timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[None]:
    if not engine_answers():
        message = "no Docker Engine answers (docker info failed)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the compose tests")
        pytest.skip(message)
    try:
        up = run("make", "--no-print-directory", "up")
        if up.returncode != 0:
            print(up.stdout, up.stderr, run("make", "--no-print-directory", "logs").stdout)
            pytest.fail(f"make up failed:\n{up.stderr[-3000:]}")
        yield
    except BaseException:
        print(run("make", "--no-print-directory", "logs").stdout)
        raise
    finally:
        run("make", "--no-print-directory", "down")


def prometheus(path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:9090{path}{query}", timeout=10) as response:
        return json.load(response)


def instant(promql: str) -> dict[str, float]:
    """Evaluate `promql`; {model label: value}."""
    result = prometheus("/api/v1/query", query=promql)["data"]["result"]
    return {series["metric"].get("model", ""): float(series["value"][1]) for series in result}


def container(service: str) -> str:
    ids = run(
        "docker",
        "ps",
        "-aq",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    ).stdout.split()
    assert len(ids) == 1, ids
    return ids[0]


def inspect(service: str, template: str) -> str:
    return run("docker", "inspect", "--format", template, container(service)).stdout.strip()


def test_every_service_is_healthy_and_echoes_on_its_published_port(stack: None) -> None:
    for service in (*PORTS, "prometheus"):
        assert inspect(service, "{{.State.Health.Status}}") == "healthy"
    payload = os.urandom(300_000)
    for port in PORTS.values():
        assert echo_once(("127.0.0.1", port), payload) == payload


def test_make_images_with_nothing_changed_builds_nothing_and_asks_no_registry(
    stack: None,
) -> None:
    # `make up` built or found the images a moment ago; their inputs have not changed.
    again = run("make", "--no-print-directory", "images")
    assert again.returncode == 0, again.stderr
    assert "nothing to build" in again.stdout, again.stdout
    assert "docker build" not in again.stdout and "cannot be had" not in again.stderr


def test_published_ports_listen_on_loopback_only(stack: None) -> None:
    for service in (*PORTS, "prometheus"):
        bindings = json.loads(inspect(service, "{{json .HostConfig.PortBindings}}"))
        hosts = {binding["HostIp"] for entries in bindings.values() for binding in entries}
        assert hosts == {"127.0.0.1"}, (service, bindings)


def test_containers_run_hardened_and_limited(stack: None) -> None:
    for service in (*PORTS, "prometheus"):
        host = json.loads(inspect(service, "{{json .HostConfig}}"))
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["Memory"] > 0 and host["PidsLimit"] > 0 and host["NanoCpus"] > 0
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert inspect(service, "{{.Config.User}}") not in ("", "0", "root")


def test_prometheus_scrapes_all_three_and_sees_traffic(stack: None) -> None:
    def all_up() -> bool:
        targets = prometheus("/api/v1/targets")["data"]["activeTargets"]
        up = {t["labels"].get("model") for t in targets if t["health"] == "up"}
        return set(PORTS) <= up

    wait_until(all_up, timeout=60, what="Prometheus to see all three targets up")
    query = "echo_connections_accepted_total"
    wait_until(lambda: set(PORTS) <= set(instant(query)), timeout=60, what="a first scrape")
    before = instant(query)
    for port in PORTS.values():
        for _ in range(5):
            assert echo_once(("127.0.0.1", port), b"counted") == b"counted"
    wait_until(
        lambda: all(instant(query).get(m, 0) >= before[m] + 5 for m in PORTS),
        timeout=60,
        what="Prometheus to record 5 more connections on each server",
    )


def test_a_crashed_server_is_restarted_and_scraped_again(stack: None) -> None:
    # `docker kill` counts as a deliberate stop, which no restart policy undoes; a
    # crash is the process dying under Docker, as an OOM kill or a watchdog exit.
    restarts = int(inspect("threads", "{{.RestartCount}}"))
    pid = inspect("threads", "{{.State.Pid}}")
    killed_at = time.time()
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]  # the process is another user's
    assert run(*as_root, "kill", "-KILL", pid).returncode == 0
    wait_until(
        lambda: int(inspect("threads", "{{.RestartCount}}")) == restarts + 1,
        timeout=60,
        what="the restart policy to restart threads",
    )
    wait_until(
        lambda: inspect("threads", "{{.State.Health.Status}}") == "healthy",
        timeout=180,
        what="the restarted threads server to be healthy",
    )
    assert echo_once(("127.0.0.1", PORTS["threads"]), b"back") == b"back"
    wait_until(
        lambda: (
            instant('process_start_time_seconds{model="threads"}').get("threads", 0) > killed_at - 1
        ),
        timeout=60,
        what="Prometheus to scrape the new threads process",
    )
    assert instant('up{model="threads"}') == {"threads": 1.0}


def test_promtool_accepts_the_config_and_rules(stack: None) -> None:
    for check in (
        ("check", "config", "/etc/echo-cluster/prometheus.yml"),
        ("check", "rules", "/etc/echo-cluster/rules.yml"),
        # Series in, alerts out: the alerts fire when they should and only then.
        ("test", "rules", "/etc/echo-cluster/rules_test.yml"),
    ):
        result = run(
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "promtool",
            "echo-cluster/prometheus:latest",
            *check,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.flood
def test_reconnecting_floods_the_ready_pools_hold_and_threads_does_not(
    stack: None, flooder: Flooder
) -> None:
    """Against the containers (128 MiB, 256 pids, 0.5 CPU each), attackers that replace
    every connection the server drops: the pools, parking waiting connections, hold
    every scenario; the thread-per-connection control runs into its pid limit."""
    restarts = {service: int(inspect(service, "{{.RestartCount}}")) for service in PORTS}
    started = time.time()
    # Judged from 3 s into a 9 s attack: 1,000 connections land in 1 s at the default
    # rate; the window holds 30 echo probes (12 scrapes), so one failure breaks 99%.
    settings = RunSettings(connections=1000, duration=9.0, baseline=1.0, settle=3.0)
    runs = {}
    # cap-steer and botnet size themselves past the cap (10,000 here), and a botnet's
    # 127.0.0.x sources cannot reach a container: local floods' (test_flood).
    for scenario in (s for s in SCENARIOS if s not in AT_THE_CAP):
        for service, port in PORTS.items():
            if not MODELS[service].bounded and scenario not in UNBOUNDED_BREAKERS:
                continue
            # At the container's own address: through the published port, Docker's port
            # proxy is what gives way under churn (docs/floods.md).
            address = container_address(PROJECT, service)
            assert address is not None, f"no container of {service}"
            target = Target(
                service, (address, port), (address, MODELS[service].metrics_port), container=True
            )
            runs[scenario, service] = flooder(target, scenario, settings)
    ended = time.time()
    for (scenario, service), run in runs.items():
        summary = run.summary
        if not MODELS[service].bounded:
            assert run.counts.opened >= 0.9 * settings.connections, (scenario, run.counts)
            assert summary.verdict != "held", (scenario, service, summary)
            continue
        # The containers' timeouts are 10 s, longer than the attack: only churn and the
        # metrics endpoint's client cap cut attackers within it.
        cut = scenario in ("churn", "metrics-slowloris")
        assert_landed(run, held=ready_holds(scenario, settings.connections), cut=cut)
        assert int(inspect(service, "{{.RestartCount}}")) == restarts[service]
        assert summary.verdict == "held", (scenario, service, summary.reasons, run.counts)
    restarted = int(inspect("threads", "{{.RestartCount}}")) > restarts["threads"]
    idle = runs["idle", "threads"].summary
    assert idle.thread_start_failures > 0 or restarted, idle

    # Prometheus kept both outcomes: a range query over the flood window.
    def peak(promql: str) -> dict[str, float]:
        result = prometheus(
            "/api/v1/query_range", query=promql, start=str(started), end=str(ended), step="2"
        )["data"]["result"]
        return {
            series["metric"].get("model", ""): max(float(v) for _, v in series["values"])
            for series in result
        }

    def scraped_since(moment: float) -> bool:
        result = prometheus("/api/v1/query", query='min(timestamp(up{job="echo"}))')["data"]
        return bool(result["result"]) and float(result["result"][0]["value"][1]) > moment

    wait_until(lambda: scraped_since(ended), what="every target scraped after the floods")
    threads_seen = peak("echo_threads")
    assert threads_seen["executor"] < 60 and threads_seen["queue"] < 60, threads_seen
    assert threads_seen["threads"] > 200, threads_seen
    waiting = peak('echo_connections{state="waiting"}')
    assert waiting["executor"] >= 500 and waiting["queue"] >= 500, waiting
    if not restarted:
        assert peak("echo_thread_start_failures_total")["threads"] > 0


UNPULLABLE = "echo-cluster.invalid/unpullable:never"


def test_a_botnet_at_a_container_comes_from_containers_of_its_own(stack: None) -> None:
    address, network = container_address(PROJECT, "queue"), container_network(PROJECT, "queue")
    assert address is not None and network is not None
    plan = AttackPlan("botnet", (address, PORTS["queue"]), connections=80, rate=400.0,
                      duration=60.0, sources=BOTNET_CONTAINERS, container=True)  # fmt: skip
    botnet = ContainerBotnet(plan, network)
    botnet.start()
    try:
        wait_until(lambda: botnet.counts().open_now == 80, EVENTUALLY, "the botnet holds 80")
        peers = peers_of("queue", PORTS["queue"])
    finally:
        botnet.stop()
        botnet.join(EVENTUALLY)
    assert not botnet.is_alive() and botnet.failures() == []
    assert sum(peers.values()) == 80, peers  # as the server sees them: 8 sources, 10 each
    assert len(peers) == BOTNET_CONTAINERS and set(peers.values()) == {10}, peers
    left = run("docker", "ps", "-aq", "--filter", "name=echo-botnet-").stdout.split()
    assert left == [], "a botnet member outlived the botnet"


def peers_of(service: str, port: int) -> dict[str, int]:
    """{remote address: established connections} to `port`, from the container's own
    /proc/net/tcp: what the server sees, Docker's NAT and proxies included."""
    table = run("docker", "exec", container(service), "cat", "/proc/net/tcp").stdout
    peers: dict[str, int] = {}
    for row in table.splitlines()[1:]:
        local, remote, state = row.split()[1:4]
        if state == "01" and int(local.split(":")[1], 16) == port:  # 01: ESTABLISHED
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(remote.split(":")[0])))
            peers[ip] = peers.get(ip, 0) + 1
    return peers


def test_make_up_builds_on_debian_bases_when_a_base_image_cannot_be_had(stack: None) -> None:
    up = run("make", "--no-print-directory", "up", f"PYTHON_IMAGE={UNPULLABLE}")
    assert up.returncode == 0, up.stderr[-3000:]
    said = [line for line in up.stderr.splitlines() if UNPULLABLE in line]
    assert said == [
        f"make images: {UNPULLABLE} cannot be had here (no registry answers); building the "
        "base images from Debian's packages instead (OFFLINE=1)"
    ], up.stderr
    assert "the three models side by side" in up.stdout


def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The compose command as the Makefile chooses it: v2's plugin, else docker-compose."""
    v2 = run("docker", "compose", "version", timeout=60).returncode == 0
    return run(*(("docker", "compose") if v2 else ("docker-compose",)), "-p", PROJECT, *args,
               timeout=timeout)  # fmt: skip


def echoes(address: tuple[str, int]) -> bool:
    try:
        return echo_once(address, b"peer", timeout=5.0) == b"peer"
    except OSError:  # not listening yet
        return False


def test_the_peers_profile_echoes_at_each_peers_own_address_with_the_models_limits(
    stack: None,
) -> None:
    """What make flood-peers-containers floods: the tools image runs every peer."""
    services = [f"peer-{name}" for name in PEER_PORTS]
    try:
        up = compose("--profile", "peers", "up", "-d", "--no-build", *services)
        assert up.returncode == 0, up.stderr[-3000:]
        for name, port in PEER_PORTS.items():
            address = container_address(PROJECT, f"peer-{name}")
            assert address is not None, name
            wait_until(partial(echoes, (address, port)), EVENTUALLY, f"{name} echoes")
            host = json.loads(inspect(f"peer-{name}", "{{json .HostConfig}}"))
            assert (host["Memory"], host["PidsLimit"], host["NanoCpus"]) == (
                128 * 2**20, 256, 500_000_000,
            ), name  # fmt: skip
            assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"], name
    finally:
        compose("--profile", "peers", "rm", "-fsv", *services)
    left = run("docker", "ps", "-aq", "--filter", "name=peer-").stdout.split()
    assert left == []


def test_the_load_profile_drives_all_three_from_two_workers_in_containers(
    stack: None, tmp_path: Path
) -> None:
    started = time.time()
    result = run(
        "make", "--no-print-directory", "load-cluster", "WORKERS=2", "USERS=30",
        "DURATION=15s", f"REPORTS={tmp_path}", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "load-summary.json").read_text())
    assert summary["ok"] is True, summary["reasons"]
    assert summary["workers"] == 2 and summary["workers_with_requests"] == 2, summary
    rows = {row["service"]: row for row in summary["services"]}
    assert set(rows) == set(PORTS)
    assert all(row["echoes"] > 0 and not row["failures"] for row in rows.values()), rows
    assert (tmp_path / "load.html").exists()
    assert "2 load process(es)" in result.stdout
    # Prometheus scraped the master while it ran: offered load per model, beside served.
    window = f"{int(time.time() - started) + 10}s"
    offered = instant(f"max_over_time(model:echo_load_requests:rate1m[{window}])")
    assert set(offered) >= set(PORTS) and all(v > 0 for v in offered.values()), offered
    # Nothing of the profile is left.
    for service in ("locust-master", "locust-worker"):
        label = f"label=com.docker.compose.service={service}"
        assert run("docker", "ps", "-aq", "--filter", label).stdout.split() == []
    volumes = run("docker", "volume", "ls", "-q").stdout.split()
    assert f"{PROJECT}_load-reports" not in volumes


def test_the_load_web_ui_runs_with_its_workers_until_interrupted(stack: None) -> None:
    ui = subprocess.Popen(
        ["make", "--no-print-directory", "load-cluster-ui", "WORKERS=1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the whole group, as in a terminal
    )
    try:

        def workers_connected() -> int:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8089/stats/requests", timeout=5) as r:
                    return int(json.load(r).get("worker_count", 0))
            except OSError:
                return 0

        wait_until(lambda: workers_connected() == 1, timeout=120, what="the UI and its worker")
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        output, _ = ui.communicate(timeout=120)
    assert "1 workers connected" in output, output[-3000:]

    def load_containers() -> list[str]:
        labels = [
            f"label=com.docker.compose.service={s}" for s in ("locust-master", "locust-worker")
        ]
        return [
            c
            for label in labels
            for c in run("docker", "ps", "-aq", "--filter", label).stdout.split()
        ]

    # Ctrl-C ends make at once; the script's clean-up finishes just after.
    wait_until(lambda: not load_containers(), timeout=60, what="the load containers to go")


def test_the_page_shows_every_expression_for_all_three_models(stack: None) -> None:
    page = run("make", "--no-print-directory", "page")
    assert page.returncode == 0, page.stderr
    assert page.stdout == f"{PAGE_URL}\n"
    with urllib.request.urlopen(PAGE_URL, timeout=30) as response:  # noqa: S310 (http, ours)
        assert response.status == 200
        served = expressions(response.read().decode())
    assert served == expressions(PAGE.read_text())  # the image serves this checkout's page
    bounded = {name for name in PORTS if name != "threads"}
    for expression in served:

        def shown(expression: Expression = expression) -> bool:
            # What the page's 15 minutes hold (offered load: the load tests above).
            query = f"max_over_time(({expression.expr})[15m:])"
            result = prometheus("/api/v1/query", query=query)["data"]["result"]
            models = {series["metric"].get("model", "") for series in result}
            if expression.kind == "threshold":  # job-wide (""), or a bounded pool's own
                return bool(models) and models <= bounded | {""}
            return models >= set(PORTS)

        wait_until(shown, timeout=60, what=f"{expression} for all three models")


def test_the_page_draws_every_graph_in_a_browser(stack: None) -> None:
    chromium = next(filter(None, map(shutil.which, BROWSERS)), None)
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must draw the page: .ci/run installs chromium (make chromium)")
        pytest.skip("no chromium here (make chromium installs Debian's)")
    browse = run(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1920,1080",
        "--virtual-time-budget=20000", "--dump-dom", PAGE_URL, timeout=120,
    )  # fmt: skip
    dom = browse.stdout
    assert 'data-drawn="' in dom, browse.stderr[-2000:]  # the script ran to its end
    heads = re.findall(r'<div class="head (?:ok|warn|page|down)">.*?<div class="name">(\w+)<', dom)
    assert sorted(heads) == sorted(PORTS)
    graphs = len({e.where for e in expressions(PAGE.read_text()) if e.kind == "line"})
    assert dom.count('<div class="cell">') == graphs * len(PORTS)
    assert dom.count('<div class="cell"><svg') == graphs * len(PORTS)  # each drew
    assert 'class="error"' not in dom
    assert "<polyline" in dom


def test_make_down_leaves_nothing_behind(stack: None) -> None:
    down = run("make", "--no-print-directory", "down")
    assert down.returncode == 0, down.stderr
    label = f"label=com.docker.compose.project={PROJECT}"
    assert run("docker", "ps", "-aq", "--filter", label).stdout.split() == []
    assert run("docker", "network", "ls", "-q", "--filter", label).stdout.split() == []
    assert run("docker", "volume", "ls", "-q", "--filter", label).stdout.split() == []
