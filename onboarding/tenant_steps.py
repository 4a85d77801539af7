"""One tenant's data path, without Prefect: render, initialise, check, record, deliver; and
later, remind (re-issuing a stale link) and record the connection the tenant made."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from onboarding import constants
from onboarding.client import VersoriClient
from onboarding.clock import utcnow
from onboarding.delivery import Delivery
from onboarding.errors import (
    ExpiredStateError,
    LedgerUnavailableError,
    OnboardingError,
    RateLimitedError,
    StateUsedError,
    SupersededStateError,
    UnknownStateError,
)
from onboarding.ledger import ConnectOutcome, Ledger, Record, Status
from onboarding.links import Link, check_link, mask_state
from onboarding.pacing import Pacer
from onboarding.profile import ConnectorProfile
from onboarding.retry_policy import BatchStop, RetryRule
from onboarding.roster import Tenant

if TYPE_CHECKING:
    from onboarding.mail import MailSender, MailTemplates

log = logging.getLogger(__name__)

# The outcome of a tenant an interrupted run never started.
NOT_STARTED = "not_started"

# A link this close to its expiry is not worth sending: make a fresh one instead.
REUSE_MARGIN = timedelta(minutes=30)


@dataclass(frozen=True)
class StatusChange:
    """A tenant's ledger status changed. Nothing secret: no link, state or email address."""

    tenant_id: str
    connector_id: str
    profile: str
    status: str
    error_code: str = ""


def _ignore(change: StatusChange) -> None:
    pass


