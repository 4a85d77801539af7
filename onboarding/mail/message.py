"""One tenant's email: the From address, the Message-ID, the message itself.

The authorize link is a secret (its `state` is a CSRF token). It goes in the message body and
nowhere else: never in a header, a log line, an exception message or a repr.
"""

from __future__ import annotations

import email.errors
import email.policy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any, Protocol
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email

from onboarding.clock import utcnow
from onboarding.errors import InputError, Problem, UnsafeMessageError
from onboarding.inputs.roster import Tenant
from onboarding.settings import SETTINGS_SOURCE
from onboarding.settings.brand import BrandValues

# Line breaks to the email package (str.splitlines) and to SMTP, and NUL.
_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00")


def has_line_break(value: str) -> bool:
    return any(c in _LINE_BREAKS for c in value)


class _Policy(EmailPolicy):
    """email.policy.SMTP, but a long header is folded between its words. CPython moves a
    value that fits a line of its own whole onto the next line ("Subject:" CRLF " Acme…"),
    which its own parser (anything reading the .eml with Python) reads back with a leading
    space: a subject would no longer start with "Reminder"."""

    def fold(self, name: str, value: str) -> str:
        return self._rewrap(name, super().fold(name, value))

    def fold_binary(self, name: str, value: str) -> bytes:
        folded = super().fold_binary(name, value)
        try:
            text = folded.decode("ascii")
        except UnicodeDecodeError:
            return folded
        return self._rewrap(name, text).encode("ascii")

    def _rewrap(self, name: str, folded: str) -> str:
        head, sep = f"{name}:", self.linesep
        if not folded.startswith(head + sep + " "):
            return folded
        rest = head + folded[len(head) :].replace(sep, "")  # unfolded: "Subject: Acme…"
        limit = self.max_line_length or len(rest)
        lines: list[str] = []
        start = len(head) + 2  # never cut right after the colon
        while len(rest) > limit:
            cut = rest.rfind(" ", start, limit + 1)
            if cut == -1:
                break
            lines.append(rest[:cut])
            rest, start = rest[cut:], 1
        lines.append(rest)
        return sep.join(lines) + sep


_POLICY = _Policy(linesep="\r\n")  # as email.policy.SMTP


def parse_from(email_from: str) -> tuple[str, str]:
    """Split "Name <addr>" (or a bare address) into display name and checked address."""
    if has_line_break(email_from):
        raise InputError([Problem(SETTINGS_SOURCE, None, "ONBOARD_EMAIL_FROM", "has a line break")])
    name, addr = parseaddr(email_from.strip())
    try:
        checked = validate_email(addr, check_deliverability=False)
    except EmailNotValidError as err:
        raise InputError(
            [Problem(SETTINGS_SOURCE, None, "ONBOARD_EMAIL_FROM", f"is not a valid address: {err}")]
        ) from None
    return name, checked.ascii_email or checked.normalized


def _domain_of(email_from: str) -> str:
    addr = parse_from(email_from)[1]
    domain = addr.rpartition("@")[2]
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain.lower()


@dataclass(frozen=True)
class MailLink:
    """One connector's link in a tenant's email (a campaign's email holds several)."""

    connector_name: str
    connector_id: str
    url: str
    state: str
    expires_at: datetime
    display_name: str = ""  # the profile's; empty: templates show connector_name
    # For a reminder: when the admin first opened a connect link for this connector (and
    # did not finish), and whether they declined at the provider.
    opened_at: datetime | None = None
    declined: bool = False
    # A reconnect: the tenant's connection stopped working ("broken": its credential; or
    # "disconnected": it is gone in Versori), and this link makes it work again.
    reconnect: str = ""
    # What access the link asks, in plain words (the profile's access_summary, else its
    # scopes), and the profile's own branding over ONBOARD_BRAND_* (the first link's wins).
    access: tuple[str, ...] = ()
    brand: BrandValues | None = None

    def __repr__(self) -> str:  # the URL and state are secrets
        return f"MailLink(connector_id={self.connector_id!r}, url=..., state=...)"


