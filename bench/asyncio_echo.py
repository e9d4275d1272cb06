"""The asyncio reference: a stdlib asyncio streams echo server (the stdlib event loop).

python -m bench.asyncio_echo PORT --ready-file PATH    (0 picks a free port)

Like every peer it listens on 127.0.0.1, or on ECHO_PEER_HOST (0.0.0.0 in its
container: `make flood-peers-containers`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable

from services.readyfile import write_ready_file


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


PEER_HOST = os.environ.get("ECHO_PEER_HOST", "127.0.0.1")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def main(port: int, ready_file: str | None, handler: Handler = handle) -> None:
    server = await asyncio.start_server(handler, PEER_HOST, port, backlog=1024)
    if ready_file:
        write_ready_file(ready_file, ("127.0.0.1", server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


def run(handler: Handler) -> None:
    """PORT [--ready-file PATH] from the command line, then serve until killed."""
    ready = sys.argv[3] if sys.argv[2:3] == ["--ready-file"] else None
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0, ready, handler))


if __name__ == "__main__":
    run(handle)
