"""The SMTP sender: one connection per worker thread, reused across messages.

Plain Python, no Prefect: the flow layer turns an EmailServerCredentials block (if one is named
by ONBOARD_SMTP_BLOCK) into settings, builds one message per tenant and calls
`MailSender.send` from its worker threads. Retries are the caller's job: `send` raises
`TransientMailError` (worth retrying) or `PermanentMailError` (not) and never retries a message
itself, except for reconnecting once when a reused connection turns out to be dead before any
of the message was handed over.

The authorize link is in the message body only: never in a log line, an error or a repr.
"""

from __future__ import annotations

import contextlib
import copy
import email.errors
import email.policy
import io
import logging
import os
import smtplib
import socket
import ssl
import threading
import time
import types
from base64 import b64encode
from collections.abc import Iterable
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import getaddresses

from pydantic import SecretStr

from onboarding.errors import (
    InputError,
    MailAuthError,
    MailError,
    MailTlsError,
    PermanentMailError,
    Problem,
    TransientMailError,
    UnsafeMessageError,
)
from onboarding.mail.message import has_line_break
from onboarding.mail.smtp_settings import SendSettings, check_for_sending
from onboarding.settings import SETTINGS_SOURCE, Security, SmtpServerSettings, SmtpSettings

log = logging.getLogger(__name__)

# A connection idle for longer than this is checked with NOOP before use; a fresher one is used
# straight away (and replaced once if the server turns out to have closed it).
IDLE_CHECK_SECONDS = 30.0
REPLY_TEXT_LIMIT = 300


