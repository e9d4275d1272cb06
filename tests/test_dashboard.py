"""The console page that shows the three models side by side: its address, and that
what it draws exists, keeps a line per model, and draws each alert's own threshold.
(That it renders and every expression returns all three models against the running
stack is checked in test_compose.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest
import yaml

from harness.dashboard import PAGE, Expression, attack_url, expressions, page_url
from support import ROOT, running

# A name in an expression: a metric family or series (echo_*, process_*) or a recording rule.
NAME = re.compile(r"\b(?:echo_|process_|model:|echo:)[A-Za-z0-9_:]*")
SELECTOR = re.compile(r"(?<![:\w])((?:echo|process)_[A-Za-z0-9_]*)(\{[^}]*\})?")
THRESHOLD = "echo:alert_threshold"
OWN_NUMBER = re.compile(r"[<>]=?\s*(?!0$)[\d.]+$")


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def drawn() -> list[Expression]:
    return expressions(PAGE.read_text())


def alerts_named(expr: str) -> set[str]:
    """The alerts whose thresholds a `echo:alert_threshold{alert=...}` selector picks."""
    match = re.search(r'alert=~?"([^"]*)"', expr)
    return set(match.group(1).split("|")) if match else set()


def served_names() -> set[str]:
    """Every series name a running server exports, and every recording rule."""
    with running("queue") as server:
        names = {s.name for family in server.service.registry.collect() for s in family.samples}
    return names | {rule["record"] for rule in rules() if "record" in rule}


def test_the_address_is_the_page_live_or_over_a_window() -> None:
    live = urllib.parse.urlsplit(page_url("http://prometheus:9090"))
    assert live.path == "/consoles/echo.html"
    assert dict(urllib.parse.parse_qsl(live.query)) == {"range": "15m"}
    window = urllib.parse.urlsplit(attack_url(1000.0, 1030.4, "http://127.0.0.1:9090/"))
    assert window.netloc == "127.0.0.1:9090" and window.path == "/consoles/echo.html"
    assert dict(urllib.parse.parse_qsl(window.query)) == {"start": "940", "end": "1090"}
    with pytest.raises(ValueError, match="before it starts"):
        page_url(start=20.0, end=10.0)
    with pytest.raises(ValueError, match="both"):
        page_url(start=20.0)


FIGURES = {"threads", "resident memory", "open connections", "echoes/s", "turned away/s"}
GRAPHS = {
    "live threads",
    "resident memory",
    "connections by state",
    "echoes per second",
    "turned away per second",
    "closed per second",
    "wait for a turn",
    "leader busy",
}


def test_the_page_draws_the_figures_and_graphs_the_issue_asks_for() -> None:
    assert {e.where for e in drawn() if e.kind == "figure"} == FIGURES
    assert {e.where for e in drawn() if e.kind == "line"} == GRAPHS
    # Every graph has a line of its own, not only a threshold.
    assert {e.where for e in drawn() if e.kind == "threshold"} <= GRAPHS


def test_every_expression_reads_what_exists_and_keeps_a_line_per_model() -> None:
    names = served_names()
    for expression in drawn():
        used = NAME.findall(expression.expr)
        assert used, expression
        # No typo and no series that is not exported: an empty graph looks like a calm one.
        assert set(used) <= names, (expression, set(used) - names)
        # A column per model is what makes the page a comparison: every aggregation keeps
        # the model label, and every raw series is the echo servers' (job="echo").
        for grouping in re.findall(r"\bby \(([^)]*)\)", expression.expr):
            assert "model" in {label.strip() for label in grouping.split(",")}, expression
        for name, labels in SELECTOR.findall(expression.expr):
            assert 'job="echo"' in labels, (expression, name)


def test_every_alert_threshold_is_drawn_from_the_series_the_alert_reads() -> None:
    recorded = {r["labels"]["alert"] for r in rules() if r.get("record") == THRESHOLD}
    alerts = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    # Each number lives once, in its recorded series; the alert reads that series...
    for alert in recorded:
        assert f'{THRESHOLD}{{alert="{alert}"}}' in alerts[alert], alert
    # ...and the page draws exactly those series as thresholds, nothing else.
    thresholds = [e for e in drawn() if e.kind == "threshold"]
    assert all(e.expr.startswith(THRESHOLD + "{") for e in thresholds), thresholds
    assert set().union(*(alerts_named(e.expr) for e in thresholds)) == recorded
    # An alert comparing with a number of its own would have escaped the page (> 0, "any
    # at all", is a state the page's header shows: restarts, firing alerts).
    for alert, expr in alerts.items():
        if alert not in recorded:
            assert not OWN_NUMBER.search(expr.strip()), alert


def test_a_broken_page_would_be_caught() -> None:
    # The checks above are not vacuous: each of these mistakes fails one of them.
    names = served_names()
    assert not set(NAME.findall('echo_thread{job="echo"}')) <= names
    assert "model" not in re.findall(r"\bby \(([^)]*)\)", "sum by (state) (echo_connections)")[0]
    assert SELECTOR.findall("echo_threads")[0][1] == ""
    assert alerts_named(f'{THRESHOLD}{{alert="EchoThreadExplosion"}}') == {"EchoThreadExplosion"}
    assert OWN_NUMBER.search('echo_threads{job="echo"} > 200')
    assert not OWN_NUMBER.search("changes(process_start_time_seconds[10m]) > 0")
    page = expressions('<section data-title="t"><var data-threshold data-expr="x"></var></section>')
    assert page == [Expression("threshold", "t", "x")]


def test_it_prints_the_address_with_no_prometheus_running() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.dashboard", "--prometheus", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "http://127.0.0.1:9/consoles/echo.html?range=15m\n"


def test_a_window_that_ends_before_it_starts_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.dashboard", "--start", "20", "--end", "10"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].endswith("before it starts (20)")
    assert "Traceback" not in result.stderr
