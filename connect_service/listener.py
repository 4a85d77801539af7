"""The listener `onboard connect-server --workers N` shares between its workers, and the HTTP
protocol each of them speaks on it (h11, with a limit on the time to send a request's
headers)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class TcpConfig(uvicorn.Config):
    """uvicorn's Config, whose listener says it is TCP. uvicorn's bind_socket leaves the
    socket's protocol at 0; asyncio turns TCP_NODELAY on only for accepted sockets whose
    protocol is IPPROTO_TCP; so with several workers every answer with a body waited about
    40 ms on the client's delayed ACK (uvicorn issue 3149, open): 121 ms added per click at 2
    workers where 1 worker adds 39 (bench/connect.py --concurrency 1). One worker was not
    affected: asyncio builds its listener itself. Module-level: workers are spawned, and
    their Config pickled.

    `header_timeout`: seconds a connection may take to send a request's headers (read by
    HeaderTimeoutH11Protocol); None for no limit."""

    def __init__(self, *args: Any, header_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto:
            return sock
        tcp = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, sock.detach())
        tcp.set_inheritable(True)
        return tcp


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two limits on a request's line and headers: the time to
    send them (`config.header_timeout` seconds from the connection's opening, or from its
    last answer; then the connection is closed) and their size
    (`config.h11_max_incomplete_event_size` bytes; else a 431 and the connection closed).

    uvicorn (0.54) has no header timeout of its own: its keep-alive timer stops at a
    connection's first byte, so a client sending its headers a byte at a time (slowloris)
    held a connection, and a worker's file descriptors, for as long as it liked. A timer is
    armed when the connection is made and after each answer, and cancelled once a request's
    headers are complete (uvicorn has then made the request's cycle). And h11 applies its
    size limit only to headers still incomplete in its buffer: ones that arrive in one read
    (asyncio reads up to 256 KiB) passed whatever their size. A subclass of the protocol
    class is what uvicorn's `http=` takes; h11's, because httptools has no size limit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout: float | None = getattr(self.config, "header_timeout", None)
        self._header_timer: asyncio.TimerHandle | None = None
        self._max_head: int | None = self.config.h11_max_incomplete_event_size
        self._head_bytes = 0  # received since the timer was armed

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        if self._header_timeout is not None and self._awaiting_headers():
            self._header_timer = self.loop.call_later(self._header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            host = self.client[0] if self.client else "-"
            log.info(
                "closed a connection from %s: no complete request headers within %g s",
                host,
                self._header_timeout,
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers() and self._head_too_large(data):
            self._refuse_head()
            return
        super().data_received(data)
        if self._header_timer is not None and not self._awaiting_headers():
            self._disarm()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request line and headers being received are over the size limit.
        Counted first (no copy while under the limit), then looked for in h11's buffer."""
        self._head_bytes += len(data)
        if self._max_head is None or self._head_bytes <= self._max_head:
            return False
        pending = self.conn.trailing_data[0] + data
        end = pending.find(b"\r\n\r\n")
        return (end + 4 if end >= 0 else len(pending)) > self._max_head

    def _refuse_head(self) -> None:
        host = self.client[0] if self.client else "-"
        log.info(
            "refused a request from %s: request line and headers over %d bytes",
            host,
            self._max_head,
        )
        self._disarm()
        # Written as is: h11 has no request to answer (it was never given the headers).
        body = b"Request line and headers too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm()  # the connection is the websocket protocol's from now on
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
