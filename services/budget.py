"""The descriptor budget: every descriptor a server may hold, planned against its limit.

The echo cap is not the only user: the metrics endpoint may hold `METRICS_CLIENTS`
clients, and the server its own files. With the echo port at its cap, a budget that
left the metrics clients out let ~70 idle connections to the metrics port make
accept() fail with EMFILE, and then the cap's eviction never ran: newcomers got
nothing. So the cap is what is left after `RESERVED`, and a configuration that does
not fit is refused at start (services.preflight).
"""

from __future__ import annotations

import contextlib
import resource

METRICS_CLIENTS = 256  # the metrics endpoint's clients at once (services.metrics_http)
# stdio, the two listeners, the two selectors and wake-up pairs, the ready file, log
# files, and a margin.
OWN_DESCRIPTORS = 16
RESERVED = METRICS_CLIENTS + OWN_DESCRIPTORS
MAX_DEFAULT_CAP = 10_000


def default_cap(descriptors: int | None = None) -> int:
    """10,000 connections, or what is left of the descriptor limit (`descriptors`, this
    process's soft RLIMIT_NOFILE by default) after `RESERVED` (at least 1: a limit that
    leaves nothing is refused at start, with its numbers)."""
    if descriptors is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if descriptors == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CAP
    return max(1, min(MAX_DEFAULT_CAP, descriptors - RESERVED))


def raise_soft_limit() -> None:
    """Raise the soft descriptor limit to the hard one, as servers do at start: a soft
    limit of 1,024 (a common default) is a guard against old select() loops, which this
    server does not have. An unlimited hard limit, or one the kernel refuses, is left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
