"""The bench client: N persistent connections playing ping-pong as fast as the server allows.

Lean on purpose, so that it is not the bottleneck: asyncio protocols (no streams)
on uvloop where it is installed, split over several processes. Each process
records every round trip's latency and completion time.

Throughput is reported twice. Raw: completions / wall time. Unstalled: this
machine freezes processes for milliseconds to seconds at a time, so the
completions that follow the previous one by less than `STALL` are counted and
divided by the sum of those gaps only: the rate while nothing was frozen.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing
import socket
import statistics
import time
from array import array
from dataclasses import dataclass
from typing import cast

STALL = 0.005  # a gap between completions longer than this counts as a freeze


@dataclass(frozen=True)
class ClientResult:
    completions: int
    seconds: float
    rate: float  # completions per wall-clock second
    unstalled_rate: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    loop: str


class _PingPong(asyncio.Protocol):
    def __init__(
        self, payload: bytes, deadline: float, record: array[float], done: asyncio.Future[None]
    ) -> None:
        self.payload = payload
        self.deadline = deadline
        self.record = record  # latency, completion time, latency, ...
        self.done = done
        self.got = 0
        self.started = 0.0
        self.transport: asyncio.WriteTransport = cast(asyncio.WriteTransport, None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        self.got = 0
        self.started = time.perf_counter()
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got < len(self.payload):
            return
        now = time.perf_counter()
        self.record.append(now - self.started)
        self.record.append(now)
        if now < self.deadline:
            self._send()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _drive(
    address: tuple[str, int], connections: int, size: int, duration: float
) -> tuple[array[float], int]:
    loop = asyncio.get_running_loop()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    record: array[float] = array("d")
    deadline = time.perf_counter() + duration
    done: list[asyncio.Future[None]] = []
    errors = 0
    for _ in range(connections):
        future: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(
                functools.partial(_PingPong, payload, deadline, record, future), *address
            )
        except OSError:
            errors += 1
            continue
        done.append(future)
    try:
        await asyncio.wait_for(asyncio.gather(*done), timeout=duration + 30)
    except TimeoutError:
        errors += sum(not f.done() for f in done)
    return record, errors


def _process(args: tuple[tuple[str, int], int, int, float, bool]) -> tuple[bytes, int, float, str]:
    address, connections, size, duration, use_uvloop = args
    loop_name = "asyncio"
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 (optional, and only in the client processes)

            uvloop.install()
            loop_name = "uvloop"
        except ImportError:
            pass
    started = time.perf_counter()
    record, errors = asyncio.run(_drive(address, connections, size, duration))
    return record.tobytes(), errors, time.perf_counter() - started, loop_name


def run(
    address: tuple[str, int],
    *,
    connections: int,
    size: int,
    duration: float,
    processes: int = 2,
    use_uvloop: bool = True,
) -> ClientResult:
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        parts = pool.map(_process, [(address, n, size, duration, use_uvloop) for n in shares])
    latencies: list[float] = []
    completions = 0
    unstalled_rate = 0.0
    errors = 0
    for raw, part_errors, _, _ in parts:
        values = array("d")
        values.frombytes(raw)
        part_latencies, times = values[0::2], sorted(values[1::2])
        latencies.extend(part_latencies)
        completions += len(times)
        gaps = [b - a for a, b in itertools.pairwise(times) if b - a < STALL]
        if gaps:
            unstalled_rate += len(gaps) / sum(gaps)
        errors += part_errors
    seconds = max(part[2] for part in parts)
    return ClientResult(
        completions=completions,
        seconds=duration,
        rate=completions / duration if duration else 0.0,
        unstalled_rate=unstalled_rate,
        p50_ms=_quantile(latencies, 0.5) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
        p999_ms=_quantile(latencies, 0.999) * 1000,
        errors=errors,
        loop=parts[0][3] if seconds else "none",
    )


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, int(q * 1000) - 1)]