def _reply_text(raw: bytes | str, secrets: Iterable[str] = ()) -> str:
    """A server reply fit for an error message: decoded, on one line, secrets masked, short."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    if len(text) > REPLY_TEXT_LIMIT:
        text = text[: REPLY_TEXT_LIMIT - 1] + "…"
    return text


@dataclass(eq=False)
class _Connection:
    smtp: smtplib.SMTP
    last_used: float
    closed: bool = False


class _StaleConnection(Exception):
    """A reused connection was found dead before DATA: reconnect and try once more."""


class MailSender:
    """Sends messages over SMTP, one connection per thread, reused across messages.

    We do not use prefect-email's `email_send_message`: it opens a new connection (TCP, TLS
    handshake and AUTH) for every message, which is slow and trips per-connection rate limits
    on a batch of thousands, and it sets no timeout, so a server that stops answering holds a
    worker thread forever.

    Thread-safe: each thread gets its own connection (smtplib connections are not safe to
    share). `close()` closes every connection; call it once the threads are done sending.
    """

    def __init__(
        self,
        *,
        host: str | None,
        port: int | None = None,
        username: str | None = None,
        password: str | SecretStr | None = None,
        security: Security = "starttls",
        timeout: float = 30.0,
        email_from: str | None,
        ca_file: str | os.PathLike[str] | None = None,
        local_hostname: str | None = None,
        idle_check_seconds: float = IDLE_CHECK_SECONDS,
    ) -> None:
        """Settings given in code (a Prefect block's values, a test's); `from_settings` takes the
        environment's (the settings root's `smtp` section). Both are checked in
        `onboarding.mail.smtp_settings`, and only there."""
        settings = SmtpServerSettings.of(
            host=host,
            port=port or None,  # 0 or None: the security mode's usual port
            username=username,
            password=password,
            security=security,
            timeout=timeout,
            email_from=email_from,
            ca_file=os.fspath(ca_file) if ca_file else None,
        )
        self._use(check_for_sending(settings), local_hostname, idle_check_seconds)

    @classmethod
    def from_settings(cls, settings: SmtpSettings) -> MailSender:
        """The sender the environment's SMTP settings (the settings root's `smtp`) describe."""
        if not settings.host and settings.block:
            raise InputError(
                [Problem(SETTINGS_SOURCE, None, "ONBOARD_SMTP_HOST", "is not set")],
                hint=f"ONBOARD_SMTP_BLOCK={settings.block!r} names a Prefect block: the flow "
                "reads the server from it; build the sender from the block's values.",
            )
        sender = cls.__new__(cls)
        sender._use(check_for_sending(settings), None, IDLE_CHECK_SECONDS)
        return sender

    def _use(
        self, checked: SendSettings, local_hostname: str | None, idle_check_seconds: float
    ) -> None:
        self.host = checked.host
        self.port = checked.port
        self.username = checked.username
        self.security: Security = checked.security
        self.timeout = checked.timeout
        self.email_from = checked.email_from
        self.ca_file = checked.ca_file
        self.idle_check_seconds = idle_check_seconds
        self._password = checked.password
        self._envelope_from = checked.envelope_from
        self._tls = checked.tls
        self._local_hostname = local_hostname
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []

    def __repr__(self) -> str:
        return (
            f"MailSender(host={self.host!r}, port={self.port}, security={self.security!r}, "
            f"username={self.username!r}, email_from={self.email_from!r})"
        )

    def __enter__(self) -> MailSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: EmailMessage) -> None:
        """Send one message; raise TransientMailError, PermanentMailError or UnsafeMessageError.

        Envelope sender: the configured From address. Recipients: To, Cc and Bcc.
        """
        for name, value in message.items():
            if has_line_break(str(value)):
                raise UnsafeMessageError(name)
        recipients = [
            addr
            for _name, addr in getaddresses(
                [str(v) for h in ("To", "Cc", "Bcc") for v in message.get_all(h, [])]
            )
            if addr
        ]
        if not recipients:
            raise ValueError("the message has no recipient (To, Cc or Bcc)")
        utf8 = not all(a.isascii() for a in [self._envelope_from, *recipients])
        data = _flatten(message, utf8=utf8)

        conn, fresh = self._connection()
        try:
            self._transact(conn, recipients, data, utf8, reused=not fresh)
        except _StaleConnection:
            log.info("SMTP connection to %s:%s was closed by the server; reconnecting", *self._at)
            self._discard(conn)
            conn, _ = self._connection()
            self._transact(conn, recipients, data, utf8, reused=False)
        log.debug("SMTP server %s:%s accepted %s", self.host, self.port, message["Message-ID"])

    @property
    def _at(self) -> tuple[str, int]:
        return self.host, self.port

    def _transact(
        self, conn: _Connection, recipients: list[str], data: bytes, utf8: bool, *, reused: bool
    ) -> None:
        smtp = conn.smtp
        step = "MAIL FROM"
        try:
            options: list[str] = []
            if utf8:
                if not smtp.has_extn("smtputf8"):
                    raise PermanentMailError(
                        f"SMTP server {self.host}:{self.port} does not offer SMTPUTF8, which an "
                        "address with non-ASCII characters before the @ needs"
                    )
                options = ["SMTPUTF8", "BODY=8BITMIME"]
            code, reply = smtp.mail(self._envelope_from, options)
            if code == 421 and reused:
                # A server closing an idle connection often says 421 first.
                raise _StaleConnection
            if code != 250:
                raise self._reply_error(conn, code, reply, step)
            step = "RCPT TO"
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    # All or nothing: never deliver to some recipients and fail the rest.
                    raise self._reply_error(conn, code, reply, step)
            step = "DATA"
            code, reply = smtp.data(data)
            if code != 250:
                raise self._reply_error(conn, code, reply, step)
        except smtplib.SMTPServerDisconnected as err:
            self._discard(conn)
            # Before DATA nothing of the message was handed over: a new connection is safe.
            # In DATA the server may have queued it already: only the caller may decide.
            if reused and step != "DATA":
                raise _StaleConnection from err
            raise self._error(err, step) from err
        except smtplib.SMTPResponseException as err:  # e.g. DATA answered with a 4xx/5xx
            raise self._reply_error(conn, err.smtp_code, err.smtp_error, step) from err
        except (smtplib.SMTPException, OSError) as err:
            self._discard(conn)
            raise self._error(err, step) from err
        finally:
            conn.last_used = time.monotonic()

    def _reply_error(
        self, conn: _Connection, code: int, reply: bytes | str, step: str
    ) -> MailError:
        """The error for a refusal; the connection is reset for the next message or dropped."""
        if code == 421 or not 400 <= code < 600:
            self._discard(conn)  # 421: the server is closing the connection
        else:
            try:
                conn.smtp.rset()
            except (smtplib.SMTPException, OSError):
                self._discard(conn)
        return self._from_reply(code, reply, step)

    def _from_reply(self, code: int, reply: bytes | str, step: str) -> MailError:
        message = f"SMTP {code} {_reply_text(reply, self._secrets)} (reply to {step})"
        if 500 <= code < 600:
            cls: type[MailError] = MailAuthError if step == "AUTH" else PermanentMailError
            return cls(message, smtp_code=code)
        # 4xx, and anything a server should not have said here: try again later.
        return TransientMailError(message, smtp_code=code)

    def _error(self, err: BaseException, step: str) -> MailError:
        """Map an smtplib/socket/ssl exception raised at `step` to a MailError."""
        where = f"{self.host}:{self.port}"
        if isinstance(err, smtplib.SMTPRecipientsRefused) and err.recipients:
            code, reply = next(iter(err.recipients.values()))
            return self._from_reply(code, reply, "RCPT TO")
        if isinstance(err, smtplib.SMTPResponseException):
            return self._from_reply(err.smtp_code, err.smtp_error, step)
        if isinstance(err, smtplib.SMTPServerDisconnected):
            if isinstance(err.__context__, TimeoutError):
                return TransientMailError(
                    f"SMTP server {where} did not answer within {self.timeout:g} s ({step})"
                )
            return TransientMailError(f"SMTP server {where} closed the connection ({step})")
        if isinstance(err, smtplib.SMTPNotSupportedError) and step == "STARTTLS":
            return MailTlsError(f"SMTP server {where} does not offer STARTTLS")
        if isinstance(err, smtplib.SMTPException) and step == "AUTH":
            # Not offered (often: AUTH only after TLS), or no mechanism in common.
            return MailAuthError(f"cannot log in to SMTP server {where}: {err}")
        if isinstance(err, ssl.SSLCertVerificationError):
            return MailTlsError(
                f"TLS certificate of SMTP server {where} failed verification: "
                f"{err.verify_message or err.reason} (trust a private CA with "
                "ONBOARD_SMTP_CA_FILE)"
            )
        if isinstance(err, ssl.SSLError) and not isinstance(
            err, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            hint = ""
            if err.reason == "WRONG_VERSION_NUMBER":
                hint = " (is ONBOARD_SMTP_SECURITY right for this port? 465: ssl, 587: starttls)"
            return MailTlsError(f"TLS with SMTP server {where} failed: {err.reason}{hint}")
        if isinstance(err, TimeoutError):
            return TransientMailError(
                f"SMTP server {where} did not answer within {self.timeout:g} s ({step})"
            )
        if isinstance(err, OSError) and not isinstance(err, smtplib.SMTPException):
            why = err.strerror or type(err).__name__
            return TransientMailError(f"cannot reach SMTP server {where} ({step}): {why}")
        return PermanentMailError(f"SMTP {step} with {where} failed: {type(err).__name__}: {err}")

    @property
    def _secrets(self) -> list[str]:
        """What must never show in an error: the password and how AUTH PLAIN/LOGIN encode it."""
        password = self._password.get_secret_value()
        if not password:
            return []
        plain = f"\0{self.username}\0{password}".encode()
        return [password, b64encode(password.encode()).decode(), b64encode(plain).decode()]

    # -- connections --------------------------------------------------------------------------

    def _connection(self) -> tuple[_Connection, bool]:
        """This thread's connection and whether it is new; opens one if needed."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            if time.monotonic() - conn.last_used <= self.idle_check_seconds:
                return conn, False
            if self._alive(conn):
                return conn, False
            log.info("SMTP connection to %s:%s went stale while idle; reconnecting", *self._at)
            self._discard(conn)
        conn = self._open()
        self._local.conn = conn
        return conn, True

    def _alive(self, conn: _Connection) -> bool:
        try:
            return conn.smtp.noop()[0] == 250
        except (smtplib.SMTPException, OSError):
            return False

    def _open(self) -> _Connection:
        if self._local_hostname is None:
            self._local_hostname = socket.getfqdn()
        step = "connect"
        smtp: smtplib.SMTP | None = None
        try:
            if self.security == "ssl":
                smtp = smtplib.SMTP_SSL(
                    self.host,
                    self.port,
                    local_hostname=self._local_hostname,
                    timeout=self.timeout,
                    context=self._tls,
                )
            else:
                smtp = smtplib.SMTP(
                    self.host, self.port, local_hostname=self._local_hostname, timeout=self.timeout
                )
            step = "EHLO"
            smtp.ehlo_or_helo_if_needed()
            if self.security == "starttls":
                step = "STARTTLS"
                smtp.starttls(context=self._tls)
                step = "EHLO"
                smtp.ehlo_or_helo_if_needed()
            if self.username:
                step = "AUTH"
                smtp.login(self.username, self._password.get_secret_value())
        except (smtplib.SMTPException, OSError) as err:
            if smtp is not None:
                _close_quietly(smtp)
            error = self._error(err, step)
            if step == "AUTH":
                # smtplib's own exception may carry the server's echo of what we sent.
                raise error from None
            raise error from err
        conn = _Connection(smtp=smtp, last_used=time.monotonic())
        with self._lock:
            self._connections.append(conn)
        log.debug("opened SMTP connection to %s:%s (%s)", self.host, self.port, self.security)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.closed = True
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        _close_quietly(conn.smtp)

    def close(self) -> None:
        """Say QUIT on, and close, every connection any thread opened. Safe to call twice."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.closed = True
            try:
                if conn.smtp.sock is not None:
                    conn.smtp.sock.settimeout(min(self.timeout, 5.0))
                conn.smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            finally:
                _close_quietly(conn.smtp)


def _close_quietly(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        smtp.close()


def _flatten(message: EmailMessage, *, utf8: bool) -> bytes:
    """The message as SMTP DATA wants it: CRLF line ends, Bcc removed."""
    policy = message.policy if isinstance(message.policy, EmailPolicy) else email.policy.SMTP
    policy = policy.clone(linesep="\r\n", utf8=utf8)
    if "Bcc" in message or "Resent-Bcc" in message:
        message = copy.copy(message)
        del message["Bcc"]
        del message["Resent-Bcc"]
    out = io.BytesIO()
    try:
        BytesGenerator(out, policy=policy).flatten(message, linesep="\r\n")
    except (ValueError, email.errors.MessageError):
        # Newer Pythons refuse, on writing, a header that would fold into an injected line.
        raise UnsafeMessageError("", "a header cannot be written without a line break") from None
    return out.getvalue()
