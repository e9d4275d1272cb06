"""One page in Prometheus's own UI that shows the three models side by side.

A prepared multi-panel graph page: each panel is one expression with a line per
model (and per state or reason where there is one), over the last 15 minutes.
`make up` prints its address; `python -m services.dashboard` prints it too.
Debian's Prometheus serves only the classic UI (`/classic/graph`); the upstream
one serves `/graph`; both read the same `g<N>.*` parameters.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"
RANGE = "15m"


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str


PANELS = (
    Panel("live threads", 'echo_threads{job="echo"}'),
    Panel("resident memory, MiB", 'process_resident_memory_bytes{job="echo"} / 2^20'),
    Panel("open connections by state", 'sum by (model, state) (echo_connections{job="echo"})'),
    Panel("echoes per second", "model:echo_messages:rate1m"),
    Panel(
        "rejections per second, by reason",
        'sum by (model, reason) (rate(echo_connections_rejected_total{job="echo"}[1m]))',
    ),
    Panel(
        "closes per second, by reason",
        'sum by (model, reason) (rate(echo_connections_closed_total{job="echo"}[1m]))',
    ),
    Panel(
        "thread-start failures per second",
        'sum by (model) (rate(echo_thread_start_failures_total{job="echo"}[1m]))',
    ),
)


def page_url(prometheus: str = DEFAULT_PROMETHEUS, classic: bool = False) -> str:
    params: dict[str, str] = {}
    for n, panel in enumerate(PANELS):
        params |= {
            f"g{n}.expr": panel.expr,
            f"g{n}.tab": "0",  # the graph, not the table
            f"g{n}.range_input": RANGE,
            f"g{n}.stacked": "0",
        }
    path = "/classic/graph" if classic else "/graph"
    return f"{prometheus}{path}?{urllib.parse.urlencode(params)}"


def serves_classic_ui(prometheus: str = DEFAULT_PROMETHEUS, timeout: float = 5.0) -> bool:
    """Whether this Prometheus has the classic UI only (Debian's package)."""
    if not prometheus.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {prometheus!r}")
    try:
        url = f"{prometheus}/graph"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (checked above)
            return "/classic/" in response.geturl()
    except urllib.error.HTTPError:
        return True  # no React UI here
    except OSError:
        return False  # not running: the upstream path is the usual one


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.dashboard", description=__doc__)
    parser.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help="its base URL")
    args = parser.parse_args(argv)
    if not args.prometheus.startswith(("http://", "https://")):
        parser.error(f"--prometheus: not an http(s) URL: {args.prometheus!r}")
    print(page_url(args.prometheus, classic=serves_classic_ui(args.prometheus)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
