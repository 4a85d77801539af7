"""What a run needs, checked before Prefect starts: bad input then fails at once, every problem
named, before anything is sent to Versori. Loading an API key kept in a Prefect block is the
flow layer's (`flows.job.resolve_api_key`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onboarding.delivery import Delivery
from onboarding.errors import InputError
from onboarding.ledger import Ledger
from onboarding.mail import MailTemplates, SmtpSettings
from onboarding.profile import load_profile
from onboarding.roster import load_roster
from onboarding.settings import (
    ENV_HINT,
    InputSettings,
    LedgerSettings,
    RetrySettings,
    VersoriSettings,
)


def check_run_inputs(
    profiles: Sequence[str],
    roster: str | None,
    only: list[str] | None,
    deliver: Delivery,
    calls_versori: bool,
) -> None:
    """The profiles (several make a campaign: each connector once), the mail settings and
    templates when mail goes out (the first profile's), the roster (if any) with the columns
    those templates read, the ledger, and an API key (or the name of its block) when Versori
    is called. Raises InputError."""
    check_environment()
    connectors = [load_profile(path) for path in profiles]
    if not connectors:
        raise InputError("--profile: give at least one connector profile")
    named = {c.target_id: path for c, path in zip(connectors, profiles, strict=True)}
    if len(named) < len(connectors):
        raise InputError("--profile: a campaign needs each connector once; one is given twice")
    needs = (
        check_mail_settings(connectors[0].email_templates, campaign=len(connectors) > 1)
        if deliver.sends_email
        else []
    )
    if roster is not None:
        load_roster(roster, connectors, only, template_columns=needs)
    check_ledger()
    if calls_versori:
        check_api_key_is_set(VersoriSettings())


def check_environment() -> None:
    """Every VERSORI_* and ONBOARD_* setting a run reads (mail's apart, checked with the
    templates) passes its check: one InputError names every variable that does not."""
    problems = []
    for settings in (VersoriSettings, LedgerSettings, InputSettings, RetrySettings):
        try:
            settings()
        except InputError as err:
            problems.extend(err.problems)
    if problems:
        raise InputError(problems, hint=ENV_HINT)


def check_ledger() -> None:
    """ONBOARD_DB_URL names a ledger this process can open."""
    Ledger(LedgerSettings().db_url).close()


def check_api_key_is_set(versori: VersoriSettings) -> None:
    if not (versori.api_key or versori.api_key_block):
        raise InputError(
            "VERSORI_API_KEY is not set: set it to a Versori API key, or set "
            "VERSORI_API_KEY_BLOCK to the name of a Prefect Secret block that holds one"
        )


def check_mail_settings(templates: str | None, campaign: bool = False) -> list[str]:
    """The templates load (and show every link of a campaign's email) and the SMTP settings
    name a server and a From address (or a block, read when the flow starts); returns the
    roster columns the templates read."""
    loaded = MailTemplates(Path(templates) if templates else None)
    if campaign:
        loaded.check_campaign()
    fields = loaded.tenant_fields_used
    settings = SmtpSettings()
    if settings.block and not settings.host:
        return fields  # read when the flow starts; a missing block fails it with its name
    missing = [
        name
        for name, value in (
            ("ONBOARD_SMTP_HOST", settings.host),
            ("ONBOARD_EMAIL_FROM", settings.email_from),
        )
        if not value
    ]
    if missing:
        raise InputError(
            f"email delivery needs {' and '.join(missing)} (or ONBOARD_SMTP_BLOCK, the name of "
            "a prefect-email EmailServerCredentials block); see the README's Configuration"
        )
    return fields
