"""A real, scriptable SMTP server for tests (aiosmtpd on 127.0.0.1, any free port).

    with SmtpTestServer(tls="starttls", auth=True) as server:
        server.on_rcpt("a@example.com", "421 4.7.0 Try again later")     # once, then accept
        server.on_rcpt("b@example.com", "550 5.1.1 <b@example.com>: mailbox unavailable",
                       always=True)
        server.on_data("c@example.com", DROP)                  # close the connection at DATA
        sender = MailSender(**server.sender_kwargs(), email_from="onboard@example.com")
        ...
        server.messages      # [Received], in arrival order
        server.connections   # TCP connections accepted (proves reuse)

TLS ("starttls" or "ssl") uses a certificate from a throwaway trustme CA; `ca_file` is that CA's
certificate, for the client to trust. AUTH (PLAIN and LOGIN) takes USER/PASSWORD only, and is
offered only once TLS is up. `SilentServer` accepts TCP connections and never says a word.
"""

from __future__ import annotations

import asyncio
import email.policy
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

DROP = "drop"  # a scripted reply: close the connection without answering

USER = "onboard-mailer"
PASSWORD = "correct-horse-battery-staple-42"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    auth_user: str | None

    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class _Controller(Controller):
    def __init__(self, owner: SmtpTestServer, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self.owner = owner

    def factory(self) -> SMTP:
        smtp: SMTP = super().factory()  # type: ignore[no-untyped-call]
        self.owner._connected(smtp)
        return smtp

    def _trigger_server(self) -> None:
        # Listening on port 0: learn the port before aiosmtpd's own probe connects to it.
        if self.port == 0 and isinstance(self.server, asyncio.Server):
            self.port = int(self.server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpTestServer:
    def __init__(
        self,
        *,
        tls: Literal["none", "starttls", "ssl"] = "none",
        auth: bool = False,
        ca: trustme.CA | None = None,
    ) -> None:
        self.tls = tls
        self.auth = auth
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[Received] = []
        self.connections = 0
        self.auth_attempts = 0
        self._live: list[SMTP] = []
        self._once: dict[tuple[str, str], deque[str]] = {}
        self._always: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="smtp-test-")
        self.ca = ca or trustme.CA()
        self.ca_file = Path(self._tmp.name) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._controller: _Controller | None = None

    # -- scripting ----------------------------------------------------------------------------

    def on_rcpt(self, address: str, *replies: str, always: bool = False) -> None:
        """Answer RCPT TO:<address> with these replies (SMTP lines or DROP), then accept."""
        self._script("rcpt", address, replies, always)

    def on_mail(self, sender: str, *replies: str, always: bool = False) -> None:
        """Answer MAIL FROM:<sender> with these replies (SMTP lines or DROP), then accept."""
        self._script("mail", sender, replies, always)

    def on_data(self, address: str, *replies: str, always: bool = False) -> None:
        """Answer the DATA of a message to `address` with these replies, then accept."""
        self._script("data", address, replies, always)

    def clear_script(self) -> None:
        """Forget every scripted reply: the server accepts everything from now on."""
        with self._lock:
            self._once.clear()
            self._always.clear()

    def _script(self, stage: str, address: str, replies: tuple[str, ...], always: bool) -> None:
        key = (stage, address.lower())
        with self._lock:
            if always:
                (self._always[key],) = replies
            else:
                self._once.setdefault(key, deque()).extend(replies)

    def _action(self, stage: str, address: str) -> str | None:
        key = (stage, address.lower())
        with self._lock:
            queue = self._once.get(key)
            if queue:
                return queue.popleft()
            return self._always.get(key)

    # -- aiosmtpd handler hooks ---------------------------------------------------------------

    def _connected(self, smtp: SMTP) -> None:
        with self._lock:
            self.connections += 1
            self._live.append(smtp)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        action = self._action("mail", address)
        if action == DROP:
            return await self._drop(server)
        if action:
            return action
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        action = self._action("rcpt", address)
        if action == DROP:
            return await self._drop(server)
        if action:
            return action
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        for address in envelope.rcpt_tos:
            action = self._action("data", address)
            if action == DROP:
                return await self._drop(server)
            if action:
                return action
        login = session.auth_data if session.authenticated else None
        user = login.login.decode() if isinstance(login, LoginPassword) else None
        with self._lock:
            self.messages.append(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                    tls=session.ssl is not None or self.tls == "ssl",
                    auth_user=user,
                )
            )
        return "250 2.0.0 OK: queued"

    async def _drop(self, server: SMTP) -> str:
        assert server.transport is not None
        server.transport.close()
        # connection_lost() cancels this session's task; nothing is ever answered.
        await asyncio.sleep(30)
        return "451 4.3.0 not reached"

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        self.auth_attempts += 1
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == USER.encode()
            and auth_data.password == PASSWORD.encode()
        )
        return AuthResult(success=ok, auth_data=auth_data if ok else None, handled=False)

    # -- control ------------------------------------------------------------------------------

    def sender_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for MailSender that reach this server (add email_from)."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "security": self.tls,
            "ca_file": self.ca_file if self.tls != "none" else None,
            "timeout": 5.0,
        }
        if self.auth:
            kwargs.update(username=USER, password=PASSWORD)
        kwargs.update(overrides)
        return kwargs

    def disconnect_all(self) -> None:
        """Close every open connection from the server side, as an idle timeout would."""
        assert self._controller is not None
        loop = self._controller.loop
        done = threading.Event()

        def close() -> None:
            for smtp in self._live:
                if smtp.transport is not None:
                    smtp.transport.close()
            self._live.clear()
            loop.call_later(0.05, done.set)  # let the closes reach the sockets

        loop.call_soon_threadsafe(close)
        assert done.wait(5)

    def start(self) -> SmtpTestServer:
        # aiosmtpd logs each DATA line at DEBUG; keep message bodies (links) out of test logs.
        logging.getLogger("mail.log").setLevel(logging.INFO)
        kwargs: dict[str, Any] = {}
        if self.tls != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            if self.tls == "ssl":
                kwargs["ssl_context"] = context
            else:
                kwargs.update(tls_context=context, require_starttls=True)
        if self.auth:
            # aiosmtpd counts only STARTTLS as TLS: on implicit TLS (the whole session is TLS)
            # it must be told not to require it, and then refuses to require AUTH.
            implicit = self.tls == "ssl"
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=not implicit,
                auth_require_tls=not implicit,
            )
        self._controller = _Controller(
            self, hostname=self.host, port=0, server_hostname="mx.test.local", **kwargs
        )
        self._controller.start()
        self.port = self._controller.port
        with self._lock:  # forget aiosmtpd's own start-up probe
            self.connections = 0
            self._live.clear()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        self._tmp.cleanup()

    def __enter__(self) -> SmtpTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SilentServer:
    """Accepts TCP connections and never sends a byte: an SMTP server that hangs."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.host = "127.0.0.1"
        self.port: int = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
