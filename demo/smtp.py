"""The demo's SMTP server: writes every message it takes, on a loopback address, to an .eml file.

For `onboard demo` and tests only. It needs aiosmtpd, which is in the `demo` dependency group,
not in the product's dependencies: nothing in `onboarding.mail` imports this module.
"""

from __future__ import annotations

import asyncio
import email.policy
import logging
import os
import re
import threading
import types
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session

log = logging.getLogger(__name__)


class _Controller(Controller):
    """aiosmtpd's threaded controller, able to listen on port 0 (any free port)."""

    def _trigger_server(self) -> None:
        if self.port == 0 and isinstance(self.server, asyncio.Server):
            self.port = int(self.server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._@+-]+")


class _EmlWriter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = []
        self._next = len(list(folder.glob("*.eml"))) + 1
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message_id = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)["Message-ID"]
        safe = _UNSAFE_FILENAME.sub("_", str(message_id or "").strip().strip("<>"))[:120]
        with self._lock:
            n, self._next = self._next, self._next + 1
        path = self.folder / f"{n:04d}-{safe or 'no-message-id'}.eml"
        tmp = path.with_name(path.name + ".part")
        try:
            # 0600: the message holds the tenant's live link.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as file:
                file.write(raw)
            os.replace(tmp, path)
        except OSError:
            log.exception("cannot write %s", path)
            return "451 4.3.0 Cannot store the message"
        self.files.append(path)
        return "250 2.0.0 Message accepted"


class LocalSmtpServer:
    """A local SMTP server that writes each message it receives to <n>-<message-id>.eml.

    For `onboard demo`: plain SMTP (security none), no AUTH, on a loopback address. Use as a
    context manager; `.host` and `.port` are where to send, `.messages` how many arrived.
    """

    def __init__(self, folder: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0):
        self.folder = Path(folder)
        self.host = host
        self._port = port
        self._handler: _EmlWriter | None = None
        self._controller: _Controller | None = None

    @property
    def port(self) -> int:
        return self._controller.port if self._controller is not None else self._port

    @property
    def messages(self) -> int:
        return len(self._handler.files) if self._handler is not None else 0

    @property
    def files(self) -> list[Path]:
        return list(self._handler.files) if self._handler is not None else []

    def start(self) -> LocalSmtpServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        # aiosmtpd logs every DATA line at DEBUG: the messages carry the links.
        aiosmtpd_log = logging.getLogger("mail.log")
        if aiosmtpd_log.getEffectiveLevel() < logging.WARNING:
            aiosmtpd_log.setLevel(logging.WARNING)
        self._handler = _EmlWriter(self.folder)
        self._controller = _Controller(
            self._handler,
            hostname=self.host,
            port=self._port,
            server_hostname="localhost",
            enable_SMTPUTF8=True,
        )
        self._controller.start()
        log.info("demo SMTP server on %s:%s writes to %s", self.host, self.port, self.folder)
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._port = self._controller.port
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> LocalSmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()
