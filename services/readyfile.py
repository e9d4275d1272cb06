"""The ready file (`--ready-file`): where a started server says it listens, for whoever
launched it (`harness.launcher`) to find ports chosen by the kernel (port 0)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_ready_file(
    path: str, echo: tuple[str, int], metrics: tuple[str, int] | None = None
) -> None:
    """Atomically (write, then rename): a reader never sees half of it."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump({"pid": os.getpid(), "echo": list(echo), "metrics": metrics}, out)
    os.replace(partial, path)


def read_ready_file(path: str) -> tuple[tuple[str, int], tuple[str, int] | None]:
    """(echo address, metrics address or None) from a ready file."""
    with open(path, encoding="utf-8") as ready_file:
        ready: dict[str, Any] = json.load(ready_file)
    echo = (str(ready["echo"][0]), int(ready["echo"][1]))
    metrics = ready.get("metrics")
    return echo, (str(metrics[0]), int(metrics[1])) if metrics else None
