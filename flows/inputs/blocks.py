"""Secrets kept in Prefect blocks: the Versori API key (a Secret block) and SMTP settings (a
prefect-email EmailServerCredentials block), read when a run starts."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from onboarding.errors import InputError
from onboarding.settings import Security, SmtpSettings, VersoriSettings

if TYPE_CHECKING:
    from prefect_email import EmailServerCredentials

    from onboarding.mail import MailSender


def resolve_api_key(settings: VersoriSettings) -> str | None:
    """The API key from VERSORI_API_KEY, else from the Secret block named VERSORI_API_KEY_BLOCK."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_block:
        from prefect.blocks.system import Secret

        return str(Secret.load(settings.api_key_block).get())  # type: ignore[union-attr]  # sync
    return None


def open_mailer(stack: ExitStack, settings: SmtpSettings) -> MailSender:
    """The SMTP sender from ONBOARD_SMTP_* settings (the run's), or, when ONBOARD_SMTP_HOST is
    not set, from the prefect-email EmailServerCredentials block named by ONBOARD_SMTP_BLOCK;
    closed with `stack`."""
    from onboarding.mail import MailSender

    # Settings given directly win over a block name, as VERSORI_API_KEY wins over its block.
    use_block = bool(settings.block) and not settings.host
    sender = _sender_from_block(settings) if use_block else MailSender.from_settings(settings)
    return stack.enter_context(sender)


# ONBOARD_SMTP_SECURITY's values and prefect-email's SMTPType names, one for one, both ways:
# `smtp_block_of` writes a block with them, `_sender_from_block` reads one back.
SMTP_TYPES: dict[Security, str] = {"ssl": "SSL", "starttls": "STARTTLS", "none": "INSECURE"}


def smtp_block_of(settings: SmtpSettings, host: str) -> EmailServerCredentials:
    """A prefect-email EmailServerCredentials block holding `settings` (SMTP through `host`);
    its own `.save(name)` stores it."""
    from prefect_email import EmailServerCredentials

    password = settings.password.get_secret_value() if settings.password else None
    return EmailServerCredentials(
        smtp_server=host,
        smtp_port=settings.port,
        smtp_type=SMTP_TYPES[settings.security],
        username=settings.username,
        password=password,
    )


def _sender_from_block(settings: SmtpSettings) -> MailSender:
    from prefect_email import EmailServerCredentials

    from onboarding.mail import MailSender

    assert settings.block
    try:
        block = EmailServerCredentials.load(settings.block)
    except ValueError as err:
        raise InputError(
            f"ONBOARD_SMTP_BLOCK: no EmailServerCredentials block named {settings.block!r} "
            "(create it with `onboard blocks create` or in the Prefect UI)"
        ) from err
    kind = getattr(block.smtp_type, "name", str(block.smtp_type)).upper()
    security: Security = next((s for s, t in SMTP_TYPES.items() if t == kind), "starttls")
    password = block.password.get_secret_value() if block.password else None
    return MailSender(
        host=block.smtp_server,
        port=block.smtp_port,
        username=block.username,
        password=password,
        security=security,
        timeout=settings.timeout,
        email_from=settings.email_from or block.username,
        ca_file=settings.ca_file,
    )
