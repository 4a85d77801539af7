"""A campaign: the tenants of one roster onboarded to several connectors in one run, each
tenant getting one email that carries every link it still needs, and later one reminder that
covers every connector it has not connected.

One tenant's path: for each connector, in the campaign's order, skip it when the tenant needs
nothing there; else issue (or reuse) the link and record it, or record the failure, under that
connector. Then, when mail goes out, one message with the links that were issued, marked
delivered (or reminded) under each connector. A connector that fails does not hold back the
others: the message goes with what succeeded, and the next run sends the rest in a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING

from onboarding.delivery import Delivery
from onboarding.errors import OnboardingError, worth_retrying
from onboarding.ledger import SENDING_CHANNELS, Record, Status
from onboarding.links import Link
from onboarding.retry_policy import RetryRule
from onboarding.roster import Tenant
from onboarding.tenant_steps import (
    OnboardingJob,
    TenantOutcome,
    failed_outcome,
    not_sent,
    record_failure,
    recording_failures,
    reusable_link,
    succeeded,
)

if TYPE_CHECKING:
    from onboarding.mail import MailSender, MailTemplates

REMINDABLE = frozenset({Status.DELIVERED, Status.REMINDED, Status.EXPIRED})


@dataclass
class Issued:
    """A connector's link for one tenant, made or reused in this run, not yet mailed."""

    job: OnboardingJob
    link: Link
    expires_at: datetime
    reminders: int = 0  # reminders sent so far for this link's connector
    channel: str = ""  # how its first email went (email, both), for a reminder


Held = Issued | TenantOutcome


