"""The registry is the one place that knows each model: everything else agrees with it,
and a new model is one module plus one entry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bench.servers import peer_specs
from harness.launcher import services_command
from loadtest.peers import PEER_PORTS
from services.cli import parse_config
from services.config import Config
from services.models import MODELS, ModelSpec, registered
from support import ROOT, ServerProcess, echo_once, metric, scrape

CODE_DIRS = ("services", "loadtest", "bench")


def test_compose_runs_every_model_on_its_registered_ports() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    echo_services = {
        name: service
        for name, service in compose["services"].items()
        if "ECHO_MODEL" in service.get("environment", {})
    }
    assert set(echo_services) == set(MODELS)
    for name, service in echo_services.items():
        spec, env = MODELS[name], service["environment"]
        assert env["ECHO_MODEL"] == name
        assert int(env["ECHO_PORT"]) == spec.port
        assert int(env["ECHO_METRICS_PORT"]) == spec.metrics_port
        assert set(service["ports"]) == {
            f"127.0.0.1:{spec.port}:{spec.port}",
            f"127.0.0.1:{spec.metrics_port}:{spec.metrics_port}",
        }


def test_prometheus_scrapes_every_model_on_its_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    echo_job = next(job for job in config["scrape_configs"] if job["job_name"] == "echo")
    scraped = {group["labels"]["model"]: group["targets"] for group in echo_job["static_configs"]}
    assert scraped == {name: [f"{name}:{spec.metrics_port}"] for name, spec in MODELS.items()}


def test_the_readme_port_table_matches_the_registry() -> None:
    rows = re.findall(
        r"^\| `(\w+)` +\| `127\.0\.0\.1:(\d+)` +\| `127\.0\.0\.1:(\d+)` +\|",
        (ROOT / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    assert {name: (int(echo), int(metrics)) for name, echo, metrics in rows} == {
        name: (spec.port, spec.metrics_port) for name, spec in MODELS.items()
    }


def named_models(line: str) -> list[str]:
    """The models a line of code names in a way that decides behaviour: compared with,
    listed beside another, or quoted at all (but "threads" alone, which is also the
    name of a metric and a column)."""
    alternatives = "|".join(map(re.escape, MODELS))
    quoted = re.findall(rf"""["']({alternatives})["']""", line)
    compared = re.search(rf"""(==|!=|\bin)\s*\(?["']({alternatives})["']""", line)
    if compared or len(set(quoted)) > 1:
        return quoted
    return [name for name in quoted if name != "threads"]


def test_no_code_outside_the_registry_names_a_model() -> None:
    """Only a model's own module and the registry hold its name; docs, tests and help
    text read the registry."""
    offenders = []
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if path.parent.name == "models":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if named_models(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('if model != "threads":', True),
        ('MODELS = ("executor", "queue", "threads")', True),
        ('ports = {"queue": 15002}', True),
        ('values.get("threads", 0)', False),
        ("if name in MODELS:", False),
    ],
)
def test_the_model_name_check_can_fail(line: str, named: bool) -> None:
    assert bool(named_models(line)) == named


# A model that is not in the tree: one module, written here, and one registry entry.
PLUGIN_MODULE = '''
import threading

from services.pool import PoolServer


class OneThreadServer(PoolServer):
    """A pool of one thread: every job in turn (both dispatch modes come with the base)."""

    def start_workers(self) -> None:
        self._jobs = []
        self._ready = threading.Condition()
        threading.Thread(target=self._work, daemon=True).start()
        self.stats.worker_threads.incr()

    def submit(self, job):
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._jobs)
                job = self._jobs.pop(0)
            job()

    def stop_workers(self, deadline: float) -> bool:
        return True
'''

PLUGIN_SPEC = ModelSpec(
    name="one-thread",
    server="echo_plugin:OneThreadServer",
    summary="one worker thread for everyone",
    bounded=True,
    port=15009,
    metrics_port=9109,
    idle_timeout=3.0,
    send_timeout=3.0,
)

LAUNCH_WITH_PLUGIN = """
import sys
sys.path.insert(0, sys.argv[1])
from services.models import MODELS, ModelSpec
MODELS["one-thread"] = ModelSpec(**eval(sys.argv[2]))
from services.app import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_new_model_is_one_module_and_one_registry_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "echo_plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with registered(PLUGIN_SPEC):
        parsed = parse_config(["--model", "one-thread"], env={})
        assert (parsed.port, parsed.metrics_port, parsed.idle_timeout) == (15009, 9109, 3.0)
        assert Config(model="one-thread").bounded
        assert "one-thread (one worker thread for everyone)" in _help()
    command = services_command(
        str(tmp_path),
        repr(PLUGIN_SPEC.__dict__),
        "--model",
        "one-thread",
        "--port",
        "0",
        "--metrics-port",
        "0",
        code=LAUNCH_WITH_PLUGIN,
    )
    with ServerProcess(command, log_path=tmp_path / "plugin.log") as server:
        server.wait_ready()
        assert echo_once(server.address, b"plug-in") == b"plug-in"
        scraped = scrape(server.metrics_address)
        assert metric(scraped, "echo_server_info", model="one-thread", **_info(scraped)) == 1
        assert metric(scraped, "echo_worker_threads") == 1
    assert "one-thread" not in MODELS  # registered() took it out again


def _help() -> str:
    from services.cli import build_parser  # noqa: PLC0415 (built while registered)

    return " ".join(build_parser().format_help().split())


def _info(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, str]:
    """The other labels of echo_server_info, whatever they are."""
    labels = next(labels for name, labels in scraped if name == "echo_server_info")
    return {k: v for k, v in labels if k != "model"}


def test_the_peers_profile_runs_every_peer_on_its_port_with_the_models_limits() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    peers = {n: s for n, s in services.items() if s.get("profiles") == ["peers"]}
    assert set(peers) == {f"peer-{name}" for name in PEER_PORTS}
    local = peer_specs(hardened=True)
    assert set(local) <= set(PEER_PORTS)  # c-epoll only where a C compiler is
    limits = ("mem_limit", "memswap_limit", "pids_limit", "cpus", "read_only", "cap_drop")
    for name, port in PEER_PORTS.items():
        peer = peers[f"peer-{name}"]
        assert peer["command"][-1] == str(port), name
        assert {k: peer[k] for k in limits} == {k: services["executor"][k] for k in limits}
        if name not in local:
            continue
        # The same program as `make flood-peers` runs locally, on another port.
        if peer["entrypoint"] == ["python3", "-m"]:
            assert peer["command"][:-1] == local[name][2:-1], name
        else:
            assert Path(peer["entrypoint"][0]).name == Path(local[name][0]).name, name
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^PEER_SERVICES := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert listed is not None
    assert listed.group(1).replace("\\\n", " ").split() == list(peers)
