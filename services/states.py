"""The words for where a connection is and why it ended: one list each, used by the
dispatchers, the counters and the metrics' labels (`services/stats.py` draws the path)."""

from __future__ import annotations

from enum import Enum, StrEnum


class State(Enum):
    """Where an open connection is; each state but RESTING and CLOSED has its counter."""

    # Members are singletons: hashing by identity keeps a dict lookup by state in C.
    # Enum's own __hash__ is Python code, and the per-message path makes several.
    __hash__ = object.__hash__

    WAITING = "waiting"  # parked in the event loop until the client sends (ready dispatch)
    QUEUED = "queued"  # for a worker
    BUSY = "busy"  # on a worker
    WRITING = "writing"  # parked until the client takes its echo (ready dispatch)
    RESTING = "resting"  # writing, but not watched for a while (ready.WRITABLE_REST)
    CLOSED = "closed"


class Wait(Enum):
    """What a connection waits for after a worker's turn (`echo.echo_turn`)."""

    __hash__ = object.__hash__  # as State's

    READ = "read"  # the client's next bytes
    WRITE = "write"  # room for the echo the client has not taken


class Closed(StrEnum):
    """Why an admitted connection was closed (the label of echo_connections_closed_total)."""

    EOF = "eof"  # the client closed (everything it sent was echoed)
    IDLE = "idle"  # it sent nothing for the idle timeout
    SLOW_READER = "slow_reader"  # it took no echo for the send timeout, or over budget
    RESET = "reset"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    EVICTED = "evicted"  # at the cap, for a newcomer (ready dispatch, `make_room`)


class Rejected(StrEnum):
    """Why an accepted connection was never served (echo_connections_rejected_total)."""

    QUEUE_FULL = "queue_full"  # connection dispatch: workers and queue full
    AT_CAP = "at_cap"  # ready dispatch: at the cap, no one behind the minimum rate
    THREAD_START_FAILED = "thread_start_failed"
    OUT_OF_MEMORY = "out_of_memory"
    DISPATCH_FAILED = "dispatch_failed"
