"""Email delivery of authorize links, one module per concern (docs/architecture.md maps
them). The errors (MailError and its subclasses) are in `onboarding.errors`, re-exported here.
The demo's SMTP server is `demo.smtp`, outside the product (it needs aiosmtpd). The SMTP
settings (`SmtpSettings`, ONBOARD_SMTP_*) are a section of the settings root
(`onboarding.settings`); `DEFAULT_PORTS`, `Security` and `SmtpServerSettings` are re-exported
here for code that gives a sender its values.
"""

from onboarding.errors import (
    MailAuthError,
    MailError,
    MailTlsError,
    PermanentMailError,
    TransientMailError,
    UnsafeMessageError,
)
from onboarding.mail.message import MailLink, build_message, message_id_for, parse_from
from onboarding.mail.sender import IDLE_CHECK_SECONDS, MailSender
from onboarding.mail.templates import (
    DEFAULT_TEMPLATES,
    TEMPLATE_NAMES,
    MailTemplates,
    RenderedMail,
)
from onboarding.settings import DEFAULT_PORTS, Security, SmtpServerSettings

__all__ = [
    "DEFAULT_PORTS",
    "DEFAULT_TEMPLATES",
    "IDLE_CHECK_SECONDS",
    "TEMPLATE_NAMES",
    "MailAuthError",
    "MailError",
    "MailLink",
    "MailSender",
    "MailTemplates",
    "MailTlsError",
    "PermanentMailError",
    "RenderedMail",
    "Security",
    "SmtpServerSettings",
    "TransientMailError",
    "UnsafeMessageError",
    "build_message",
    "message_id_for",
    "parse_from",
]
