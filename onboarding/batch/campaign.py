"""A run's tenants onboarded to its connectors (one, or several: a campaign), each tenant
getting one email that carries every link it still needs, and later one reminder covering
every connector it has not connected. The one path of every run.

One tenant's path: for each connector, in the campaign's order, skip it when the tenant needs
nothing there; else issue (or reuse) the link and record it, or record the failure, under that
connector. Then the links are delivered: stored, or in one message marked delivered (or
reminded) under each connector. A connector that fails does not hold back the others: the
message goes with what succeeded, and the next run sends the rest in a new one. Whether a
failure is tried again is `retry_policy.decide`'s to say, for every connector and the mail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import TYPE_CHECKING

from onboarding.batch.connector_run import ConnectorRun
from onboarding.batch.delivery import Delivery
from onboarding.batch.outcomes import (
    OutcomeStatus,
    TenantOutcome,
    combined,
    failed_outcome,
    succeeded,
)
from onboarding.batch.retry_policy import RetryLater, RetryRule, Tries, Verdict, decide
from onboarding.connections.durable_links import connect_url, issue_connect_link
from onboarding.errors import BatchStoppedError, OnboardingError
from onboarding.inputs.roster import Tenant
from onboarding.ledger import HELD_STATUSES, SENDING_CHANNELS, Record, Status
from onboarding.versori.authorize_url import Link

if TYPE_CHECKING:
    from onboarding.mail import MailSender, MailTemplates

# An admin who opened the link, or declined at the provider, is reminded too; a tenant whose
# connection broke or is gone gets a reconnect email.
REMINDABLE = frozenset(
    {
        Status.DELIVERED,
        Status.REMINDED,
        Status.EXPIRED,
        Status.OPENED,
        Status.DECLINED,
        Status.BROKEN,
        Status.DISCONNECTED,
    }
)


@dataclass
class Issued:
    """A connector's link for one tenant, made or reused in this run, not yet delivered."""

    run: ConnectorRun
    link: Link
    expires_at: datetime
    reminders: int = 0  # reminders sent so far for this link's connector
    channel: str = ""  # how its first email went (email, both), for a reminder
    declined: bool = False  # for a reminder: the admin said no at the provider last time
    reconnect: str = ""  # for a reminder: why the tenant connects again (broken, disconnected)
    # What the email carries, once chosen: the authorize URL, or a durable connect link.
    mailed: tuple[str, datetime] | None = None


# What a connector holds for a tenant while the tenant's slice is retried.
Settled = Issued | TenantOutcome


