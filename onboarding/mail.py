"""Email delivery of authorize links: SMTP settings, templates, message building, a sender.

Plain Python, no Prefect: the flow layer turns an EmailServerCredentials block (if one is named
by ONBOARD_SMTP_BLOCK) into these values, builds one message per tenant and calls
`MailSender.send` from its worker threads. Retries are the caller's job: `send` raises
`TransientMailError` (worth retrying) or `PermanentMailError` (not) and never retries a message
itself, except for reconnecting once when a reused connection turns out to be dead before any
of the message was handed over.

The authorize link is a secret (its `state` is a CSRF token). It goes in the message body and
nowhere else: never in a header, a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.errors
import email.policy
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import smtplib
import socket
import ssl
import threading
import time
import types
from base64 import b64encode
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, getaddresses, parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from email_validator import EmailNotValidError, validate_email
from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    nodes,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onboarding.errors import InputError, OnboardingError, Problem
from onboarding.roster import Tenant

log = logging.getLogger(__name__)

Security = Literal["starttls", "ssl", "none"]
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "ssl": 465, "none": 25}
# A connection idle for longer than this is checked with NOOP before use; a fresher one is used
# straight away (and replaced once if the server turns out to have closed it).
IDLE_CHECK_SECONDS = 30.0
REPLY_TEXT_LIMIT = 300
_SETTINGS = "SMTP settings"


# --------------------------------------------------------------------------------------------
# Settings


class SmtpSettings(BaseSettings):
    """ONBOARD_SMTP_* and ONBOARD_EMAIL_FROM: the server the onboarding emails go through."""

    model_config = SettingsConfigDict(
        env_prefix="ONBOARD_SMTP_",
        env_file=".env",
        extra="ignore",
        env_ignore_empty=True,
        populate_by_name=True,
    )

    host: str | None = None
    # None: the usual port of the security mode (587 starttls, 465 ssl, 25 none).
    port: int | None = Field(None, gt=0, lt=65536)
    username: str | None = None
    password: SecretStr | None = None
    security: Security = "starttls"
    timeout: float = Field(30.0, gt=0)
    # Name of a prefect-email EmailServerCredentials block; resolved by the flow layer only.
    block: str | None = None
    # A PEM bundle of the CA(s) to trust instead of the system's, for a private CA.
    ca_file: str | None = None
    email_from: str | None = Field(None, validation_alias="ONBOARD_EMAIL_FROM")

    @model_validator(mode="after")
    def _default_port(self) -> SmtpSettings:
        if self.port is None:
            self.port = DEFAULT_PORTS[self.security]
        return self


# --------------------------------------------------------------------------------------------
# Errors


class MailError(OnboardingError):
    """Base of the mail errors. `smtp_code` is the server's reply code when there was one."""

    code = "smtp_error"

    def __init__(self, message: str, *, smtp_code: int | None = None) -> None:
        self.smtp_code = smtp_code
        super().__init__(message)


class TransientMailError(MailError):
    """Worth retrying later: a 4xx reply, a dropped connection, a timeout, a refused connect."""

    code = "smtp_transient"
    transient = True


class PermanentMailError(MailError):
    """Retrying will not help: a 5xx reply (550 unknown mailbox, 553, 554...)."""

    code = "smtp_rejected"


class MailAuthError(PermanentMailError):
    """The server refused our login (535), or cannot take one: fix the SMTP credentials."""

    code = "smtp_auth_failed"


class MailTlsError(PermanentMailError):
    """TLS could not be set up: certificate not trusted, no STARTTLS, a TLS/plain port mix-up."""

    code = "smtp_tls_failed"


class UnsafeMessageError(MailError):
    """A header value would carry a line break (header injection). Nothing was sent."""

    code = "unsafe_message"

    def __init__(self, header: str, why: str = "would contain a line break (CR or LF)") -> None:
        self.header = header
        what = f"the {header} header {why}" if header else why
        super().__init__(f"refusing to send the message: {what}")


# Line breaks to the email package (str.splitlines) and to SMTP, and NUL.
_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00")


