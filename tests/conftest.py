from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import pytest

from loadtest.floodrun import FloodRun, RunSettings, Target, flood
from loadtest.matrix import matrix_row
from support import Flooder


@pytest.fixture(autouse=True, scope="session")
def _enough_descriptors() -> None:
    """Flood tests hold thousands of sockets on both ends in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Importing locust monkey-patches the process with gevent (sockets, threads, queues),
    and every real-socket test after it breaks in odd ways. Locust runs in its own
    processes here; a test module that imports it is refused at once."""
    if "locust" in sys.modules:
        raise pytest.UsageError(
            "a test module imported locust into the test process; run it in a subprocess"
        )


@pytest.fixture
def flooder(request: pytest.FixtureRequest) -> Flooder:
    """Runs one flood; under `make test-floods` (ECHO_FLOOD_RECORD=path) it also appends
    the run to that file, one JSON line each, for the tables docs/history/floods.md quotes."""
    record = os.environ.get("ECHO_FLOOD_RECORD")

    def run(target: Target, scenario: str, settings: RunSettings) -> FloodRun:
        result = flood(target, scenario, settings)
        if record:
            where = "containers" if target.container else "local"
            line = {"test": request.node.nodeid, **matrix_row(result, where)}
            with Path(record).open("a") as out:
                out.write(json.dumps(line) + "\n")
        return result

    return run