@dataclass
class Campaign:
    """What every tenant of a run shares: one ConnectorRun per connector (its own client,
    pacer and batch stop), one mailer; safe to use from many threads."""

    connectors: list[ConnectorRun]
    deliver: Delivery = Delivery.STORE
    mailer: MailSender | None = None
    templates: MailTemplates | None = None
    rule: RetryRule = field(default_factory=RetryRule)
    # For each connector id, the tenants that needed nothing from it when the batch began.
    needing_nothing: dict[str, set[str]] = field(default_factory=dict)
    # Set for a reminder batch: a tenant is due while last sent before this, and reminded
    # fewer than max_reminders times.
    remind_before: datetime | None = None
    max_reminders: int = 0
    # ONBOARD_CONNECT_BASE_URL: when set, emails carry a durable connect link of the connect
    # service (onboard connect-server) instead of the raw authorize URL.
    connect_base_url: str | None = None
    # A tenant's links and final outcomes while its slice is retried: a retry calls only the
    # connectors that failed transiently. Each tenant is handled by one thread at a time.
    held: dict[str, dict[str, Settled]] = field(default_factory=dict)
    # Asked by the batch (flows/batching): a tenant's thread hands its link to the ledger's
    # writer and goes on to its next call; the slice confirms its links (confirm_links) before
    # it counts, reports or lets go of a tenant. Honoured when links are only stored, under one
    # connector (see defers_writes).
    defer_writes: bool = False

    @property
    def defers_writes(self) -> bool:
        """Whether links are recorded without the tenant's thread waiting: asked for, and safe.
        An email needs its link recorded first (the ledger marks that very link sending); in a
        campaign of several connectors a link that failed to record would have to be tried
        again alone, while the others are held (`held`): both wait, as a retry needs."""
        return self.defer_writes and not self.deliver.sends_email and len(self.connectors) == 1

    @property
    def name(self) -> str:
        return " + ".join(c.profile.name for c in self.connectors)

    @property
    def stop_reason(self) -> str:
        """Set once every connector has stopped (a bad key stops them all)."""
        reasons = [c.stop.reason for c in self.connectors]
        return "; ".join(dict.fromkeys(reasons)) if all(reasons) else ""

    def claim(self, tenant_ids: list[str]) -> set[str]:
        """The tenants this run now holds under every connector; one held elsewhere under any
        connector is let go under the others too."""
        held = [c.claim(tenant_ids) for c in self.connectors]
        everywhere = set.intersection(*held)
        for connector, got in zip(self.connectors, held, strict=True):
            if got - everywhere:
                connector.release(list(got - everywhere))
        return everywhere

    def release(self, tenant_ids: list[str]) -> None:
        for connector in self.connectors:
            connector.release(tenant_ids)

    def settled(self, tenant_ids: list[str]) -> set[str]:
        """Those needing nothing from any connector now; what each connector needs nothing
        for is remembered (needing_nothing), so a tenant is asked only for what it lacks."""
        per_connector = []
        for c in self.connectors:
            done = c.settled(tenant_ids, self.remind_before, self.max_reminders)
            self.needing_nothing.setdefault(c.connector_id, set()).update(done)
            per_connector.append(done)
        return set.intersection(*per_connector)

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None:
        for connector in self.connectors:
            connector.report(tenant_id, status, error_code)

    def not_attempted(self, tenant: Tenant) -> TenantOutcome:
        untried = {c.connector_id: c.not_attempted(tenant) for c in self.connectors}
        return self.outcome(tenant.tenant_id, untried)

    def outcome(self, tenant_id: str, by_connector: dict[str, TenantOutcome]) -> TenantOutcome:
        """The tenant's outcome from each connector's, in the campaign's order."""
        if len(self.connectors) == 1:  # its own, as `combined` would make it (not renamed)
            only = by_connector[self.connectors[0].connector_id]
            return only if not only.connector else replace(only, connector="")
        parts = [
            replace(by_connector[c.connector_id], connector=c.profile.name) for c in self.connectors
        ]
        return combined(tenant_id, parts)


@dataclass(frozen=True)
class Wanted:
    """A connector's link is wanted: `reuse` a stored one with time left, else make one."""

    record: Record | None
    reuse: bool


# What a step wants of each connector for its tenant: an outcome decided already, or a link.
Want = Callable[[ConnectorRun], "TenantOutcome | Wanted"]


def onboard_tenant(campaign: Campaign, tenant: Tenant, tries: Tries) -> TenantOutcome:
    """Issue every link the tenant needs, then deliver them: stored, or in one email. Raises
    RetryLater when `decide` says a failure is to be tried again (before anything is mailed)."""

    def wanted(connector: ConnectorRun) -> TenantOutcome | Wanted:
        if tenant.tenant_id in campaign.needing_nothing.get(connector.connector_id, ()):
            return TenantOutcome(tenant.tenant_id, OutcomeStatus.SKIPPED)
        return Wanted(record=None, reuse=campaign.deliver.sends_email)

    _issue_links(campaign, tenant, wanted, tries)
    return _deliver(campaign, tenant, tries, reminder=False)


def remind_tenant(campaign: Campaign, tenant: Tenant, tries: Tries) -> TenantOutcome:
    """One reminder covering every connector the tenant was emailed and has not connected
    (fewer than `max_reminders` times so far); links past their time are re-issued first."""

    def wanted(connector: ConnectorRun) -> TenantOutcome | Wanted:
        record = connector.ledger.get(tenant.tenant_id, connector.connector_id)
        if record is not None and record.status in HELD_STATUSES:
            return TenantOutcome(tenant.tenant_id, OutcomeStatus.CONNECTED)
        not_due = campaign.needing_nothing.get(connector.connector_id, ())
        if record is None or tenant.tenant_id in not_due:
            return TenantOutcome(tenant.tenant_id, OutcomeStatus.SKIPPED)
        if not _remindable(record, campaign.max_reminders):
            return TenantOutcome(tenant.tenant_id, OutcomeStatus.SKIPPED)
        return Wanted(record=record, reuse=True)

    _issue_links(campaign, tenant, wanted, tries)
    return _deliver(campaign, tenant, tries, reminder=True)


