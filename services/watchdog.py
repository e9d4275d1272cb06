"""Notice a server that has stopped making progress, so its supervisor can restart it.

Recipe 12.5's watchdog, made explicit: each *lane* reports a progress number
that grows while it works, and whether work is waiting for it. A lane whose
number has not moved for `timeout` seconds while work waits has hung.

Stalls are measured in monotonic time, which keeps running while the process is
stopped (SIGSTOP, `docker pause`, a frozen VM or host). So the watchdog also
measures its own lateness: a check that runs far later than it was due means
the whole process was not running, and nobody could have made progress; every
lane's clock starts again instead of the server being killed for it on wake-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# The shortest timeout: the accept loop reports at least once a second, and a back-off
# after descriptors ran out can add a second more.
MIN_TIMEOUT = 3.0


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout < MIN_TIMEOUT:
            raise ValueError(f"watchdog timeout {timeout:g} s is under {MIN_TIMEOUT:g} s")
        self._lanes = lanes
        self.timeout = timeout
        self._on_trip = on_trip
        self._clock = clock
        self.interval = min(1.0, timeout / 4)
        # A check later than this past its due time means the process itself was stopped.
        self.late = max(1.0, timeout / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="echo-watchdog", daemon=True)
        self._lock = threading.Lock()
        self._stalled_for = 0.0
        self._tripped = False
        self._last_check: float | None = None
        self._last_progress: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._freezes = 0  # checks that found the process had been stopped
        self._checks = 0

    @property
    def stalled_seconds(self) -> float:
        """The longest time any lane has gone without progress while work waited."""
        with self._lock:
            return self._stalled_for

    @property
    def checks(self) -> int:
        """Checks made so far."""
        with self._lock:
            return self._checks

    @property
    def freezes(self) -> int:
        """How often the process was found to have been stopped (and clocks restarted)."""
        with self._lock:
            return self._freezes

    @property
    def tripped(self) -> bool:
        with self._lock:
            return self._tripped

    def start(self) -> None:
        self._restart_clocks(self._clock())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def check(self, now: float) -> str | None:
        """One look at every lane at `now` (the clock's time); the reason when one has
        hung, else None. `start()` (or a first check) sets every lane's clock."""
        if self._last_check is None or now - self._last_check > self.interval + self.late:
            if self._last_check is not None:
                with self._lock:
                    self._freezes += 1
            self._restart_clocks(now)
            return None
        self._last_check = now
        worst, reason = 0.0, None
        for lane in self._lanes:
            progress, pending = lane.progress(), lane.pending()
            if not pending or progress != self._last_progress[lane.name]:
                self._last_progress[lane.name], self._since[lane.name] = progress, now
                continue
            stalled = now - self._since[lane.name]
            if stalled > worst:
                worst = stalled
                reason = f"{lane.name} made no progress for {stalled:.1f} s with {pending} waiting"
        tripped = worst > self.timeout
        with self._lock:
            self._checks += 1
            self._stalled_for = worst
            self._tripped = tripped
        return reason if tripped else None

    def _restart_clocks(self, now: float) -> None:
        self._last_check = now
        for lane in self._lanes:
            self._last_progress[lane.name], self._since[lane.name] = lane.progress(), now
        with self._lock:
            self._stalled_for = 0.0

    def _watch(self) -> None:
        # Out of memory (a flood can do that), a wait cannot allocate its lock and a check
        # cannot run: sleep instead, and skip the check. Skipping never trips; a check
        # that then runs late restarts the clocks, as after a freeze.
        while not self._stop.is_set():
            try:
                if self._stop.wait(self.interval):
                    return
            except RuntimeError:  # "can't allocate lock"
                time.sleep(self.interval)
                continue
            try:
                reason = self.check(self._clock())
            except MemoryError:
                continue
            if reason is not None:
                self._on_trip(f"watchdog: {reason} (timeout {self.timeout:g} s)")
                return
