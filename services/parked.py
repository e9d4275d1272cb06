"""Where parked connections wait for their next event (`ready` dispatch): an epoll set
of their own, each connection armed for one event at a time (EPOLLONESHOT).

An event disarms its connection, so a connection in a worker is never reported, and
the worker that served it arms it again before it parks it. The pool's leader waits
on the set itself (`wait`) and serves what it takes (`services/drain.py`): the event
loop's thread never touches a message, and a message costs no thread wake-up but the
one the kernel makes for the leader.
"""

from __future__ import annotations

import contextlib
import select
import socket

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
        # Readable once `interrupt()` is called, and then for good (level-triggered):
        # whoever waits on the set, now or later, returns at once.
        self._interrupt_reader, self._interrupt_writer = socket.socketpair()
        try:
            self._epoll.register(self._interrupt_reader.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._epoll.close()
        self._interrupt_reader.close()
        self._interrupt_writer.close()

    def interrupt(self) -> None:
        """End every wait on the set, now and from now on. Never raises."""
        with contextlib.suppress(OSError):  # full or closed: it is readable already
            self._interrupt_writer.send(b"\0")

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

    def wait(self, timeout: float, most: int) -> list[Connection]:
        """Connections with an event, at most `most`, waiting up to `timeout` seconds for
        the first (0: not at all). Each is disarmed now: one that is not served must be
        armed again. Empty once interrupted; ValueError once closed."""
        by_fd = self._by_fd
        return [conn for fd, _ in self._epoll.poll(timeout, most) if (conn := by_fd.get(fd))]
