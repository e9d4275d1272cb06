"""Where parked connections wait for their next event (`ready` dispatch): an epoll set
of their own, each connection armed for one event at a time (EPOLLONESHOT).

An event disarms its connection, so a connection in a worker is never reported, and
the worker that served it arms it again (epoll_ctl is safe from any thread) before it
hands it back. So the loop's thread makes no system call per message: each one would
let go of the GIL, and with a pool of workers ready to take it the loop waited to get
it back while new connections piled up in the accept queue (docs/history/performance.md,
"The loop's system calls").

The set's own descriptor is readable while any connection in it has an event, so the
server's event loop watches it like any socket.
"""

from __future__ import annotations

import select

from services.connection import Connection
from services.states import State

READ = select.EPOLLIN | select.EPOLLONESHOT
WRITE = select.EPOLLOUT | select.EPOLLONESHOT
# What a connection parked in each state is armed for (a resting writer: nothing yet).
INTEREST = {State.WAITING: READ, State.WRITING: WRITE}


class ParkedSet:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        # Connections by descriptor; an entry goes before its socket closes, as the
        # number may be given to the next accepted connection at once.
        self._by_fd: dict[int, Connection] = {}

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()

    def add(self, conn: Connection, events: int) -> None:
        """Put a new connection in the set, armed for `events`; all or nothing."""
        self._by_fd[conn.fd] = conn
        try:
            self._epoll.register(conn.fd, events)
        except BaseException:
            del self._by_fd[conn.fd]
            raise

    def arm(self, conn: Connection, events: int) -> None:
        """Arm a connection in the set for its next event; by whoever owns it."""
        self._epoll.modify(conn.fd, events)

    def holds(self, conn: Connection) -> bool:
        return self._by_fd.get(conn.fd) is conn

    def forget(self, conn: Connection) -> None:
        """Before the connection's socket closes (closing takes it out of the epoll set).
        Never raises."""
        self._by_fd.pop(conn.fd, None)

    def with_events(self, most: int) -> list[Connection]:
        """Connections with an event, at most `most`, without waiting. Each is disarmed
        now: one that is not served must be armed again."""
        by_fd = self._by_fd
        return [conn for fd, _ in self._epoll.poll(0, most) if (conn := by_fd.get(fd))]
