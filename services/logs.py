"""Logging that a server under exhaustion can afford: rate-limited, and never fatal."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """Log a repeating problem at most once per interval, with the count suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
        quietly(self._logger.warning, message + suffix, *args)


def quietly(log_call: Callable[..., None], *args: object) -> None:
    """Log, unless logging itself fails (out of memory): a worker must not die of a
    message it could not write."""
    with contextlib.suppress(Exception):
        log_call(*args)
