"""Notice a server that has stopped making progress, so its supervisor can restart it.

Recipe 12.5's watchdog, made explicit: each *lane* reports a progress number
that grows while it works, and whether work is waiting for it. A lane whose
number has not moved for `timeout` seconds while work waits has hung.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("echo.watchdog")


@dataclass(frozen=True)
class Lane:
    name: str
    progress: Callable[[], int]
    pending: Callable[[], int]


class Watchdog:
    def __init__(
        self,
        lanes: list[Lane],
        timeout: float,
        on_trip: Callable[[str], None],
    ) -> None:
        self._lanes = lanes
        self.timeout = timeout
        self._on_trip = on_trip
        self._interval = min(1.0, timeout / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="echo-watchdog", daemon=True)
        self._lock = threading.Lock()
        self._stalled_for = 0.0
        self._tripped = False

    @property
    def stalled_seconds(self) -> float:
        """The longest time any lane has gone without progress while work waited."""
        with self._lock:
            return self._stalled_for

    @property
    def tripped(self) -> bool:
        with self._lock:
            return self._tripped

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        last_progress = {lane.name: lane.progress() for lane in self._lanes}
        since = dict.fromkeys(last_progress, time.monotonic())
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            worst, reason = 0.0, ""
            for lane in self._lanes:
                progress, pending = lane.progress(), lane.pending()
                if not pending or progress != last_progress[lane.name]:
                    last_progress[lane.name], since[lane.name] = progress, now
                    continue
                stalled = now - since[lane.name]
                if stalled > worst:
                    worst = stalled
                    reason = (
                        f"{lane.name} made no progress for {stalled:.1f} s with {pending} waiting"
                    )
            with self._lock:
                self._stalled_for = worst
                self._tripped = worst > self.timeout
            if worst > self.timeout:
                log.critical("watchdog: %s (timeout %.1f s)", reason, self.timeout)
                self._on_trip(reason)
                return
