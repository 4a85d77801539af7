"""Every check the SMTP settings pass before a message is sent.

Each check is written once: a value's own range in `onboarding.settings.SmtpServerSettings`
(run on the environment's values, `SmtpSettings`, and on values given in code alike), what the
values must be together to send safely here, in `check_for_sending`. `MailSender` takes the
result and checks nothing again.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

from onboarding.errors import InputError, Problem
from onboarding.mail.message import parse_from
from onboarding.net import is_loopback
from onboarding.settings import ENV_HINT, SETTINGS_SOURCE, Security, SmtpServerSettings


@dataclass(frozen=True)
class SendSettings:
    """Settings that passed every check, in the form the sender uses them."""

    host: str
    port: int
    security: Security
    timeout: float
    username: str | None
    password: SecretStr
    email_from: str
    # The address alone, checked: the SMTP envelope sender (MAIL FROM).
    envelope_from: str
    ca_file: str | None
    # None for security none.
    tls: ssl.SSLContext | None


# Long: a list of independent checks, each with its own message.
def check_for_sending(settings: SmtpServerSettings) -> SendSettings:
    """What valid settings must also be to send: a host and a From address, a username and a
    password together, plain SMTP only to this machine, a CA file that loads. Every problem is
    listed in one InputError."""
    problems: list[Problem] = []

    def problem(field: str, message: str) -> None:
        problems.append(Problem(SETTINGS_SOURCE, None, field, message))

    host = (settings.host or "").strip()
    if not host:
        problem("ONBOARD_SMTP_HOST", "is not set: name the SMTP server to send through")
    email_from = settings.email_from
    envelope_from = ""
    if not email_from or not email_from.strip():
        problem("ONBOARD_EMAIL_FROM", "is not set: the From address of the onboarding emails")
    else:
        try:
            envelope_from = parse_from(email_from)[1]
        except InputError as err:
            problems.extend(err.problems)
    username, password, security = settings.username, settings.password, settings.security
    if username and password is None:
        problem("ONBOARD_SMTP_PASSWORD", "is not set, but ONBOARD_SMTP_USERNAME is")
    if password is not None and not username:
        problem("ONBOARD_SMTP_USERNAME", "is not set, but ONBOARD_SMTP_PASSWORD is")
    if security == "none" and host and not is_loopback(host):
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
    ca_file = settings.ca_file
    tls = _tls_context(ca_file, problem) if security in ("starttls", "ssl") else None
    if problems:
        raise InputError(problems, hint=ENV_HINT)
    assert settings.port is not None  # set by SmtpServerSettings._default_port
    return SendSettings(
        host=host,
        port=settings.port,
        security=security,
        timeout=float(settings.timeout),
        username=username or None,
        password=password if password is not None else SecretStr(""),
        email_from=str(email_from).strip(),
        envelope_from=envelope_from,
        ca_file=ca_file or None,
        tls=tls,
    )


def _tls_context(ca_file: str | None, problem: Callable[[str, str], None]) -> ssl.SSLContext | None:
    """Verification (certificate chain and host name) is never turned off: a private CA is
    trusted by naming its certificate in ONBOARD_SMTP_CA_FILE."""
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    except (OSError, ValueError) as err:
        why = "file not found" if isinstance(err, FileNotFoundError) else str(err)
        problem("ONBOARD_SMTP_CA_FILE", f"{ca_file}: cannot load CA certificates ({why})")
        return None
