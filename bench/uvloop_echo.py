"""The uvloop references: an echo server on uvloop's event loop, as streams or as a protocol.

python -m bench.uvloop_echo streams|protocol PORT --ready-file PATH    (0 picks a free port)

Streams is what an asyncio application would write; a protocol skips the stream
layer and is about as fast as Python's event loops get.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

import uvloop

from bench.asyncio_echo import PEER_HOST
from bench.asyncio_echo import handle as echo_stream
from services.readyfile import write_ready_file


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def main(kind: str, port: int, ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    if kind == "protocol":
        server = await loop.create_server(EchoProtocol, PEER_HOST, port, backlog=1024)
    else:
        server = await asyncio.start_server(echo_stream, PEER_HOST, port, backlog=1024)
    if ready_file:
        write_ready_file(ready_file, ("127.0.0.1", server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    ready = sys.argv[4] if sys.argv[3:4] == ["--ready-file"] else None
    uvloop.run(main(kind, port, ready))
