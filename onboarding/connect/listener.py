"""The listener `onboard connect-server --workers N` shares between its workers."""

from __future__ import annotations

import socket

import uvicorn


class TcpConfig(uvicorn.Config):
    """uvicorn's Config, whose listener says it is TCP. uvicorn's bind_socket leaves the
    socket's protocol at 0; asyncio turns TCP_NODELAY on only for accepted sockets whose
    protocol is IPPROTO_TCP; so with several workers every answer with a body waited about
    40 ms on the client's delayed ACK (uvicorn issue 3149, open): 121 ms added per click at 2
    workers where 1 worker adds 39 (bench/connect.py --concurrency 1). One worker was not
    affected: asyncio builds its listener itself. Module-level: workers are spawned, and
    their Config pickled."""

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto:
            return sock
        tcp = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, sock.detach())
        tcp.set_inheritable(True)
        return tcp