@dataclass
class Campaign:
    """What every tenant of a campaign's batch shares: one OnboardingJob per connector (its
    own client, pacer and stop reason) and one mailer; safe to use from many threads."""

    jobs: list[OnboardingJob]
    deliver: Delivery = Delivery.STORE
    mailer: MailSender | None = None
    templates: MailTemplates | None = None
    # For each connector id, the tenants that needed nothing from it when the batch began.
    needing_nothing: dict[str, set[str]] = field(default_factory=dict)
    max_reminders: int = 0
    # A tenant's links and final outcomes while its slice is retried: a retry calls only the
    # connectors that failed transiently. Each tenant is handled by one thread at a time.
    held: dict[str, dict[str, Held]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return " + ".join(job.profile.name for job in self.jobs)

    rule: RetryRule = field(default_factory=RetryRule)

    @property
    def stop_reason(self) -> str:
        """Set once every connector has stopped (a bad key stops them all)."""
        reasons = [job.stop_reason for job in self.jobs]
        return "; ".join(dict.fromkeys(reasons)) if all(reasons) else ""

    def note(self, tenant_id: str, outcome: TenantOutcome | BaseException) -> None:
        """Nothing: each connector's job is told of its own tries (_issue)."""

    def claim(self, tenant_ids: list[str]) -> set[str]:
        """The tenants this run now holds under every connector of the campaign; one held
        elsewhere under any connector is let go under the others too."""
        held = [job.claim(tenant_ids) for job in self.jobs]
        everywhere = set.intersection(*held)
        for job, got in zip(self.jobs, held, strict=True):
            if got - everywhere:
                job.release(list(got - everywhere))
        return everywhere

    def release(self, tenant_ids: list[str]) -> None:
        for job in self.jobs:
            job.release(tenant_ids)

    def settled(self, tenant_ids: list[str]) -> set[str]:
        """Those needing nothing from any connector now; what each connector needs nothing
        for is remembered (needing_nothing), so a tenant is asked only for what it lacks."""
        per_job = []
        for job in self.jobs:
            done = job.settled(tenant_ids)
            self.needing_nothing.setdefault(job.profile.target_id, set()).update(done)
            per_job.append(done)
        return set.intersection(*per_job)

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None:
        for job in self.jobs:
            job.report(tenant_id, status, error_code)

    def not_attempted(self, tenant: Tenant) -> TenantOutcome:
        parts = [_named(job, job.not_attempted(tenant)) for job in self.jobs]
        return combined(tenant.tenant_id, parts)


def onboard_campaign_tenant(
    campaign: Campaign, tenant: Tenant, last_attempt: bool = True
) -> TenantOutcome:
    """Issue every link the tenant needs, then deliver them: stored, or in one email. Raises a
    transient error (to be retried) only before anything is mailed and while attempts remain."""

    def plan(job: OnboardingJob) -> TenantOutcome | Ask:
        if tenant.tenant_id in campaign.needing_nothing.get(job.profile.target_id, ()):
            return TenantOutcome(tenant.tenant_id, "skipped")
        return Ask(record=None, reuse=campaign.deliver.sends_email)

    _issue_links(campaign, tenant, plan, last_attempt)
    return _deliver(campaign, tenant, reminder=False, last_attempt=last_attempt)


def remind_campaign_tenant(
    campaign: Campaign, tenant: Tenant, last_attempt: bool = True
) -> TenantOutcome:
    """One reminder covering every connector the tenant was emailed and has not connected
    (fewer than `max_reminders` times so far); links past their time are re-issued first."""

    def plan(job: OnboardingJob) -> TenantOutcome | Ask:
        record = job.ledger.get(tenant.tenant_id, job.profile.target_id)
        if record is not None and record.status is Status.CONNECTED:
            return TenantOutcome(tenant.tenant_id, Status.CONNECTED.value)
        not_due = campaign.needing_nothing.get(job.profile.target_id, ())
        if record is None or tenant.tenant_id in not_due:
            return TenantOutcome(tenant.tenant_id, "skipped")
        if not _remindable(record, campaign.max_reminders):
            return TenantOutcome(tenant.tenant_id, "skipped")
        return Ask(record=record, reuse=True)

    _issue_links(campaign, tenant, plan, last_attempt)
    return _deliver(campaign, tenant, reminder=True, last_attempt=last_attempt)


@dataclass(frozen=True)
class Ask:
    """A connector's link is wanted: `reuse` a stored one with time left, else make one."""

    record: Record | None
    reuse: bool


def _issue_links(
    campaign: Campaign,
    tenant: Tenant,
    plan: Callable[[OnboardingJob], TenantOutcome | Ask],
    last_attempt: bool,
) -> None:
    """For each connector not settled in an earlier attempt, what `plan` decides: an outcome,
    or a link issued. Raises the first transient failure, once every connector was tried."""
    held = campaign.held.setdefault(tenant.tenant_id, {})
    retry: BaseException | None = None
    for job in campaign.jobs:
        connector_id = job.profile.target_id
        if connector_id in held:
            continue
        decided = plan(job)
        if isinstance(decided, Ask):
            got = _issue(job, tenant, decided.record, decided.reuse, last_attempt)
        else:
            got = decided
        if isinstance(got, BaseException):
            retry = retry or got
            continue
        held[connector_id] = got
    if retry is not None:
        raise retry


def combined(tenant_id: str, parts: list[TenantOutcome]) -> TenantOutcome:
    """A tenant's outcome over its connectors: failed if any part failed (the next run retries
    that connector), else the most that happened to any part."""
    failed = [p for p in parts if p.status == Status.FAILED]
    if failed:
        first = failed[0]
        return TenantOutcome(
            tenant_id,
            Status.FAILED.value,
            error_code=first.error_code,
            error_message=f"{first.connector}: {first.error_message}",
            parts=tuple(parts),
        )
    order = ["reminded", "delivered", "would_initialise", "connected", "skipped"]
    status = min((p.status for p in parts), key=lambda s: order.index(s) if s in order else -1)
    return TenantOutcome(tenant_id, status, parts=tuple(parts))


def _remindable(record: Record, max_reminders: int) -> bool:
    return (
        record.status in REMINDABLE
        and record.delivery_channel in SENDING_CHANNELS
        and record.reminders < max_reminders
    )


def _issue(
    job: OnboardingJob, tenant: Tenant, record: Record | None, reuse: bool, last_attempt: bool
) -> Issued | TenantOutcome | BaseException:
    """The connector's link for the tenant: reused when `reuse` and a stored one has time left,
    else made (and recorded). A final failure comes back as an outcome, a transient one that
    may still be retried as the error itself."""
    if job.stop_reason:
        return job.not_attempted(tenant)
    try:
        with recording_failures(job, tenant) as attempt:
            issued = reusable_link(job, tenant.tenant_id, record) if reuse else None
            if issued is None:
                issued = attempt.initialise(job, tenant)
    except Exception as exc:
        job.note(tenant.tenant_id, exc)
        if worth_retrying(exc) and not last_attempt:
            return exc
        outcome = failed_outcome(tenant.tenant_id, exc)
        job.report(tenant.tenant_id, Status.FAILED, outcome.error_code)
        return outcome
    link, expires_at = issued
    job.note(tenant.tenant_id, succeeded(tenant.tenant_id, Status.LINK_CREATED, link))
    if record is None:
        return Issued(job, link, expires_at)
    channel = record.delivery_channel or ""
    return Issued(job, link, expires_at, record.reminders, channel)


def _deliver(
    campaign: Campaign, tenant: Tenant, reminder: bool, last_attempt: bool
) -> TenantOutcome:
    held = campaign.held[tenant.tenant_id]
    issued = [h for h in held.values() if isinstance(h, Issued)]
    outcomes = {c: h for c, h in held.items() if isinstance(h, TenantOutcome)}
    if issued and campaign.deliver.sends_email:
        outcomes.update(_mail(campaign, tenant, issued, reminder, last_attempt))
    else:
        for h in issued:
            outcomes[h.job.profile.target_id] = succeeded(
                tenant.tenant_id, Status.DELIVERED, h.link
            )
    del campaign.held[tenant.tenant_id]
    parts = [_named(job, outcomes[job.profile.target_id]) for job in campaign.jobs]
    return combined(tenant.tenant_id, parts)


def _mail(
    campaign: Campaign, tenant: Tenant, issued: list[Issued], reminder: bool, last_attempt: bool
) -> dict[str, TenantOutcome]:
    """One message with every link in `issued` the ledger lets go out, marked sent under each
    connector. A mail failure is recorded under each connector of the message."""
    if campaign.mailer is None or campaign.templates is None:
        raise OnboardingError("email delivery asked for, but no SMTP sender is configured")
    tenant_id = tenant.tenant_id
    outcomes: dict[str, TenantOutcome] = {}
    sending = list(issued)
    try:
        sending, message = _mark_sending(campaign, tenant, sending, reminder, outcomes)
        if message is not None:
            campaign.mailer.send(message)
    except Exception as exc:
        for h in sending:
            record_failure(h.job, tenant, exc, count_attempt=False)
        if worth_retrying(exc) and not last_attempt:
            raise
        for h in sending:
            outcome = failed_outcome(tenant_id, exc)
            outcomes[h.job.profile.target_id] = outcome
            h.job.report(tenant_id, Status.FAILED, outcome.error_code)
        return outcomes
    status = Status.REMINDED if reminder else Status.DELIVERED
    for h in sending:
        connector_id = h.job.profile.target_id
        if reminder:
            h.job.ledger.mark_reminded(
                tenant_id,
                connector_id,
                channel=h.channel or "email",
                state=h.link.state,
            )
        else:
            h.job.ledger.mark_delivered(
                tenant_id,
                connector_id,
                channel=campaign.deliver.value,
                state=h.link.state,
            )
        h.job.report(tenant_id, status)
        outcomes[connector_id] = succeeded(tenant_id, status, h.link)
    return outcomes


def _message(
    campaign: Campaign, tenant: Tenant, issued: list[Issued], reminder: bool
) -> EmailMessage:
    from onboarding.mail import MailLink, build_message

    assert campaign.mailer is not None and campaign.templates is not None
    return build_message(
        tenant=tenant,
        links=[
            MailLink(
                h.job.profile.name, h.job.profile.target_id, h.link.url, h.link.state, h.expires_at
            )
            for h in issued
        ],
        email_from=campaign.mailer.email_from,
        templates=campaign.templates,
        reminder=1 + max(h.reminders for h in issued) if reminder else 0,
    )


def _mark_sending(
    campaign: Campaign,
    tenant: Tenant,
    issued: list[Issued],
    reminder: bool,
    outcomes: dict[str, TenantOutcome],
) -> tuple[list[Issued], EmailMessage | None]:
    """The links of `issued` the ledger marks `sending` under the message's id. One whose row
    it will not mark (the tenant connected meanwhile, another run holds a newer link) is left
    out, its outcome put in `outcomes`, and the rest marked again under the new message's id."""
    sending = list(issued)
    while sending:
        message = _message(campaign, tenant, sending, reminder)
        message_id = str(message["Message-ID"])
        refused = [
            h
            for h in sending
            if not h.job.ledger.mark_sending(
                tenant.tenant_id, h.job.profile.target_id, message_id=message_id, state=h.link.state
            )
        ]
        if not refused:
            return sending, message
        for h in refused:
            outcomes[h.job.profile.target_id] = not_sent(h.job, tenant.tenant_id)
        sending = [h for h in sending if h not in refused]
    return sending, None


def _named(job: OnboardingJob, outcome: TenantOutcome) -> TenantOutcome:
    return replace(outcome, connector=job.profile.name)
