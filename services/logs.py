"""Logging that a server under exhaustion can afford: rate-limited, and never fatal."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NoReturn


class RateLimitedLog:
    """Log a repeating problem at most once per interval, with the count suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Never raises: a worker must not die of a message it could not write."""
        with contextlib.suppress(MemoryError):
            self._warning(message, *args)

    def _warning(self, message: str, *args: object) -> None:
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
    with contextlib.suppress(MemoryError):  # logging reports its own I/O errors
        log_call(*args)


def exit_now(code: int, message: str | None = None, grace: float = 1.0) -> NoReturn:
    """End the process at once, whatever its other threads hold or wait for.

    `message` is logged as critical and the logs flushed, from a helper thread given
    `grace` seconds: if stderr is a pipe nobody reads, a log call blocks on the handler's
    lock for good, and an exit path must not wait on that.
    """

    def last_words() -> None:
        if message:
            logging.getLogger("echo").critical("%s", message)
        logging.shutdown()

    with contextlib.suppress(RuntimeError, MemoryError):  # no thread: exit without last words
        helper = threading.Thread(target=last_words, name="echo-last-words", daemon=True)
        helper.start()
        helper.join(grace)
    os._exit(code)
