"""A timed, verifying echo client: one round trip, byte for byte, failures classified.

Kept free of locust so the flood tool's probe and the tests use the same code.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass

from loadtest.lazy import LazyConnection

FAILURE_KINDS = ("mismatch", "timeout", "reset", "refused", "closed", "error")
_BLOCK = random.Random(1).randbytes(1 << 20)  # payload material, sliced at random offsets


class EchoFailure(Exception):
    """A failed round trip; its repr is just the kind, so locust groups failures by kind."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return self.kind

    def __repr__(self) -> str:
        return self.kind


def classify(error: BaseException) -> EchoFailure:
    if isinstance(error, EchoFailure):
        return error
    if isinstance(error, TimeoutError):
        return EchoFailure("timeout", str(error))
    if isinstance(error, ConnectionRefusedError):
        return EchoFailure("refused", str(error))
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return EchoFailure("reset", str(error))
    return EchoFailure("error", f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class PayloadSize:
    """A fixed size ("1024") or an inclusive range ("64-4096"), in bytes."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> PayloadSize:
        low_text, _, high_text = text.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise ValueError(f"payload size {text!r}: expected N or LOW-HIGH bytes") from None
        if not 8 <= low <= high <= len(_BLOCK):
            raise ValueError(f"payload size {text!r}: must be within 8-{len(_BLOCK)} bytes")
        return cls(low, high)

    def pick(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def make_payload(sequence: int, size: int, rng: random.Random) -> bytes:
    """Random bytes that start with a sequence number, so a late echo of an earlier
    message can never pass for this one."""
    start = rng.randrange(0, len(_BLOCK) - size + 1)
    return struct.pack("!Q", sequence) + _BLOCK[start : start + size - 8]


def exchange(sock: socket.socket, payload: bytes) -> None:
    """Send `payload` and read exactly as many bytes back; raise `EchoFailure` if they differ."""
    sock.sendall(payload)
    view = memoryview(bytearray(len(payload)))
    got = 0
    while got < len(payload):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EchoFailure("closed", f"peer closed after {got} of {len(payload)} bytes")
        got += n
    if view != payload:
        offset = next(i for i, (a, b) in enumerate(zip(view, payload, strict=True)) if a != b)
        raise EchoFailure("mismatch", f"first differing byte at offset {offset} of {len(payload)}")


@dataclass(frozen=True)
class Result:
    kind: str  # "connect" or "echo"
    seconds: float
    nbytes: int
    failure: EchoFailure | None


class EchoClient:
    """Round trips on a persistent per-thread connection; reconnects after any failure."""

    def __init__(self, address: tuple[str, int], timeout: float, seed: int | None = None) -> None:
        self.connection = LazyConnection(address, timeout)
        self._rng = random.Random(seed)
        self._sequence = 0

    def echo(self, size: int) -> list[Result]:
        """One round trip of `size` bytes: a connect result (if one was needed) and the echo's."""
        results = []
        if not self.connection.connected:
            started = time.perf_counter()
            try:
                self.connection.get()
            except OSError as error:
                return [Result("connect", time.perf_counter() - started, 0, classify(error))]
            results.append(Result("connect", time.perf_counter() - started, 0, None))
        self._sequence += 1
        payload = make_payload(self._sequence, size, self._rng)
        started = time.perf_counter()
        try:
            exchange(self.connection.get(), payload)
        except (OSError, EchoFailure) as error:
            # The stream is out of step after any failure: start a fresh one.
            self.connection.discard()
            results.append(Result("echo", time.perf_counter() - started, 0, classify(error)))
        else:
            results.append(Result("echo", time.perf_counter() - started, len(payload), None))
        return results

    def close(self) -> None:
        self.connection.discard()
