"""The page that shows the three models side by side: every panel in its address, on
the UI the running Prometheus has. (That each panel returns data for all three models
is checked against the running stack in test_compose.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse

import yaml

from services.dashboard import PANELS, page_url
from support import ROOT, running


def test_the_page_holds_every_panel_as_a_15_minute_graph() -> None:
    for classic, path in ((False, "/graph"), (True, "/classic/graph")):
        url = urllib.parse.urlsplit(page_url("http://prometheus:9090", classic=classic))
        assert url.path == path
        params = dict(urllib.parse.parse_qsl(url.query))
        for n, panel in enumerate(PANELS):
            assert params[f"g{n}.expr"] == panel.expr
            assert params[f"g{n}.tab"] == "0" and params[f"g{n}.range_input"] == "15m"
        assert f"g{len(PANELS)}.expr" not in params


# A name in a panel: a metric family or series (echo_*, process_*) or a recording rule.
NAME = re.compile(r"\b(?:echo_|process_|model:)[A-Za-z0-9_:]*")
SELECTOR = re.compile(r"(?<![:\w])((?:echo|process)_[A-Za-z0-9_]*)(\{[^}]*\})?")


def served_names() -> set[str]:
    """Every series name a running server exports, and every recording rule."""
    with running("queue") as server:
        names = {s.name for family in server.service.registry.collect() for s in family.samples}
    rules = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text())
    names |= {r["record"] for group in rules["groups"] for r in group["rules"] if "record" in r}
    return names


def test_every_panel_reads_what_exists_and_keeps_a_line_per_model() -> None:
    names = served_names()
    for panel in PANELS:
        used = NAME.findall(panel.expr)
        assert used, panel
        # No typo and no series that is not exported: an empty panel looks like a calm one.
        assert set(used) <= names, (panel, set(used) - names)
        # A line per model is what makes the page a comparison: every aggregation keeps
        # the model label, and every raw series is the echo servers' (job="echo").
        for grouping in re.findall(r"\bby \(([^)]*)\)", panel.expr):
            assert "model" in {label.strip() for label in grouping.split(",")}, panel
        for name, labels in SELECTOR.findall(panel.expr):
            assert 'job="echo"' in labels, (panel, name)


def test_a_broken_panel_would_be_caught() -> None:
    # The checks above are not vacuous: each of these mistakes fails one of them.
    names = served_names()
    typo = NAME.findall('echo_thread{job="echo"}')
    assert not set(typo) <= names
    assert "model" not in re.findall(r"\bby \(([^)]*)\)", "sum by (state) (echo_connections)")[0]
    assert SELECTOR.findall("echo_threads")[0][1] == ""


def test_it_prints_the_address_with_no_prometheus_running() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.dashboard", "--prometheus", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("http://127.0.0.1:9/graph?g0.expr=")
