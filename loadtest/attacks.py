"""Connection-flood attacks, driven from one thread with a selector.

One thread holds thousands of sockets cheaply, so the attacker does not need
the very resource (threads) whose exhaustion it demonstrates. Every attack is
bounded: at most `MAX_CONNECTIONS` sockets, at most `MAX_DURATION` seconds,
and only against loopback addresses, or the project's own containers at the
addresses Docker gives them (`loadtest.containers`).

Like real tools (slowloris, slowhttptest), an attack keeps its count: every
connection the server closes, resets or refuses is replaced at once, within
`rate` new connections a second overall, for the whole attack. `polite` turns
that off (a connection the server drops stays dropped), for comparison.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import resource
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

SCENARIOS = (
    "idle", "slowloris", "slow-reader", "churn", "metrics-slowloris", "cap-steer", "botnet",
    "fd-squeeze",
)  # fmt: skip
# Hold the target's cap and a tenth more; fd-squeeze also fills the metrics port with
# idle clients (a side attack), so that descriptors run short before the cap is reached.
AT_THE_CAP = ("cap-steer", "botnet", "fd-squeeze")
TRICKLED = ("slowloris", "metrics-slowloris", *AT_THE_CAP)  # send a byte now and then
BOTNET_SOURCES = 253  # botnet: from 127.0.0.2 to 127.0.0.254
CONNECT_TIMEOUT = 5.0  # a handshake not done by then counts as refused
_LATENCIES_KEPT = 20_000  # connect latencies kept for the percentiles (the latest)
# metrics-slowloris: a request line that looks real, then one header whose value grows
# a byte at a time, so the blank line that ends the headers never comes.
_HTTP_START = b"GET /metrics HTTP/1.1\r\nHost: echo\r\nX-Slow: "
MAX_CONNECTIONS = 20_000
MAX_DURATION = 300.0
_CHUNK = b"\xa5" * 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT on our side


class AttackRefused(ValueError):
    """The plan is outside what this tool will do."""


@dataclass(frozen=True)
class AttackPlan:
    scenario: str
    address: tuple[str, int]
    connections: int = 1000
    rate: float = 1000.0  # new connections per second
    duration: float = 20.0
    trickle_interval: float = 2.0  # slowloris: seconds between bytes on one connection
    churn_in_flight: int = 64
    polite: bool = False  # never replace a connection the server dropped
    # Source addresses (botnet): 127.0.0.2 onwards against loopback, else that many
    # containers of its own beside the target's (`loadtest.botnet`).
    sources: int = 1
    # Idle connections to a second port, kept like the rest once the first port has its
    # count (fd-squeeze).
    side_address: tuple[str, int] | None = None
    side_connections: int = 0
    # The address is a container of the project, as Docker told it: a private address
    # is allowed too, and nothing else that is not loopback.
    container: bool = False

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise AttackRefused(f"scenario {self.scenario!r}: choose from {', '.join(SCENARIOS)}")
        ip = self._allowed(self.address[0])
        if self.side_address is not None:
            self._allowed(self.side_address[0])
        if self.side_connections < 0 or (self.side_connections and self.side_address is None):
            raise AttackRefused("side connections need a side address, and are not negative")
        if not 1 <= self.connections + self.side_connections <= MAX_CONNECTIONS:
            raise AttackRefused(f"connections: 1 to {MAX_CONNECTIONS}")
        if not 0 < self.duration <= MAX_DURATION:
            raise AttackRefused(f"duration: more than 0, at most {MAX_DURATION:g} s")
        if self.rate <= 0 or self.trickle_interval <= 0 or self.churn_in_flight < 1:
            raise AttackRefused("rate, trickle interval and churn in-flight must be positive")
        if not 1 <= self.sources <= BOTNET_SOURCES:
            raise AttackRefused(f"sources: 1 to {BOTNET_SOURCES}")
        if self.sources > 1 and not (ip.version == 4 and (ip.is_loopback or self.container)):
            raise AttackRefused(
                f"{self.scenario}: many source addresses (127.0.0.2 onwards) need a loopback "
                f"IPv4 target, not {ip}"
            )

    @property
    def from_loopback_sources(self) -> bool:
        """Many sources on this host (127.0.0.2 onwards); against a container they are
        containers of their own instead (`loadtest.botnet`)."""
        return self.sources > 1 and ipaddress.ip_address(self.address[0]).is_loopback

    def _allowed(self, host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise AttackRefused(f"target {host!r}: give a loopback IP address") from None
        if not (ip.is_loopback or (self.container and ip.is_private)):
            raise AttackRefused(
                f"target {host}: floods go to loopback addresses only"
                + (" (or a container's private address)" if self.container else "")
            )
        return ip

    @property
    def target_count(self) -> int:
        """Connections the attack keeps open (churn: keeps connecting)."""
        if self.scenario == "churn":
            return self.churn_in_flight
        return self.connections + self.side_connections


@dataclass
class AttackCounts:
    planned: int = 0  # connections the attack keeps (cap-steer: sized past the cap)
    opened: int = 0  # connections that completed the handshake
    open_now: int = 0
    peak_open: int = 0  # the most held at once: how much of the attack landed
    connect_failures: int = 0  # refused, reset or timed out before the handshake was done
    closed_by_server: int = 0
    replaced: int = 0  # attempts beyond the first `target_count`: each one replaces a loss
    bytes_sent: int = 0
    connect_p50_ms: float = 0.0
    connect_p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class Attacker(Protocol):
    """What a flood runs and watches: an `Attack` here, or a botnet of containers."""

    plan: AttackPlan

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def counts(self) -> AttackCounts: ...


def ensure_descriptors(needed: int) -> None:
    """Raise this process's soft descriptor limit to fit `needed` sockets and a margin."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 256:
        wanted = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed + 256, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft != resource.RLIM_INFINITY and soft < needed + 64:
        raise AttackRefused(
            f"connections: {needed} need more descriptors than this process may open ({soft})"
        )


