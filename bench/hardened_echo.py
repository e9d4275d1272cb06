"""The asyncio reference written for production, as the asyncio docs advise: a stdlib
streams echo server with timeouts (`asyncio.timeout`) and flow control honoured.

python -m bench.hardened_echo PORT --ready-file PATH    (0 picks a free port)

What `bench.asyncio_echo` (the naive one) lacks, and the attacks find:
- an idle timeout: a client that sends nothing for IDLE_TIMEOUT is closed (idle and
  slowloris floods otherwise hold descriptors for good);
- a send timeout: an echo the client does not take within SEND_TIMEOUT closes it;
  `drain()` waits while the transport's buffer is over its high-water mark (it
  honours `pause_writing`), so a slow reader holds WRITE_BUFFER at most;
- a connection cap: past MAX_CONNECTIONS a newcomer is closed at once, as nginx and
  Tomcat refuse at their limit, before descriptors run out.
The timeouts are the project's servers' defaults (10 s), so the flood table compares
the threading models, not the settings.
"""

from __future__ import annotations

import asyncio
import socket

from bench.asyncio_echo import run

IDLE_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
WRITE_BUFFER = 64 * 1024  # the transport's high-water mark: drain() waits above it
MAX_CONNECTIONS = 10_000  # the project's servers' default cap
_open = 0


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global _open  # noqa: PLW0603 (one event loop thread: no lock needed)
    _open += 1
    try:
        if _open > MAX_CONNECTIONS:
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            async with asyncio.timeout(SEND_TIMEOUT):
                await writer.drain()
    except (ConnectionError, TimeoutError):
        pass
    finally:
        _open -= 1
        writer.close()


if __name__ == "__main__":
    run(handle)