def _has_line_break(value: str) -> bool:
    return any(c in _LINE_BREAKS for c in value)


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


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Sender


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
        problems: list[Problem] = []

        def problem(field: str, message: str) -> None:
            problems.append(Problem(_SETTINGS, None, field, message))

        host = (host or "").strip()
        if not host:
            problem("ONBOARD_SMTP_HOST", "is not set: name the SMTP server to send through")
        if security not in DEFAULT_PORTS:
            problem("ONBOARD_SMTP_SECURITY", f"is {security!r}; use starttls, ssl or none")
        port = port or DEFAULT_PORTS.get(security, 587)
        if not 0 < port < 65536:
            problem("ONBOARD_SMTP_PORT", f"{port} is not a TCP port")
        if not timeout > 0:
            problem("ONBOARD_SMTP_TIMEOUT", "must be more than 0 seconds")
        envelope_from = ""
        if not email_from or not email_from.strip():
            problem("ONBOARD_EMAIL_FROM", "is not set: the From address of the onboarding emails")
        else:
            try:
                envelope_from = parse_from(email_from)[1]
            except InputError as err:
                problems.extend(err.problems)
        secret = password if isinstance(password, SecretStr) else SecretStr(password or "")
        if username and password is None:
            problem("ONBOARD_SMTP_PASSWORD", "is not set, but ONBOARD_SMTP_USERNAME is")
        if password is not None and not username:
            problem("ONBOARD_SMTP_USERNAME", "is not set, but ONBOARD_SMTP_PASSWORD is")
        if security == "none" and host and not _is_loopback(host):
            # Every message carries a tenant's authorize link (and AUTH the password): never in
            # clear across a network. Plain SMTP only to a relay on this machine.
            problem(
                "ONBOARD_SMTP_SECURITY",
                f"is 'none' for {host}, which is not a loopback host: refusing to send "
                "authorize links"
                + (" and the password" if username else "")
                + " in clear; use starttls or ssl (security none only to 127.0.0.1, ::1 or "
                "localhost)",
            )
        tls: ssl.SSLContext | None = None
        if security in ("starttls", "ssl"):
            try:
                # Verification (certificate chain and host name) is never turned off: a private
                # CA is trusted by naming its certificate in ONBOARD_SMTP_CA_FILE.
                tls = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
            except (OSError, ValueError) as err:
                why = "file not found" if isinstance(err, FileNotFoundError) else str(err)
                problem("ONBOARD_SMTP_CA_FILE", f"{ca_file}: cannot load CA certificates ({why})")
        if problems:
            raise InputError(problems, hint="Set them in the environment or in .env.")

        self.host = host
        self.port = port
        self.username = username or None
        self.security: Security = security
        self.timeout = float(timeout)
        self.email_from = str(email_from).strip()
        self.ca_file = os.fspath(ca_file) if ca_file else None
        self.idle_check_seconds = idle_check_seconds
        self._password = secret
        self._envelope_from = envelope_from
        self._tls = tls
        self._local_hostname = local_hostname
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []

    @classmethod
    def from_settings(cls, settings: SmtpSettings | None = None) -> MailSender:
        s = settings if settings is not None else SmtpSettings()
        if not s.host and s.block:
            raise InputError(
                [Problem(_SETTINGS, None, "ONBOARD_SMTP_HOST", "is not set")],
                hint=f"ONBOARD_SMTP_BLOCK={s.block!r} names a Prefect block: the flow reads the "
                "server from it; build the sender from the block's values.",
            )
        return cls(
            host=s.host,
            port=s.port,
            username=s.username,
            password=s.password,
            security=s.security,
            timeout=s.timeout,
            email_from=s.email_from,
            ca_file=s.ca_file,
        )

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
            if _has_line_break(str(value)):
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


# --------------------------------------------------------------------------------------------
# Templates

TEMPLATE_NAMES = ("subject.txt", "body.txt", "body.html")
DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "templates"
_NAMED = ("tenant_id", "name", "admin_email")
_DICT_METHODS = frozenset(dir(dict))


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str

    def __repr__(self) -> str:  # the bodies hold the link
        return f"RenderedMail(subject={self.subject!r}, text=..., html=...)"


class _AnyFields(dict[str, str]):
    """Stands in for any tenant's free fields when the templates are checked at load time."""

    def __missing__(self, key: str) -> str:
        return f"sample-{key}"


class _SampleTenant(Tenant):
    @property
    def values(self) -> dict[str, str]:
        out = _AnyFields(self.fields)
        out.update(tenant_id=self.tenant_id, name=self.name, admin_email=self.admin_email)
        return out


_SAMPLE_HOST = "auth.example.com"
_SAMPLE_STATE = "sample-state-0123456789"
_SAMPLE_LINK = f"https://{_SAMPLE_HOST}/oauth2/authorize?state={_SAMPLE_STATE}"


