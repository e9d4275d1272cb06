from __future__ import annotations

import resource

import pytest


@pytest.fixture(autouse=True, scope="session")
def _enough_descriptors() -> None:
    """Flood tests hold thousands of sockets on both ends in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
