from __future__ import annotations

import resource
import sys

import pytest


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
