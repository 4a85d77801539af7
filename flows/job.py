"""What a batch's tasks share, opened by its flow: the Versori client, the SMTP sender, the
pacer, tenant events (`open_job`), and the secrets and settings they are made from."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from flows.events import TenantEventSender
from flows.inputs.options import TenantEvents
from flows.local import on_interrupt
from onboarding.campaign import Campaign
from onboarding.client import VersoriClient
from onboarding.delivery import Delivery
from onboarding.errors import InputError
from onboarding.ledger import Ledger
from onboarding.models import Api
from onboarding.pacing import PACE_SHARE, Pacer, Spacing
from onboarding.profile import ConnectorProfile
from onboarding.retry_policy import BatchStop, RetryRule
from onboarding.settings import LedgerSettings, RetrySettings, VersoriSettings
from onboarding.tenant_steps import OnboardingJob

if TYPE_CHECKING:
    from prefect_email import EmailServerCredentials

    from onboarding.mail import MailSender, MailTemplates, SmtpSettings
    from onboarding.mail.settings import Security


def resolve_api_key(settings: VersoriSettings) -> str | None:
    """The API key from VERSORI_API_KEY, else from the Secret block named VERSORI_API_KEY_BLOCK."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_block:
        from prefect.blocks.system import Secret

        return str(Secret.load(settings.api_key_block).get())  # type: ignore[union-attr]  # sync
    return None


def tag_run(profile: ConnectorProfile) -> None:
    """Tag the current flow run `profile:<slug>`, so the UI can filter runs by profile."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    tag = f"profile:{profile.slug}"
    if flow_run.id is None or tag in (flow_run.tags or []):
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*(flow_run.tags or []), tag])


def open_job(
    stack: ExitStack,
    profile: ConnectorProfile,
    ledger: Ledger,
    deliver: Delivery,
    templates: MailTemplates | None,
    concurrency: int,
    events: TenantEvents = TenantEvents.AUTO,
    remind_before: datetime | None = None,
    max_reminders: int = 0,
) -> OnboardingJob:
    """Everything a batch's tasks share: Versori client, SMTP sender when mail goes out, pacer,
    tenant events: the one job of a campaign of one connector. Closed with `stack`."""
    campaign = open_campaign(
        stack,
        [profile],
        ledger,
        deliver,
        templates,
        concurrency,
        events,
        remind_before=remind_before,
        max_reminders=max_reminders,
    )
    return campaign.jobs[0]


def open_campaign(
    stack: ExitStack,
    profiles: list[ConnectorProfile],
    ledger: Ledger,
    deliver: Delivery,
    templates: MailTemplates | None,
    concurrency: int,
    events: TenantEvents = TenantEvents.AUTO,
    remind_before: datetime | None = None,
    **options: Any,
) -> Campaign:
    """A campaign's shared parts: one job per profile (its own Versori client for its API, its
    own pacer and batch stop), one SMTP sender and one tenant event sender for all, and the
    run's lease on the tenants it claims in the ledger. Closed with `stack`.

    `remind_before` makes it a reminder batch (a tenant is due while last sent before then);
    `options` go to the Campaign."""
    from prefect.runtime import flow_run

    claimant = str(flow_run.id or uuid.uuid4())
    stack.enter_context(ledger.run_lease(claimant, LedgerSettings().run_lease_seconds))
    settings = RetrySettings()
    rule = RetryRule(deadline=settings.tenant_deadline_seconds)
    mailer = open_mailer(stack) if deliver.sends_email else None
    on_status = stack.enter_context(TenantEventSender(events))
    jobs = [
        OnboardingJob(
            profile=profile,
            client=stack.enter_context(open_client(concurrency, profile.api)),
            ledger=ledger,
            deliver=deliver,
            mailer=mailer,
            templates=templates,
            run_id=flow_run.id,
            pacer=make_pacer(profile, ledger),
            on_status=on_status,
            stop=BatchStop(settings.stop_after),
            rule=rule,
            claimant=claimant,
            remind_before=remind_before,
            max_reminders=options.get("max_reminders", 0),
        )
        for profile in profiles
    ]

    def interrupt() -> None:
        for job in jobs:
            job.stop.interrupt()

    # Ctrl-C: no new tenant starts, so the run unwinds (and lets go of its claims) in time.
    stack.enter_context(on_interrupt(interrupt))
    return Campaign(jobs, deliver, mailer, templates, rule=rule, **options)


def rate_limit_name(profile: ConnectorProfile) -> str:
    return f"onboarding-rate-{profile.slug}"


def make_pacer(profile: ConnectorProfile, ledger: Ledger) -> Pacer:
    """A pacer at a little under the profile's `rate_limit_per_second`, if it sets one,
    shared through the ledger by every run of the profile on it (chunks, workers, two CLI
    runs at once); else one that only holds off after a 429 (onboarding/pacing.py)."""
    rate = profile.rate_limit_per_second
    if rate is None:
        return Pacer()
    get_run_logger().info(
        "Pacing %s at %.4g calls/s (%g/s less %.0f%%), shared by every run on this ledger",
        profile.name,
        rate * PACE_SHARE,
        rate,
        100 * (1 - PACE_SHARE),
    )
    return Spacing(rate, name=rate_limit_name(profile), times=ledger)


def effective_concurrency(profile: ConnectorProfile, asked: int) -> int:
    return min(asked, profile.max_concurrency) if profile.max_concurrency else asked


def open_client(concurrency: int, api: Api = "connect-v1") -> VersoriClient:
    """A Versori client from VERSORI_* settings, pooled for `concurrency` calls at once, for
    `api` (a profile's): unless VERSORI_BASE_URL is set, that API's production base URL."""
    versori = VersoriSettings()
    return VersoriClient(
        api=api,
        api_key=resolve_api_key(versori),
        base_url=versori.base_url_if_set,
        connect_timeout=versori.connect_timeout,
        read_timeout=versori.read_timeout,
        call_deadline=versori.call_deadline,
        max_connections=concurrency,
    )


def load_templates(profile: ConnectorProfile) -> MailTemplates:
    """The profile's email templates (its `email_templates` folder over the defaults)."""
    from onboarding.mail import MailTemplates

    return MailTemplates(Path(profile.email_templates) if profile.email_templates else None)


def open_mailer(stack: ExitStack) -> MailSender:
    """The SMTP sender from ONBOARD_SMTP_* settings, or, when ONBOARD_SMTP_HOST is not set, from
    the prefect-email EmailServerCredentials block named by ONBOARD_SMTP_BLOCK; closed with
    `stack`."""
    from onboarding.mail import MailSender, SmtpSettings

    settings = SmtpSettings()
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
