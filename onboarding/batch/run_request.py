"""A run's parameters turned into checked inputs, the one place they are checked: the CLI
calls it before Prefect starts (bad input exits 2 before anything runs), the flow calls it
too (a run started from the UI or the API); a run the CLI starts in its own process is given
the CLI's result explicitly (`flows.inputs.parameters.given_inputs`), so each profile is read
and a URL roster downloaded once. The settings are the caller's (`onboarding.settings`, read
once by the entry point). Loading an API key kept in a Prefect block, and a roster URL kept
in one, is the flow layer's (`flows.inputs`).

A whole run's inputs (its profiles, roster, mail templates and delivery) are the batch's
concern, so this lives here, above `onboarding.inputs` and `onboarding.mail`. Checking them
opens no ledger: the ledger URL's form is checked here, and whoever runs the batch opens the
ledger once (an unreachable one is an InputError there, exit 2 from the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from onboarding import constants
from onboarding.batch.delivery import Delivery
from onboarding.db_url import check_url_form
from onboarding.errors import InputError
from onboarding.inputs.profile import FINISH_HINT, ConnectorProfile, load_profile
from onboarding.inputs.roster import (
    Roster,
    TenantRow,
    display_source,
    load_inline_roster,
    load_roster,
    open_roster_slice,
)
from onboarding.mail import MailTemplates
from onboarding.settings import (
    API_KEY_NOT_SET,
    ENV_HINT,
    Settings,
    VersoriSettings,
)


@dataclass(frozen=True)
class RosterPart:
    """A chunk's part of a roster its batch's parent checked: positions first..stop-1 of the
    file whose SHA-256 is `digest` (a changed file is refused)."""

    digest: str
    first: int
    stop: int


@dataclass(frozen=True)
class RunRequest:
    """What a run was asked to do. `roster` is a path or URL (the caller resolved a
    `secret:` reference), or `tenants` the rows given inline; neither for reminders.
    `keeps_parameters`: a Prefect server stores the run's parameters (so a roster URL must
    not carry a credential). `chunked`: the batch fans out to a deployment's runs. A reminder
    run delivers by email (store for a dry run: it sends nothing)."""

    profiles: tuple[str, ...]
    roster: str | None = None
    tenants: tuple[TenantRow, ...] | None = None
    only: tuple[str, ...] | None = None
    deliver: Delivery = Delivery.STORE
    dry_run: bool = False
    reminders: bool = False
    chunked: bool = False
    keeps_parameters: bool = False
    root: Path | None = None
    part: RosterPart | None = None


@dataclass
class RunInputs:
    request: RunRequest
    profiles: list[ConnectorProfile]
    templates: MailTemplates | None  # the first profile's, when mail goes out
    roster: Roster | None

    @property
    def source(self) -> str:
        """The roster as logs and run names show it (a URL without its query)."""
        if self.request.roster is not None:
            return display_source(self.request.roster)
        return self.roster.source if self.roster is not None else "the ledger"


def check_run(request: RunRequest, settings: Settings) -> RunInputs:
    """Check everything a run needs, in the order a person fixes it: the environment
    (`settings`, the caller's root), the profiles (several make a campaign: each connector
    once), the mail settings and templates when mail goes out, the roster with the columns
    those templates read, the ledger's URL (its form: the ledger is not opened here), and an
    API key (or the name of its block) when Versori is called. Raises InputError."""
    check_environment(settings)
    if not request.profiles:
        raise InputError("profile: give at least one connector profile")
    profiles = _load_profiles(request)
    _check_finishable(request, profiles, settings)
    if len(profiles) > 1 and request.chunked:
        raise InputError(
            "fan_out deployment: a campaign (several profiles) runs in one flow run; "
            "use fan_out in_process, or one run per profile to fan out"
        )
    templates = _templates(profiles, settings) if request.deliver.sends_email else None
    needs = templates.tenant_fields_used if templates else ()
    roster = None
    if request.roster is not None and request.part is not None:
        part = request.part
        roster = open_roster_slice(
            request.roster,
            part.digest,
            part.first,
            part.stop,
            request.only,
            root=request.root,
            downloads=settings.inputs,
        )
    elif request.roster is not None:
        _refuse_credential_in_url(request)
        roster = load_roster(
            request.roster,
            profiles,
            request.only,
            template_columns=needs,
            root=request.root,
            downloads=settings.inputs,
        )
    elif request.tenants is not None:
        roster = load_inline_roster(request.tenants, profiles, request.only, needs)
    elif not request.reminders:
        raise InputError("give either `roster` (a file or URL) or `tenants` (inline)")
    check_url_form(settings.ledger.db_url)
    if not request.dry_run:
        check_api_key_is_set(settings.versori)
    return RunInputs(request, profiles, templates, roster)


# The sections of the settings root every run reads (mail's apart, checked with the templates).
RUN_SECTIONS = ("versori", "ledger", "inputs", "retry", "connect")


def check_environment(settings: Settings) -> None:
    """Every VERSORI_* and ONBOARD_* setting a run reads (mail's apart, checked with the
    templates) passes its check: one InputError names every variable that does not."""
    problems = []
    for section in RUN_SECTIONS:
        try:
            getattr(settings, section)
        except InputError as err:
            problems.extend(err.problems)
    if problems:
        raise InputError(problems, hint=ENV_HINT)


def check_api_key_is_set(versori: VersoriSettings) -> None:
    if not (versori.api_key or versori.api_key_block):
        raise InputError(API_KEY_NOT_SET)


def _load_profiles(request: RunRequest) -> list[ConnectorProfile]:
    profiles = [load_profile(path, root=request.root) for path in request.profiles]
    seen: dict[str, str] = {}
    for path, profile in zip(request.profiles, profiles, strict=True):
        first = seen.get(profile.target_id)
        if first is not None:
            raise InputError(
                f"profile {path}: names connector {profile.target_id}, as {first} does; "
                "a campaign needs each connector once"
            )
        seen[profile.target_id] = path
    return profiles


def _check_finishable(
    request: RunRequest, profiles: list[ConnectorProfile], settings: Settings
) -> None:
    """A run that emails links (a reminder run always does; its dry run is checked as the run
    itself) sends them through the connect service when ONBOARD_CONNECT_BASE_URL is set: every
    profile, each of a campaign's, must be one whose links can finish there
    (ConnectorProfile.finish_problems), or nothing is sent."""
    if not (request.deliver.sends_email or request.reminders):
        return
    base_url = settings.connect.base_url
    problems = [p for profile in profiles for p in profile.finish_problems(base_url)]
    if problems:
        raise InputError(problems, hint=FINISH_HINT)


def _templates(profiles: list[ConnectorProfile], settings: Settings) -> MailTemplates:
    """The first profile's email templates (its `email_templates` folder over the defaults,
    with the brand), which show every link of a campaign's email, and SMTP settings that name
    a server and a From address (or a block, read when the flow starts)."""
    folder = profiles[0].email_templates
    templates = MailTemplates(Path(folder) if folder else None, brand=settings.brand.values())
    if len(profiles) > 1:
        templates.check_campaign()
    smtp = settings.smtp
    if smtp.block and not smtp.host:
        return templates  # read when the flow starts; a missing block fails it with its name
    missing = [
        name
        for name, value in (
            ("ONBOARD_SMTP_HOST", smtp.host),
            ("ONBOARD_EMAIL_FROM", smtp.email_from),
        )
        if not value
    ]
    if missing:
        raise InputError(
            f"email delivery needs {' and '.join(missing)} (or ONBOARD_SMTP_BLOCK, the name of "
            "a prefect-email EmailServerCredentials block); see docs/configuration.md"
        )
    return templates


def _refuse_credential_in_url(request: RunRequest) -> None:
    """A roster URL with a credential in its query, given as a parameter a Prefect server
    keeps (and shows) in clear, is refused: such a URL goes in a Secret block."""
    assert request.roster is not None
    parts = urlsplit(request.roster)
    if parts.scheme not in ("http", "https") or not request.keeps_parameters:
        return
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    held = [k for k in keys if any(w in k.lower() for w in constants.SECRET_QUERY_WORDS)]
    if held:
        raise InputError(
            f"roster {display_source(request.roster)}: the URL carries a credential (query "
            f"key {held[0]!r}), and the Prefect server would keep it in clear with the "
            "run's parameters; put the URL in a Prefect Secret block and pass "
            "`secret:<block name>` as the roster"
        )