class MailTemplates:
    """subject.txt, body.txt and body.html: each from `folder` if it has it, else the default.

    Variables: tenant (tenant.name, .tenant_id, .admin_email, .fields, .values), connector_name,
    link, expires_at (aware datetime, UTC), expires_in_hours (int), reminder (0 on first send).
    HTML is autoescaped; text is not. An undefined variable is an error, and every template is
    rendered once with sample values here, so a typo fails before anything is sent.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        loaders: list[FileSystemLoader] = []
        if self.folder is not None:
            if not self.folder.is_dir():
                raise InputError(f"{self.folder}: email templates folder not found")
            loaders.append(FileSystemLoader(self.folder))
        loaders.append(FileSystemLoader(DEFAULT_TEMPLATES))
        # Sandboxed: a template may read what it is given, not reach into Python from there.
        self._env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(("html", "htm", "xml"), default_for_string=False),
            undefined=StrictUndefined,
            auto_reload=False,
        )
        self._templates: dict[str, Template] = {}
        self.files: dict[str, Path] = {}
        for name in TEMPLATE_NAMES:
            try:
                template = self._env.get_template(name)
            except TemplateSyntaxError as err:
                where = err.filename or name
                raise InputError(
                    [Problem(where, err.lineno, "", f"template syntax error: {err.message}")]
                ) from None
            except (TemplateError, OSError, UnicodeDecodeError) as err:
                raise InputError(f"{name}: cannot load the email template ({err})") from None
            self._templates[name] = template
            self.files[name] = Path(template.filename or name)
        self.tenant_fields_used = self._fields_used()
        self._subject_uses_link = self._uses_link("subject.txt")
        self._check()

    def __repr__(self) -> str:
        return f"MailTemplates(folder={self.folder!r})"

    def render(
        self,
        *,
        tenant: Tenant,
        connector_name: str,
        link: str,
        expires_at: datetime,
        expires_in_hours: int,
        reminder: int = 0,
    ) -> RenderedMail:
        """Render all three; a template error is an InputError naming the file (never the link)."""
        context = {
            "tenant": tenant,
            "connector_name": connector_name,
            "link": link,
            "expires_at": expires_at,
            "expires_in_hours": expires_in_hours,
            "reminder": reminder,
        }
        out = {name: self._render(name, context, secrets=(link,)) for name in TEMPLATE_NAMES}
        return RenderedMail(
            subject=out["subject.txt"].strip(), text=out["body.txt"], html=out["body.html"]
        )

    def _render(self, name: str, context: Mapping[str, Any], secrets: Iterable[str] = ()) -> str:
        template = self._templates[name]
        try:
            return template.render(context)
        except Exception as err:  # UndefinedError, SecurityError, TypeError from a filter...
            text = f"{type(err).__name__}: {err}" if not isinstance(err, TemplateError) else ""
            text = text or str(getattr(err, "message", None) or err)
            for secret in secrets:
                text = text.replace(secret, "<link>")
            raise InputError(
                [Problem(str(self.files[name]), _template_line(err, template), "", text)],
                hint="Email template variables: tenant (.name, .tenant_id, .admin_email, "
                ".fields.<column>), connector_name, link, expires_at, expires_in_hours, reminder.",
            ) from None

    def _check(self) -> None:
        tenant = _SampleTenant.model_construct(
            tenant_id="sample-tenant",
            name="Sample Tenant",
            admin_email="admin@example.com",
            fields=_AnyFields(),
        )
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=72)
        for reminder in (0, 1):
            context = {
                "tenant": tenant,
                "connector_name": "Sample Connector",
                "link": _SAMPLE_LINK,
                "expires_at": expires,
                "expires_in_hours": 72,
                "reminder": reminder,
            }
            out = {name: self._render(name, context) for name in TEMPLATE_NAMES}
            subject = out["subject.txt"].strip()
            problems = []
            if not subject or _has_line_break(subject):
                problems.append((TEMPLATE_NAMES[0], "must render to exactly one non-empty line"))
            elif self._subject_uses_link or _SAMPLE_STATE in subject or _SAMPLE_HOST in subject:
                # Subjects end up in mail logs, list views and notifications: never the link.
                problems.append(
                    (TEMPLATE_NAMES[0], "must not show the link (or its state); remove {{ link }}")
                )
            for name in TEMPLATE_NAMES[1:]:
                if _SAMPLE_LINK not in out[name]:
                    problems.append((name, "does not show the link: use {{ link }}"))
            if problems:
                raise InputError([Problem(str(self.files[n]), None, "", m) for n, m in problems])

    def _uses_link(self, name: str) -> bool:
        """Whether a template reads the variable `link` anywhere (filters, slices included)."""
        source = self.files[name].read_text(encoding="utf-8")
        return any(n.name == "link" for n in self._env.parse(source).find_all(nodes.Name))

    def _fields_used(self) -> list[str]:
        """Roster columns the templates read as tenant.fields.<x> or tenant.values.<x>."""
        found: list[str] = []
        for name in TEMPLATE_NAMES:
            source = self.files[name].read_text(encoding="utf-8")
            for node in self._env.parse(source).find_all((nodes.Getattr, nodes.Getitem)):
                if not isinstance(node, nodes.Getattr | nodes.Getitem):
                    continue
                inner = node.node
                if not (
                    isinstance(inner, nodes.Getattr)
                    and inner.attr in ("fields", "values")
                    and isinstance(inner.node, nodes.Name)
                    and inner.node.name == "tenant"
                ):
                    continue
                key: object = None
                if isinstance(node, nodes.Getattr) and node.attr not in _DICT_METHODS:
                    key = node.attr
                elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                    key = node.arg.value
                if isinstance(key, str) and key not in _NAMED:
                    found.append(key)
        return list(dict.fromkeys(found))


def _template_line(err: BaseException, template: Template) -> int | None:
    """The template line a render error came from (Jinja rewrites tracebacks to point there)."""
    lineno = getattr(err, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    tb = err.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == template.filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# --------------------------------------------------------------------------------------------
# Messages


def parse_from(email_from: str) -> tuple[str, str]:
    """Split "Name <addr>" (or a bare address) into display name and checked address."""
    if _has_line_break(email_from):
        raise InputError([Problem(_SETTINGS, None, "ONBOARD_EMAIL_FROM", "has a line break")])
    name, addr = parseaddr(email_from.strip())
    try:
        checked = validate_email(addr, check_deliverability=False)
    except EmailNotValidError as err:
        raise InputError(
            [Problem(_SETTINGS, None, "ONBOARD_EMAIL_FROM", f"is not a valid address: {err}")]
        ) from None
    return name, checked.ascii_email or checked.normalized


def _domain_of(email_from: str) -> str:
    addr = parse_from(email_from)[1]
    domain = addr.rpartition("@")[2]
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain.lower()


def message_id_for(
    tenant_id: str, connector_id: str, state: str, email_from: str, reminder: int = 0
) -> str:
    """The Message-ID of a tenant's email: the same link always gives the same id.

    A resend of the same message (after a failure that left its delivery in doubt) then
    carries the same id, which lets mail systems drop the duplicate. A reminder is another
    message, so it gets an id of its own (clients hide a message whose id they have seen).
    The state goes in only through sha256: the id cannot be turned back into the link.
    """
    parts = [tenant_id, connector_id, state]
    if reminder:
        parts.append(f"reminder-{reminder}")
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return f"<onboard.{digest[:32]}@{_domain_of(email_from)}>"


def build_message(
    *,
    tenant: Tenant,
    connector_name: str,
    connector_id: str,
    link_url: str,
    state: str,
    expires_at: datetime,
    email_from: str,
    templates: MailTemplates,
    reminder: int = 0,
    now: datetime | None = None,
) -> EmailMessage:
    """The email carrying one tenant's authorize link: multipart/alternative, text then HTML."""
    for header, value in (
        ("Subject (tenant name)", tenant.name),
        ("Subject (connector name)", connector_name),
        ("X-Onboarding-Tenant (tenant_id)", tenant.tenant_id),
        ("To (admin_email)", tenant.admin_email),
        ("From (email_from)", email_from),
    ):
        if _has_line_break(value):
            raise UnsafeMessageError(header)
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    if urlsplit(link_url).scheme not in ("https", "http") or _has_line_break(link_url):
        raise UnsafeMessageError("", "the link is not an http(s) URL")
    try:
        to = validate_email(tenant.admin_email, check_deliverability=False)
    except EmailNotValidError as err:
        raise InputError(
            [Problem(f"tenant {tenant.tenant_id}", None, "admin_email", str(err))]
        ) from None
    from_name, from_addr = parse_from(email_from)

    now = now or datetime.now(UTC)
    expires_utc = expires_at.astimezone(UTC)
    hours_left = max(0, round((expires_utc - now).total_seconds() / 3600))
    rendered = templates.render(
        tenant=tenant,
        connector_name=connector_name,
        link=link_url,
        expires_at=expires_utc,
        expires_in_hours=hours_left,
        reminder=reminder,
    )
    headers = [
        ("From", formataddr((from_name, from_addr)) if from_name else from_addr),
        ("To", to.ascii_email or to.normalized),
        ("Subject", rendered.subject),
        ("Date", format_datetime(now.astimezone(UTC))),
        ("Message-ID", message_id_for(tenant.tenant_id, connector_id, state, email_from, reminder)),
        ("X-Onboarding-Tenant", tenant.tenant_id),
    ]
    if reminder:
        # Threads a reminder under the first email in the admin's mail client.
        headers.append(
            ("References", message_id_for(tenant.tenant_id, connector_id, state, email_from))
        )
    message = EmailMessage(policy=email.policy.SMTP)
    for name, value in headers:
        if _has_line_break(value):
            raise UnsafeMessageError(name)
        try:
            message[name] = value
        except (ValueError, email.errors.MessageError):
            raise UnsafeMessageError(name, "is not a valid header value") from None
    # Quoted-printable: any line length (links can pass the 998-octet line limit of 8bit) and
    # 7-bit clean; the decoded text holds the link exactly.
    message.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    message.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    return message


# --------------------------------------------------------------------------------------------
# The demo's SMTP server


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
