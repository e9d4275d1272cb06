"""Read a server's /metrics back: the scrape client of the tests and the tools."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(families: Iterable[Metric]) -> Scraped:
    """Flatten metric families into {(name, sorted labels): value}, for tests and tools."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def scrape(address: tuple[str, int], timeout: float = 5.0) -> Scraped:
    """GET /metrics from a server (ours, on loopback) and flatten it; OSError if it fails."""
    host, port = address
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return samples(text_string_to_metric_families(text))


def metric(scraped: Scraped, name: str, **labels: str) -> float:
    """One value from `scrape()`; 0 when the series is absent (a counter never moved)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)