def _remindable(record: Record, max_reminders: int) -> bool:
    return (
        record.status in REMINDABLE
        and record.delivery_channel in SENDING_CHANNELS
        and record.reminders < max_reminders
    )


def _issue_links(campaign: Campaign, tenant: Tenant, wanted: Want, tries: Tries) -> None:
    """For each connector not settled in an earlier attempt, what `wanted` says: an outcome,
    or a link issued. Raises RetryLater for the first failure to retry, once every connector
    was tried."""
    held = campaign.held.setdefault(tenant.tenant_id, {})
    retry: BaseException | None = None
    for connector in campaign.connectors:
        if connector.connector_id in held:
            continue
        got = _issue(campaign, connector, tenant, wanted, tries)
        if isinstance(got, BaseException):
            retry = retry or got
        else:
            held[connector.connector_id] = got
    if retry is not None:
        raise RetryLater(retry)


def _issue(
    campaign: Campaign, connector: ConnectorRun, tenant: Tenant, wanted: Want, tries: Tries
) -> Settled | BaseException:
    """The connector's link for the tenant (reused, or made and recorded), or its outcome; a
    failure to be tried again comes back as the error itself."""
    if connector.stop.reason:
        return connector.not_attempted(tenant)
    called = False
    try:
        decided = wanted(connector)
        if isinstance(decided, TenantOutcome):
            return decided
        reuse = decided.reuse
        issued = connector.reusable_link(tenant.tenant_id, decided.record) if reuse else None
        if issued is None:
            called = True
            issued = connector.initialise_link(tenant, defer=campaign.defers_writes)
    except BatchStoppedError:  # stopped while it waited at the gate: nothing was called
        return connector.not_attempted(tenant)
    except Exception as exc:
        return _failed(campaign, connector, tenant, exc, tries, called)
    connector.stop.succeeded()
    link, expires_at = issued
    if decided.record is None:
        return Issued(connector, link, expires_at)
    record = decided.record
    channel, declined = record.delivery_channel or "", record.status is Status.DECLINED
    reconnect = record.reconnect_of or ""
    return Issued(connector, link, expires_at, record.reminders, channel, declined, reconnect)


def _failed(
    campaign: Campaign,
    connector: ConnectorRun,
    tenant: Tenant,
    exc: Exception,
    tries: Tries,
    called: bool,
) -> TenantOutcome | Exception:
    """A connector's failure for the tenant, recorded (`called`: with the call counted in its
    attempts): the error itself when it is to be tried again, else its final outcome, reported."""
    connector.record_failure(tenant, exc, count_attempt=called)
    if decide(exc, tenant.tenant_id, tries, campaign.rule, connector.stop) is Verdict.RETRY:
        return exc
    outcome = failed_outcome(tenant.tenant_id, exc)
    connector.report(tenant.tenant_id, Status.FAILED, outcome.error_code)
    return outcome


def confirm_links(
    campaign: Campaign, tenant_ids: list[str], tries: Callable[[str], Tries]
) -> dict[str, TenantOutcome | RetryLater]:
    """Wait until the links these tenants' steps handed to the ledger are committed (see
    Campaign.defers_writes). Each one the ledger could not record is decided as if recording
    it had failed in the step: the tenant's new outcome, or RetryLater (`tries`, by tenant id,
    where it stands). Tenants not in the answer keep the outcome their step gave."""
    decided: dict[str, TenantOutcome | RetryLater] = {}
    for connector in campaign.connectors:
        for tenant_id, (tenant, exc) in connector.confirm_links(tenant_ids).items():
            got = _failed(campaign, connector, tenant, exc, tries(tenant_id), called=True)
            if isinstance(got, TenantOutcome):
                decided[tenant_id] = campaign.outcome(tenant_id, {connector.connector_id: got})
            else:
                decided[tenant_id] = RetryLater(got)
    return decided