@dataclass
class OnboardingJob:
    """What every tenant of one batch shares. One per flow run; safe to use from many threads."""

    profile: ConnectorProfile
    client: VersoriClient | None
    ledger: Ledger
    deliver: Delivery = Delivery.STORE
    mailer: MailSender | None = None
    templates: MailTemplates | None = None
    run_id: str | None = None
    pacer: Pacer = field(default_factory=Pacer)
    clock: Callable[[], datetime] = field(default=utcnow)
    # Told of every ledger status change (the flow layer turns them into Prefect events).
    on_status: Callable[[StatusChange], None] = field(default=_ignore)
    # Stops the batch on evidence (the same batch-wide error for several tenants in a row):
    # every tenant not yet started is then recorded not_attempted.
    stop: BatchStop = field(default_factory=BatchStop)
    rule: RetryRule = field(default_factory=RetryRule)
    # Who holds this batch's claims in the ledger (the flow run's id; see Ledger.claim).
    claimant: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set for a reminder batch: a tenant is due while last sent before this, and reminded
    # fewer than max_reminders times.
    remind_before: datetime | None = None
    max_reminders: int = 0

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def stop_reason(self) -> str:
        return self.stop.reason

    def note(self, tenant_id: str, outcome: TenantOutcome | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self.stop.failed(tenant_id, outcome)
        elif outcome.ok:
            self.stop.succeeded()

    def claim(self, tenant_ids: list[str]) -> set[str]:
        cid = self.profile.target_id
        held = self.ledger.claim(self.claimant, [(t, cid) for t in tenant_ids])
        return {t for t, _ in held}

    def release(self, tenant_ids: list[str]) -> None:
        cid = self.profile.target_id
        self.ledger.release(self.claimant, [(t, cid) for t in tenant_ids])

    def settled(self, tenant_ids: list[str]) -> set[str]:
        """Of these tenants, those needing nothing now: for onboarding, connected or holding
        a delivered link with time left; for reminders, no longer due one."""
        cid = self.profile.target_id
        if self.remind_before is None:
            return self.ledger.ids_needing_nothing(cid, only_ids=tenant_ids)
        due = self.ledger.due_for_reminder(
            cid,
            sent_before=self.remind_before,
            max_reminders=self.max_reminders,
            only_ids=tenant_ids,
        )
        return set(tenant_ids) - {r.tenant_id for r in due}

    def not_attempted(self, tenant: Tenant) -> TenantOutcome:
        """A tenant left untried because the batch stopped; recorded so the next run does it.
        After an interrupt nothing is written: the tenant's row stays as it was."""
        if self.stop.interrupted:
            return TenantOutcome(tenant.tenant_id, NOT_STARTED)
        message = f"not attempted: the batch stopped early because {self.stop_reason}"
        self.ledger.record_failure(
            **_identity(self, tenant),
            error_code="not_attempted",
            error_message=message,
            count_attempt=False,
        )
        self.report(tenant.tenant_id, Status.FAILED, "not_attempted")
        return TenantOutcome(
            tenant.tenant_id,
            Status.FAILED.value,
            error_code="not_attempted",
            error_message=message,
        )

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None:
        try:
            self.on_status(
                StatusChange(
                    tenant_id=tenant_id,
                    connector_id=self.profile.target_id,
                    profile=self.profile.name,
                    status=str(status),
                    error_code=error_code,
                )
            )
        except Exception:  # reporting must never fail a tenant whose ledger row is written
            log.exception("could not report the status of tenant %s", tenant_id)


@dataclass(frozen=True)
class TenantOutcome:
    """One tenant's row in a run's table: nothing secret in it. In a campaign, `parts` holds
    the tenant's outcome for each connector (`connector` names it), in the campaign's order."""

    tenant_id: str
    status: str
    link_host: str = ""
    masked_state: str = ""
    error_code: str = ""
    error_message: str = ""
    connector: str = ""
    parts: tuple[TenantOutcome, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status not in (Status.FAILED, Status.PENDING)

    def rows(self) -> list[dict[str, str]]:
        """The table's rows: one per connector in a campaign, else one."""
        return [
            {
                "tenant_id": o.tenant_id,
                "connector": o.connector,
                "status": o.status,
                "link_host": o.link_host,
                "masked_state": o.masked_state,
                "error_code": o.error_code,
                "error_message": o.error_message,
            }
            for o in (self.parts or (self,))
        ]


def onboard_tenant(job: OnboardingJob, tenant: Tenant) -> TenantOutcome:
    """Make (or reuse), check, record and deliver one tenant's link. Every failure is recorded,
    then raised again so that the caller may retry it."""
    with recording_failures(job, tenant) as attempt:
        issued = reusable_link(job, tenant.tenant_id) if job.deliver.sends_email else None
        if issued is None:
            issued = attempt.initialise(job, tenant)
        link, expires_at = issued
        if job.deliver.sends_email:
            if not _send(job, tenant, link, expires_at, reminder=0):
                return not_sent(job, tenant.tenant_id)
            job.ledger.mark_delivered(
                tenant.tenant_id, job.profile.target_id, channel=job.deliver.value
            )
            job.report(tenant.tenant_id, Status.DELIVERED)
    return succeeded(tenant.tenant_id, Status.DELIVERED, link)


def remind_tenant(job: OnboardingJob, tenant_id: str) -> TenantOutcome:
    """Send a reminder to a tenant that has not connected; re-issue its link first when the
    old one is past its time (the old state stays traceable in the ledger's history)."""
    record = job.ledger.get(tenant_id, job.profile.target_id)
    if record is None:
        raise UnknownStateError(f"tenant {tenant_id} is not in the ledger")
    if record.status is Status.CONNECTED:
        return TenantOutcome(tenant_id, Status.CONNECTED.value)
    tenant = tenant_of(record)
    with recording_failures(job, tenant) as attempt:
        issued = reusable_link(job, tenant_id, record)
        if issued is None:
            issued = attempt.initialise(job, tenant)
        link, expires_at = issued
        if not _send(job, tenant, link, expires_at, reminder=record.reminders + 1):
            return not_sent(job, tenant_id)
        job.ledger.mark_reminded(
            tenant_id, job.profile.target_id, channel=record.delivery_channel or "email"
        )
        job.report(tenant_id, Status.REMINDED)
    return succeeded(tenant_id, Status.REMINDED, link)


def record_connection(
    ledger: Ledger, state: str, connection_id: str | None = None, now: datetime | None = None
) -> Record:
    """Mark the tenant owning `state` connected (the app's OAuth callback calls this). A state
    is accepted once, and only while its link is current and unexpired (Ledger.connect_state)."""
    result = ledger.connect_state(state, connection_id=connection_id, at=now or utcnow())
    masked = mask_state(state)
    if result.outcome is ConnectOutcome.CONNECTED and result.record is not None:
        return result.record
    if result.outcome is ConnectOutcome.SUPERSEDED:
        old = result.superseded
        when = f" on {old.superseded_at:%Y-%m-%d %H:%M} UTC" if old else ""
        tenant = old.tenant_id if old else "a tenant"
        raise SupersededStateError(
            f"state {masked} belonged to tenant {tenant}, but a newer link replaced it{when}; "
            "the connection was not recorded: the tenant should use the newest link"
        )
    if result.outcome is ConnectOutcome.USED and result.record is not None:
        raise StateUsedError(
            f"state {masked} was already used: tenant {result.record.tenant_id} is connected; "
            "a state is accepted once, so this callback was not recorded"
        )
    if result.outcome is ConnectOutcome.EXPIRED and result.record is not None:
        raise ExpiredStateError(
            f"state {masked} of tenant {result.record.tenant_id} belongs to a link past its "
            "expiry; the connection was not recorded: the tenant should use a new link"
        )
    raise UnknownStateError(
        f"no tenant owns state {masked}: check that the callback passes the "
        "state Versori returned, and that ONBOARD_DB_URL is the ledger that made the link"
    )


def tenant_of(record: Record) -> Tenant:
    return Tenant(
        tenant_id=record.tenant_id,
        name=record.tenant_name,
        admin_email=record.admin_email,
        fields=record.tenant_fields or {},
    )


def failed_outcome(tenant_id: str, exc: BaseException) -> TenantOutcome:
    code = exc.code if isinstance(exc, OnboardingError) else "internal_error"
    return TenantOutcome(
        tenant_id=tenant_id,
        status=Status.FAILED.value,
        error_code=code,
        error_message=str(exc) if isinstance(exc, OnboardingError) else type(exc).__name__,
    )


@dataclass
class Attempt:
    """One try at a tenant. The ledger's `attempts` counts Versori calls: a link recorded
    counts its call, and a call that failed counts when its failure is recorded; a mail
    retry, or a stored link reused, counts nothing."""

    called: bool = False  # Versori was called in this try
    counted: bool = False  # the ledger counted that call (the link was recorded)

    def initialise(self, job: OnboardingJob, tenant: Tenant) -> tuple[Link, datetime]:
        self.called = True
        issued = initialise_link(job, tenant)
        self.counted = True
        return issued

    @property
    def uncounted_call(self) -> bool:
        return self.called and not self.counted


@contextmanager
def recording_failures(job: OnboardingJob, tenant: Tenant) -> Iterator[Attempt]:
    """Records any failure of the block in the ledger (a stored link stays, for reuse) and lets
    it propagate for the caller's retry policy."""
    attempt = Attempt()
    try:
        yield attempt
    except Exception as exc:
        record_failure(job, tenant, exc, count_attempt=attempt.uncounted_call)
        raise


def record_failure(
    job: OnboardingJob, tenant: Tenant, exc: BaseException, count_attempt: bool
) -> None:
    """Record `exc` as the tenant's last error under the job's connector (a stored link
    stays, for reuse); never raises: the caller goes on with the error it has. A ledger that
    cannot be reached is not the tenant's failure, and could not be written anyway: the
    tenant is tried again."""
    if isinstance(exc, LedgerUnavailableError):
        return
    known = isinstance(exc, OnboardingError)
    try:
        job.ledger.record_failure(
            **_identity(job, tenant),
            error_code=exc.code if isinstance(exc, OnboardingError) else "internal_error",
            error_message=str(exc) if known else f"{type(exc).__name__}: {exc}",
            count_attempt=count_attempt,
        )
    except Exception as err:  # no traceback: it could show the statement being written
        log.warning(
            "could not record the failure of tenant %s: %s", tenant.tenant_id, type(err).__name__
        )


def _identity(job: OnboardingJob, tenant: Tenant) -> dict[str, Any]:
    return {
        "tenant_id": tenant.tenant_id,
        "connector_id": job.profile.target_id,
        "profile": job.profile.name,
        "tenant_name": tenant.name,
        "admin_email": tenant.admin_email,
        "run_id": job.run_id,
    }


def reusable_link(
    job: OnboardingJob, tenant_id: str, record: Record | None = None
) -> tuple[Link, datetime] | None:
    """The tenant's stored link when it was made but not yet delivered (a retry after a mail
    failure, a crash while sending) and has time left: no second initialise, same Message-ID."""
    record = record or job.ledger.get(tenant_id, job.profile.target_id)
    if record is None or not (record.url and record.state and record.expires_at):
        return None
    if record.expires_at - REUSE_MARGIN <= job.clock():
        return None
    return Link(url=record.url, state=record.state), record.expires_at


def initialise_link(job: OnboardingJob, tenant: Tenant) -> tuple[Link, datetime]:
    if job.client is None:
        raise OnboardingError("no Versori client configured for this job")
    profile = job.profile
    request = profile.render(tenant.values)
    job.pacer.wait_before_call()
    try:
        url = job.client.initialise(profile.organisation_id, profile.target_id, request)
    except RateLimitedError as err:
        # Clamped: a hostile or broken Retry-After must not stall every worker for a day.
        asked = err.retry_after if err.retry_after is not None else 1.0
        job.pacer.hold_off(min(asked, constants.MAX_RETRY_AFTER_SECONDS))
        raise
    link = check_link(
        url, request, redirect_uri=profile.redirect_uri, redirect_host=profile.redirect_host
    )
    created = job.clock()
    expires_at = created + timedelta(hours=profile.link_ttl_hours)
    job.ledger.record_link(
        **_identity(job, tenant),
        url=link.url,
        state=link.state,
        created_at=created,
        expires_at=expires_at,
        delivered_by=None if job.deliver.sends_email else job.deliver.value,
        tenant_fields=tenant.fields,
    )
    job.report(
        tenant.tenant_id, Status.LINK_CREATED if job.deliver.sends_email else Status.DELIVERED
    )
    return link, expires_at


def _send(
    job: OnboardingJob, tenant: Tenant, link: Link, expires_at: datetime, reminder: int
) -> bool:
    """Mail the link; False, and nothing sent, when the ledger refused to mark the tenant
    `sending` because it connected meanwhile or holds a newer link (another run's)."""
    from onboarding.mail import MailLink, build_message

    if job.mailer is None or job.templates is None:
        raise OnboardingError("email delivery asked for, but no SMTP sender is configured")
    message = build_message(
        tenant=tenant,
        links=[MailLink(job.profile.name, job.profile.target_id, link.url, link.state, expires_at)],
        email_from=job.mailer.email_from,
        templates=job.templates,
        reminder=reminder,
    )
    if not job.ledger.mark_sending(
        tenant.tenant_id,
        job.profile.target_id,
        message_id=str(message["Message-ID"]),
        state=link.state,
    ):
        return False
    job.mailer.send(message)
    return True


def not_sent(job: OnboardingJob, tenant_id: str) -> TenantOutcome:
    """The outcome of a tenant whose mail was not sent: connected, or skipped because another
    run holds a newer link for it (that run delivers it)."""
    record = job.ledger.get(tenant_id, job.profile.target_id)
    if record is not None and record.status is Status.CONNECTED:
        return TenantOutcome(tenant_id, Status.CONNECTED.value)
    return TenantOutcome(tenant_id, "skipped")


def succeeded(tenant_id: str, status: Status, link: Link) -> TenantOutcome:
    return TenantOutcome(
        tenant_id=tenant_id,
        status=status.value,
        link_host=link.host,
        masked_state=mask_state(link.state),
    )