class Attack(threading.Thread):
    """Runs one plan until its duration ends or `stop()`; then closes every socket."""

    def __init__(self, plan: AttackPlan) -> None:
        if plan.sources > 1 and not plan.from_loopback_sources:
            raise AttackRefused(f"{plan.scenario}: many sources at a container: loadtest.botnet")
        super().__init__(name=f"attack-{plan.scenario}", daemon=True)
        self.plan = plan
        self._bind_sources = plan.from_loopback_sources
        self._counts = AttackCounts(planned=plan.connections + plan.side_connections)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, float] = {}  # connecting, since (monotonic)
        self._open: set[socket.socket] = set()
        self._side: set[socket.socket] = set()  # of those pending or open, the side attack's
        self._trickle: deque[tuple[float, socket.socket]] = deque()
        self._attempts = 0
        self._tokens = 1.0  # new connections allowed now: a bucket filled at `rate`
        self._refilled = 0.0
        self._latencies: deque[float] = deque(maxlen=_LATENCIES_KEPT)

    def counts(self) -> AttackCounts:
        with self._lock:
            latencies = sorted(self._latencies)
            counts = AttackCounts(**{**self._counts.__dict__, "errors": dict(self._counts.errors)})
        if latencies:
            counts.connect_p50_ms = 1000 * latencies[len(latencies) // 2]
            counts.connect_p99_ms = (
                1000 * latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)]
            )
        return counts

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        started = time.monotonic()
        deadline = started + self.plan.duration
        self._refilled = started
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                self._open_more(now)
                self._service(timeout=0.02)
                self._expire_pending(time.monotonic())
                if self.plan.scenario in TRICKLED:
                    self._trickle_bytes(time.monotonic())
        finally:
            self._close_all()

    # -- opening ------------------------------------------------------------------

    def _open_more(self, now: float) -> None:
        """Open up to the plan's count (churn: keep `churn_in_flight` connecting), never
        faster than `rate` a second; a polite attack opens each of its count once."""
        plan = self.plan
        # Up to a quarter of a second's worth at once, so a burst of losses is replaced
        # at `rate`, not all at once from credit saved while nothing was lost.
        self._tokens = min(
            self._tokens + (now - self._refilled) * plan.rate, max(1.0, plan.rate / 4)
        )
        self._refilled = now
        if plan.scenario == "churn":
            wanted = plan.churn_in_flight - len(self._pending)
        elif plan.polite:
            wanted = plan.connections - self._attempts
        else:
            wanted = plan.target_count - len(self._open) - len(self._pending)
        for _ in range(max(0, min(wanted, int(self._tokens), 256))):
            self._tokens -= 1
            self._connect(now)

    def _connect(self, now: float) -> None:
        self._attempts += 1
        if self._attempts > self.plan.target_count:
            with self._lock:
                self._counts.replaced += 1
        # The side attack takes what the main one does not need: a server that keeps
        # cutting side connections (the metrics endpoint past its client cap) must not
        # draw the whole rate away from the port under attack.
        address = self.plan.address
        main = len(self._open) + len(self._pending) - len(self._side)
        side = main >= self.plan.connections and len(self._side) < self.plan.side_connections
        if side and self.plan.side_address is not None:
            address = self.plan.side_address
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock.setblocking(False)
        if self._bind_sources:  # the whole of 127.0.0.0/8 is this host's
            sock.bind((f"127.0.0.{2 + self._attempts % self.plan.sources}", 0))
        if self.plan.scenario == "slow-reader":
            # Small buffers: the server's echo stalls after kilobytes, not megabytes of
            # kernel memory per connection, and the attacker's own unsent data stays
            # kilobytes too (on loopback its queues share the host's TCP memory with the
            # server's: 2,000 of them left to grow took 1.5 GiB of it).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            self._failed_connect(sock, code)
            return
        if side:
            self._side.add(sock)
        self._pending[sock] = now
        self._selector.register(sock, selectors.EVENT_WRITE)

    def _failed_connect(self, sock: socket.socket, code: int) -> None:
        self._side.discard(sock)
        sock.close()
        with self._lock:
            self._counts.connect_failures += 1
            name = errno.errorcode.get(code, str(code))
            self._counts.errors[name] = self._counts.errors.get(name, 0) + 1

    def _expire_pending(self, now: float) -> None:
        for sock, since in list(self._pending.items()):
            if now - since > CONNECT_TIMEOUT:
                del self._pending[sock]
                self._selector.unregister(sock)
                self._failed_connect(sock, errno.ETIMEDOUT)

    def _connected(self, sock: socket.socket) -> None:
        since = self._pending.pop(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._selector.unregister(sock)
            self._failed_connect(sock, code)
            return
        with self._lock:
            self._counts.opened += 1
            self._latencies.append(time.monotonic() - since)
        if self.plan.scenario == "churn":
            self._selector.unregister(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
            return
        self._open.add(sock)
        with self._lock:
            self._counts.open_now += 1
            self._counts.peak_open = max(self._counts.peak_open, self._counts.open_now)
        events = selectors.EVENT_READ
        if self.plan.scenario == "slow-reader":
            events = selectors.EVENT_WRITE  # write forever, never read
        self._selector.modify(sock, events)
        if sock in self._side:
            return  # idle: it only holds a descriptor of the server's
        if self.plan.scenario == "metrics-slowloris":
            self._send(sock, _HTTP_START)
        if self.plan.scenario in TRICKLED:
            self._trickle.append((time.monotonic() + self.plan.trickle_interval, sock))

    # -- serving the sockets ------------------------------------------------------------

    def _service(self, timeout: float) -> None:
        for key, events in self._selector.select(timeout):
            sock = key.fileobj
            if not isinstance(sock, socket.socket):
                continue
            if sock in self._pending:
                self._connected(sock)
            elif events & selectors.EVENT_WRITE:
                self._send(sock, _CHUNK)
            else:
                self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)  # slowloris reads its echoes; idle only ever sees EOF
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(sock)

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        """Send what the kernel takes now; False (and the socket dropped) if it is gone."""
        try:
            sent = sock.send(data)
        except BlockingIOError:
            return True
        except OSError:
            self._lost(sock)
            return False
        with self._lock:
            self._counts.bytes_sent += sent
        return True

    def _trickle_bytes(self, now: float) -> None:
        while self._trickle and self._trickle[0][0] <= now:
            _, sock = self._trickle.popleft()
            if sock not in self._open:
                continue
            if self._send(sock, b"a"):
                self._trickle.append((now + self.plan.trickle_interval, sock))

    def _lost(self, sock: socket.socket) -> None:
        """The server closed or reset this connection; `_open_more` replaces it."""
        self._open.discard(sock)
        self._side.discard(sock)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
        with self._lock:
            self._counts.closed_by_server += 1
            self._counts.open_now -= 1

    def _close_all(self) -> None:
        for sock in [*self._pending, *self._open]:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self._pending.clear()
        self._open.clear()
        self._side.clear()
        with self._lock:
            self._counts.open_now = 0
        self._selector.close()