def _deliver(campaign: Campaign, tenant: Tenant, tries: Tries, reminder: bool) -> TenantOutcome:
    held = campaign.held[tenant.tenant_id]
    issued = [h for h in held.values() if isinstance(h, Issued)]
    outcomes = {c: h for c, h in held.items() if isinstance(h, TenantOutcome)}
    if issued and campaign.deliver.sends_email:
        outcomes.update(_mail(campaign, tenant, issued, tries, reminder))
    else:
        for h in issued:
            outcomes[h.run.connector_id] = succeeded(tenant.tenant_id, Status.DELIVERED, h.link)
    del campaign.held[tenant.tenant_id]
    return campaign.outcome(tenant.tenant_id, outcomes)


def _mail(
    campaign: Campaign, tenant: Tenant, issued: list[Issued], tries: Tries, reminder: bool
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
            h.run.record_failure(tenant, exc, count_attempt=False)
        if decide(exc, tenant_id, tries, campaign.rule) is Verdict.RETRY:
            raise RetryLater(exc) from exc
        for h in sending:
            outcome = failed_outcome(tenant_id, exc)
            outcomes[h.run.connector_id] = outcome
            h.run.report(tenant_id, Status.FAILED, outcome.error_code)
        return outcomes
    status = Status.REMINDED if reminder else Status.DELIVERED
    for h in sending:
        ledger, connector_id = h.run.ledger, h.run.connector_id
        if reminder:
            ledger.mark_reminded(
                tenant_id, connector_id, channel=h.channel or "email", state=h.link.state
            )
        else:
            ledger.mark_delivered(
                tenant_id, connector_id, channel=campaign.deliver.value, state=h.link.state
            )
        h.run.report(tenant_id, status)
        outcomes[connector_id] = succeeded(tenant_id, status, h.link)
    return outcomes


def _message(
    campaign: Campaign, tenant: Tenant, issued: list[Issued], reminder: bool
) -> EmailMessage:
    from onboarding.mail import MailLink, build_message

    assert campaign.mailer is not None and campaign.templates is not None
    links = []
    for h in issued:
        url, expires_at = _mailed(campaign, tenant, h)
        # A reminder says when the admin opened a connect link and did not finish.
        opens = (
            h.run.ledger.connect_opens(h.run.connector_id, [tenant.tenant_id]) if reminder else {}
        )
        opened = opens.get(tenant.tenant_id)
        links.append(
            MailLink(
                h.run.profile.name,
                h.run.connector_id,
                url,
                h.link.state,
                expires_at,
                display_name=h.run.profile.display_name,
                opened_at=opened.first_at if opened else None,
                declined=h.declined,
                reconnect=h.reconnect,
                access=tuple(h.run.profile.access),
                brand=h.run.profile.brand,
            )
        )
    return build_message(
        tenant=tenant,
        links=links,
        email_from=campaign.mailer.email_from,
        templates=campaign.templates,
        reminder=1 + max(h.reminders for h in issued) if reminder else 0,
    )


def _mailed(campaign: Campaign, tenant: Tenant, issued: Issued) -> tuple[str, datetime]:
    """The link the email carries and its expiry: the authorize URL, or, with a connect base
    URL, a new durable connect link (its token kept only as a hash; older ones stay valid)
    that lives the profile's connect_link_days. Chosen once per issued link."""
    if issued.mailed is None:
        if campaign.connect_base_url is None:
            issued.mailed = (issued.link.url, issued.expires_at)
        else:
            run = issued.run
            token = issue_connect_link(run.ledger, tenant.tenant_id, run.profile, run.profile_path)
            days = timedelta(days=run.profile.connect_link_days)
            issued.mailed = (connect_url(campaign.connect_base_url, token), run.clock() + days)
    return issued.mailed


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
            if not h.run.ledger.mark_sending(
                tenant.tenant_id, h.run.connector_id, message_id=message_id, state=h.link.state
            )
        ]
        if not refused:
            return sending, message
        for h in refused:
            outcomes[h.run.connector_id] = h.run.outcome_not_sent(tenant.tenant_id)
        sending = [h for h in sending if h not in refused]
    return sending, None
