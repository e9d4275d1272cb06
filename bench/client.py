"""The bench client: N persistent connections playing ping-pong as fast as the server allows.

Lean on purpose, so that it is not the bottleneck. Where the machine has a C
compiler the client is `pingpong.c`, one epoll loop per process that checks every
echoed byte; a uvloop client here topped out below the C server, so it measured
itself. Otherwise: asyncio protocols (no streams) on uvloop where it is installed.
Either way the connections are split over several processes, each of which
records every round trip's latency and completion time, and each process can be
kept to given CPUs (so the client does not run on the server's).

Throughput is reported twice. Raw: completions / wall time. Unstalled: this
machine freezes processes for milliseconds to seconds at a time, so the
completions that follow the previous one by less than `STALL` are counted and
divided by the sum of those gaps only: the rate while nothing was frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from array import array
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
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
    # The client's own CPU time per round trip: one process drives at most 1e6/this per s.
    client_cpu_us: float


class _PingPong(asyncio.Protocol):
    """One connection: send the payload, check the echo byte for byte, repeat until the
    deadline. `done` gets True when it ended there, False when an echo was wrong or cut."""

    def __init__(
        self, payload: bytes, deadline: float, record: array[float], done: asyncio.Future[bool]
    ) -> None:
        self.payload = memoryview(payload)
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

    def _end(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        end = self.got + len(data)
        if self.payload[self.got : end] != data:  # wrong bytes, or more than was sent
            self._end(ok=False)
            return
        self.got = end
        if self.got < len(self.payload):
            return
        now = time.perf_counter()
        self.record.append(now - self.started)
        self.record.append(now)
        if now < self.deadline:
            self._send()
        else:
            self._end(ok=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():  # the server closed first: the echo in flight is lost
            self.done.set_result(False)


async def _drive(
    address: tuple[str, int], connections: int, size: int, duration: float
) -> tuple[array[float], int]:
    loop = asyncio.get_running_loop()
    payload = bytes(i % 256 for i in range(size))  # as pingpong.c sends
    record: array[float] = array("d")
    deadline = time.perf_counter() + duration
    done: list[asyncio.Future[bool]] = []
    errors = 0
    for _ in range(connections):
        future: asyncio.Future[bool] = loop.create_future()
        try:
            await loop.create_connection(
                functools.partial(_PingPong, payload, deadline, record, future), *address
            )
        except OSError:
            errors += 1
            continue
        done.append(future)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*done), timeout=duration + 30)
    errors += sum(not (f.done() and not f.cancelled() and f.result()) for f in done)
    return record, errors


def _process(
    args: tuple[tuple[str, int], int, int, float, bool, Set[int] | None],
) -> tuple[bytes, int, float, str]:
    address, connections, size, duration, use_uvloop, cpus = args
    if cpus:
        os.sched_setaffinity(0, cpus)
    loop_name = "asyncio"
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 (optional, and only in the client processes)

            uvloop.install()
            loop_name = "uvloop"
        except ImportError:
            pass
    before = _cpu_seconds()
    record, errors = asyncio.run(_drive(address, connections, size, duration))
    return record.tobytes(), errors, _cpu_seconds() - before, loop_name


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _native(
    binary: Path,
    address: tuple[str, int],
    shares: list[int],
    *,
    size: int,
    duration: float,
    cpus: Set[int] | None,
) -> list[tuple[bytes, int, float, str]]:
    """Run one `pingpong` process per share, side by side, and collect their records."""
    with tempfile.TemporaryDirectory(prefix="bench-client-") as scratch:
        outputs = [Path(scratch) / f"{i}.bin" for i in range(len(shares))]
        processes = [
            subprocess.Popen(  # noqa: S603 (our own binary)
                [
                    str(binary),
                    address[0],
                    str(address[1]),
                    str(n),
                    str(size),
                    str(duration),
                    str(out),
                ],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # noqa: PLW1509
            )
            for n, out in zip(shares, outputs, strict=True)
        ]
        parts = []
        for process, out in zip(processes, outputs, strict=True):
            stdout, _ = process.communicate(timeout=duration + 60)
            if process.returncode != 0:
                raise RuntimeError(f"{binary.name} exited with {process.returncode}")
            _, errors, cpu = stdout.split()
            parts.append((out.read_bytes(), int(errors), float(cpu), "c-epoll"))
        return parts


def run(
    address: tuple[str, int],
    *,
    connections: int,
    size: int,
    duration: float,
    processes: int = 2,
    use_uvloop: bool = True,
    binary: Path | None = None,
    cpus: Set[int] | None = None,
) -> ClientResult:
    """Drive the server at `address`; `binary` is the compiled pingpong client (None: the
    Python one); `cpus` keeps every client process to those CPUs (None: anywhere)."""
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    if binary is not None:
        parts = _native(binary, address, shares, size=size, duration=duration, cpus=cpus)
    else:
        context = multiprocessing.get_context("fork")
        with context.Pool(processes) as pool:
            parts = pool.map(
                _process, [(address, n, size, duration, use_uvloop, cpus) for n in shares]
            )
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
    return ClientResult(
        completions=completions,
        seconds=duration,
        rate=completions / duration if duration else 0.0,
        unstalled_rate=unstalled_rate,
        p50_ms=_quantile(latencies, 0.5) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
        p999_ms=_quantile(latencies, 0.999) * 1000,
        errors=errors,
        loop=parts[0][3],
        client_cpu_us=1e6 * sum(part[2] for part in parts) / max(completions, 1),
    )


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, int(q * 1000) - 1)]
