"""The page that shows the three models side by side: every panel in its address, on
the UI the running Prometheus has. (That each panel returns data for all three models
is checked against the running stack in test_compose.py.)"""

from __future__ import annotations

import subprocess
import sys
import urllib.parse

from services.dashboard import PANELS, page_url
from support import ROOT


def test_the_page_holds_every_panel_as_a_15_minute_graph() -> None:
    for classic, path in ((False, "/graph"), (True, "/classic/graph")):
        url = urllib.parse.urlsplit(page_url("http://prometheus:9090", classic=classic))
        assert url.path == path
        params = dict(urllib.parse.parse_qsl(url.query))
        for n, panel in enumerate(PANELS):
            assert params[f"g{n}.expr"] == panel.expr
            assert params[f"g{n}.tab"] == "0" and params[f"g{n}.range_input"] == "15m"
        assert f"g{len(PANELS)}.expr" not in params


def test_every_panel_groups_by_model() -> None:
    # A line per model is what makes the page a comparison.
    for panel in PANELS:
        assert "model" in panel.expr or panel.expr.startswith(("echo_", "process_")), panel


def test_it_prints_the_address_with_no_prometheus_running() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.dashboard", "--prometheus", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("http://127.0.0.1:9/graph?g0.expr=")
