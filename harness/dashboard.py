"""The console page that shows the three models side by side, and its address.

The page is Prometheus's own (a console template, prometheus/consoles/echo.html,
served at /consoles/echo.html): a column per model, a header of current figures and
firing alerts, a row of graphs per question with each alert's threshold drawn. It
names what it shows as data (`data-expr` attributes); `expressions()` reads them
back so the tests can check each against the running stack. `make up`, `make page`
and `make flood` print its address, the last with the attack's window.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"
PAGE = Path(__file__).resolve().parent.parent / "prometheus" / "consoles" / "echo.html"
# A window with this much before and after an attack, so its start and end show.
MARGIN_SECONDS = 60


def page_url(
    prometheus: str = DEFAULT_PROMETHEUS, start: float | None = None, end: float | None = None
) -> str:
    """The page, live over the last 15 minutes, or over [start, end] (unix seconds)."""
    if (start is None) != (end is None):
        raise ValueError("give both start and end, or neither")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"the window ends ({end:.0f}) before it starts ({start:.0f})")
    params = {"range": "15m"} if start is None else {"start": f"{start:.0f}", "end": f"{end:.0f}"}
    return f"{prometheus.rstrip('/')}/consoles/echo.html?{urllib.parse.urlencode(params)}"


def attack_url(started: float, ended: float, prometheus: str = DEFAULT_PROMETHEUS) -> str:
    """The page over an attack's window, with a margin either side."""
    return page_url(prometheus, started - MARGIN_SECONDS, ended + MARGIN_SECONDS)


def prometheus_answers(prometheus: str = DEFAULT_PROMETHEUS, timeout: float = 1.0) -> bool:
    """Whether a Prometheus is ready there (then `make up` runs: the page has data)."""
    if not prometheus.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {prometheus!r}")
    try:
        ready = f"{prometheus.rstrip('/')}/-/ready"
        with urllib.request.urlopen(ready, timeout=timeout) as response:  # noqa: S310 (checked above)
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Expression:
    """One thing the page draws: a header figure, a graph's line or an alert threshold."""

    kind: str  # "figure", "line" or "threshold"
    where: str  # the figure's name or the graph's title
    expr: str


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[Expression] = []
        self._panel = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._panel = attributes.get("data-title") or ""
        elif tag == "var" and attributes.get("data-expr"):
            expr = attributes["data-expr"] or ""
            if figure := attributes.get("data-figure"):
                self.found.append(Expression("figure", figure, expr))
            else:
                kind = "threshold" if "data-threshold" in attributes else "line"
                self.found.append(Expression(kind, self._panel, expr))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._panel = ""


def expressions(html: str) -> list[Expression]:
    """Every expression a page (the template or the served page) draws, in order."""
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.dashboard", description=__doc__)
    parser.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help="its base URL")
    parser.add_argument("--start", type=float, help="the window's start, unix seconds")
    parser.add_argument("--end", type=float, help="the window's end, unix seconds")
    args = parser.parse_args(argv)
    if not args.prometheus.startswith(("http://", "https://")):
        parser.error(f"--prometheus: not an http(s) URL: {args.prometheus!r}")
    try:
        print(page_url(args.prometheus, args.start, args.end))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
