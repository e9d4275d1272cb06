"""The threading models, by the name used on the command line."""

from __future__ import annotations

from services.base import Server
from services.models.executor import ExecutorServer
from services.models.queue_pool import QueueServer
from services.models.threads import ThreadPerConnectionServer

MODELS: dict[str, type[Server]] = {
    "executor": ExecutorServer,
    "queue": QueueServer,
    "threads": ThreadPerConnectionServer,
}