def message_id_for(
    tenant_id: str,
    connector_id: str,
    state: str,
    email_from: str,
    reminder: int = 0,
    more: Sequence[tuple[str, str]] = (),
) -> str:
    """The Message-ID of a tenant's email: the same link (or links) always gives the same id.

    A resend of the same message (after a failure that left its delivery in doubt) then
    carries the same id, which lets mail systems drop the duplicate. A reminder is another
    message, so it gets an id of its own (clients hide a message whose id they have seen).
    `more`: the (connector id, state) of a campaign email's other links. The states go in only
    through sha256: the id cannot be turned back into a link.
    """
    parts = [tenant_id, connector_id, state]
    for other in more:
        parts += list(other)
    if reminder:
        parts.append(f"reminder-{reminder}")
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return f"<onboard.{digest[:32]}@{_domain_of(email_from)}>"


class Rendered(Protocol):
    @property
    def subject(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def html(self) -> str: ...


class Renders(Protocol):
    """What writes a message's subject and bodies: onboarding.mail.templates.MailTemplates
    (named by shape, so that the templates may import this module and not the reverse)."""

    def render(
        self,
        *,
        tenant: Tenant,
        links: Sequence[MailLink],
        now: datetime,
        reminder: int = 0,
        email_from: str = "",
    ) -> Rendered: ...


def _checked_inputs(tenant: Tenant, links: Sequence[MailLink], email_from: str) -> Any:
    """What goes in headers holds no line break, each link is an http(s) URL with an aware
    expiry, the admin's address is valid (returned, normalised)."""
    if not links:
        raise ValueError("an email needs at least one link")
    for header, value in (
        ("Subject (tenant name)", tenant.name),
        *(("Subject (connector name)", link.connector_name + link.display_name) for link in links),
        ("X-Onboarding-Tenant (tenant_id)", tenant.tenant_id),
        ("To (admin_email)", tenant.admin_email),
        ("From (email_from)", email_from),
    ):
        if has_line_break(value):
            raise UnsafeMessageError(header)
    for link in links:
        if link.expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        if urlsplit(link.url).scheme not in ("https", "http") or has_line_break(link.url):
            raise UnsafeMessageError("", "the link is not an http(s) URL")
    try:
        return validate_email(tenant.admin_email, check_deliverability=False)
    except EmailNotValidError as err:
        raise InputError(
            [Problem(f"tenant {tenant.tenant_id}", None, "admin_email", str(err))]
        ) from None


def build_message(
    *,
    tenant: Tenant,
    links: Sequence[MailLink],
    email_from: str,
    templates: Renders,
    reminder: int = 0,
    now: datetime | None = None,
) -> EmailMessage:
    """The email carrying a tenant's authorize links (one per connector, in the order given):
    multipart/alternative, text then HTML."""
    to = _checked_inputs(tenant, links, email_from)
    from_name, from_addr = parse_from(email_from)

    now = now or utcnow()
    rendered = templates.render(
        tenant=tenant, links=links, now=now, reminder=reminder, email_from=email_from
    )
    first, others = links[0], [(link.connector_id, link.state) for link in links[1:]]

    def message_id(reminder: int) -> str:
        return message_id_for(
            tenant.tenant_id, first.connector_id, first.state, email_from, reminder, others
        )

    headers = [
        ("From", formataddr((from_name, from_addr)) if from_name else from_addr),
        ("To", to.ascii_email or to.normalized),
        ("Subject", rendered.subject),
        ("Date", format_datetime(now.astimezone(UTC))),
        ("Message-ID", message_id(reminder)),
        ("X-Onboarding-Tenant", tenant.tenant_id),
    ]
    if reminder:
        # Threads a reminder under the first email in the admin's mail client.
        headers.append(("References", message_id(0)))
    message = EmailMessage(policy=_POLICY)
    for name, value in headers:
        if has_line_break(value):
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
