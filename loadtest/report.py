"""Per-service summary of a locust run, the pass/fail verdict, and how they are printed."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.echo_client import FAILURE_KINDS


@dataclass(frozen=True)
class ServiceRow:
    service: str
    echoes: int
    echo_failures: int
    connects: int
    connect_failures: int
    requests_per_second: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def failure_ratio(self) -> float:
        attempts = self.echoes + self.connects
        failed = self.echo_failures + self.connect_failures
        return failed / attempts if attempts else 1.0


@dataclass(frozen=True)
class Thresholds:
    max_failure_ratio: float = 0.01


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: list[str]


def service_rows(stats: Any, services: list[str]) -> list[ServiceRow]:
    """Read locust's `RequestStats` into one row per service (duck-typed, for tests)."""
    failures: dict[str, dict[str, int]] = {s: dict.fromkeys(FAILURE_KINDS, 0) for s in services}
    for error in stats.errors.values():
        if error.name in failures:
            kind = str(error.error).strip("'\"")
            kind = kind if kind in FAILURE_KINDS else "error"
            failures[error.name][kind] += error.occurrences
    rows = []
    for service in services:
        echo = stats.get(service, "echo")
        connect = stats.get(service, "connect")
        rows.append(
            ServiceRow(
                service=service,
                echoes=echo.num_requests,
                echo_failures=echo.num_failures,
                connects=connect.num_requests,
                connect_failures=connect.num_failures,
                requests_per_second=echo.total_rps,
                mean_ms=echo.avg_response_time,
                p50_ms=echo.get_response_time_percentile(0.50) or 0.0,
                p95_ms=echo.get_response_time_percentile(0.95) or 0.0,
                p99_ms=echo.get_response_time_percentile(0.99) or 0.0,
                failures={k: v for k, v in failures[service].items() if v},
            )
        )
    return rows


def judge_load(rows: list[ServiceRow], thresholds: Thresholds) -> Verdict:
    reasons = []
    for row in rows:
        if row.failures.get("mismatch"):
            reasons.append(f"{row.service}: {row.failures['mismatch']} echo(es) came back wrong")
        if row.echoes - row.echo_failures == 0:
            reasons.append(f"{row.service}: no successful echo at all")
        elif row.failure_ratio > thresholds.max_failure_ratio:
            reasons.append(
                f"{row.service}: {row.failure_ratio:.1%} of requests failed "
                f"(limit {thresholds.max_failure_ratio:.1%})"
            )
    return Verdict(ok=not reasons, reasons=reasons)


def format_load_table(rows: list[ServiceRow]) -> str:
    header = (
        f"{'service':<10}{'echoes':>9}{'req/s':>9}{'mean ms':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'connects':>10}  failures by kind"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        failed = ", ".join(f"{kind} {count}" for kind, count in row.failures.items()) or "none"
        lines.append(
            f"{row.service:<10}{row.echoes:>9}{row.requests_per_second:>9.1f}"
            f"{row.mean_ms:>9.2f}{row.p50_ms:>9.0f}{row.p95_ms:>9.0f}{row.p99_ms:>9.0f}"
            f"{row.connects:>10}  {failed}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class LoadGenerator:
    """Who made the load: locust processes (workers, or 1), how many of them reported
    requests, and whether one passed 90% CPU (then the client limited the numbers)."""

    processes: int = 1
    with_requests: int = 1
    cpu_limited: bool = False


def write_summary(
    rows: list[ServiceRow],
    verdict: Verdict,
    json_path: str | None,
    generator: LoadGenerator | None = None,
) -> None:
    """Print the table and the verdict, and write them to `json_path` if given."""
    generator = generator or LoadGenerator()
    print(
        f"\n== echo load test: per service ({generator.processes} load process(es)) ==",
        file=sys.stderr,
    )
    print(format_load_table(rows), file=sys.stderr)
    if generator.cpu_limited:
        print(
            "note: a load generator passed 90% CPU: these numbers are limited by the client, "
            "not the servers (add workers: make load-master / load-worker)",
            file=sys.stderr,
        )
    if verdict.ok:
        print("result: PASS (every echo verified byte for byte)", file=sys.stderr)
    else:
        print("result: FAIL: " + "; ".join(verdict.reasons), file=sys.stderr)
    if json_path:
        document = {
            "ok": verdict.ok,
            "reasons": verdict.reasons,
            "workers": generator.processes,
            "workers_with_requests": generator.with_requests,
            "limited_by_load_generator": generator.cpu_limited,
            "services": [asdict(row) | {"failure_ratio": row.failure_ratio} for row in rows],
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(document, indent=2) + "\n")
