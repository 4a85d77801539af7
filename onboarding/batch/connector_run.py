"""One connector's part of a run: its profile, Versori client, pacer and batch stop, and what
a tenant's link takes under it: made (or reused), checked, recorded, reported."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from onboarding.batch.call_pacing import Pacer
from onboarding.batch.delivery import Delivery
from onboarding.batch.outcomes import NOT_STARTED, OutcomeStatus, StatusChange, TenantOutcome
from onboarding.batch.retry_policy import BatchStop
from onboarding.clock import utcnow
from onboarding.errors import LedgerUnavailableError, OnboardingError, RateLimitedError
from onboarding.inputs.profile import ConnectorProfile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Record, Status
from onboarding.ledger.group_commit import Written
from onboarding.versori.authorize_url import Link, check_link
from onboarding.versori.client import VersoriClient

log = logging.getLogger(__name__)

# A link this close to its expiry is not worth sending: make a fresh one instead.
REUSE_MARGIN = timedelta(minutes=30)


def _ignore(change: StatusChange) -> None:
    pass


@dataclass
class ConnectorRun:
    """What every tenant of a run shares under one connector; safe to use from many threads."""

    profile: ConnectorProfile
    client: VersoriClient | None
    ledger: Ledger
    deliver: Delivery = Delivery.STORE
    run_id: str | None = None
    pacer: Pacer = field(default_factory=Pacer)
    clock: Callable[[], datetime] = field(default=utcnow)
    # Told of every ledger status change (the flow layer turns them into Prefect events).
    on_status: Callable[[StatusChange], None] = field(default=_ignore)
    # Stops this connector's part of the batch on evidence (onboarding.batch.retry_policy).
    stop: BatchStop = field(default_factory=BatchStop)
    # Who holds the run's claims in the ledger (the flow run's id; see Ledger.claim).
    claimant: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The profile's path as the run was given it (a durable connect link records it).
    profile_path: str = ""
    # Links handed to the ledger without waiting (initialise_link's `defer`), by tenant id,
    # until confirm_links waits for them.
    _unwritten: dict[str, tuple[Tenant, Written]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _unwritten_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @property
    def connector_id(self) -> str:
        return self.profile.target_id

    def claim(self, tenant_ids: list[str]) -> set[str]:
        held = self.ledger.claim(self.claimant, [(t, self.connector_id) for t in tenant_ids])
        return {t for t, _ in held}

    def release(self, tenant_ids: list[str]) -> None:
        self.ledger.release(self.claimant, [(t, self.connector_id) for t in tenant_ids])

    def settled(
        self, tenant_ids: list[str], remind_before: datetime | None, max_reminders: int
    ) -> set[str]:
        """Of these tenants, those needing nothing now: for onboarding, connected or holding
        a delivered link with time left; for reminders (`remind_before` set), no longer due."""
        if remind_before is None:
            return self.ledger.ids_needing_nothing(self.connector_id, only_ids=tenant_ids)
        due = self.ledger.due_for_reminder(
            self.connector_id,
            sent_before=remind_before,
            max_reminders=max_reminders,
            only_ids=tenant_ids,
        )
        return set(tenant_ids) - {r.tenant_id for r in due}

    def not_attempted(self, tenant: Tenant) -> TenantOutcome:
        """A tenant left untried because the batch stopped; recorded so the next run does it.
        After an interrupt nothing is written: the tenant's row stays as it was."""
        if self.stop.interrupted:
            return TenantOutcome(tenant.tenant_id, NOT_STARTED)
        # The cause alone: what to fix is said once, where the run ends (a tenant's row
        # repeated it once per tenant).
        message = f"not attempted: the batch stopped early because {self.stop.cause}"
        self.ledger.record_failure(
            **self._identity(tenant),
            error_code="not_attempted",
            error_message=message,
            count_attempt=False,
        )
        self.report(tenant.tenant_id, Status.FAILED, "not_attempted")
        return TenantOutcome(
            tenant.tenant_id,
            OutcomeStatus.FAILED,
            error_code="not_attempted",
            error_message=message,
        )

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None:
        change = StatusChange(
            tenant_id, self.connector_id, self.profile.name, str(status), error_code
        )
        try:
            self.on_status(change)
        except Exception:  # reporting must never fail a tenant whose ledger row is written
            log.exception("could not report the status of tenant %s", tenant_id)

    def reusable_link(
        self, tenant_id: str, record: Record | None = None
    ) -> tuple[Link, datetime] | None:
        """The tenant's stored link when it was made but not yet delivered (a retry after a
        mail failure, a crash while sending) and has time left: no second initialise, and the
        same Message-ID."""
        record = record or self.ledger.get(tenant_id, self.connector_id)
        if record is None or not (record.url and record.state and record.expires_at):
            return None
        if record.expires_at - REUSE_MARGIN <= self.clock():
            return None
        return Link(url=record.url, state=record.state), record.expires_at

    def initialise_link(self, tenant: Tenant, defer: bool = False) -> tuple[Link, datetime]:
        """Call Versori for a new link, check it, record it (with the call in `attempts`), and
        report it once it is recorded.

        With `defer`, it is handed to the ledger's writer and this returns at once, so that the
        tenant's thread goes on to its next call while the writer commits links in groups: the
        caller must then `confirm_links` before it counts, delivers or lets go of the tenant."""
        if self.client is None:
            raise OnboardingError("no Versori client configured for this run")
        profile = self.profile
        request = profile.render(tenant.values)
        # Through the batch stop's gate: one call at a time until the key proved itself, and
        # none once the batch stopped (BatchStoppedError: nothing called).
        with self.stop.call(tenant.tenant_id):
            self.pacer.wait_before_call()
            try:
                url = self.client.initialise(profile.organisation_id, profile.target_id, request)
            except RateLimitedError as err:
                self.pacer.hold_off(err.retry_after if err.retry_after is not None else 1.0)
                raise
        link = check_link(
            url, request, redirect_uri=profile.redirect_uri, redirect_host=profile.redirect_host
        )
        created = self.clock()
        expires_at = created + timedelta(hours=profile.link_ttl_hours)
        sent_later = self.deliver.sends_email
        status = Status.LINK_CREATED if sent_later else Status.DELIVERED
        written = self.ledger.submit_link(
            **self._identity(tenant),
            url=link.url,
            state=link.state,
            created_at=created,
            expires_at=expires_at,
            delivered_by=None if sent_later else self.deliver.value,
            tenant_fields=tenant.fields,
            then=lambda: self.report(tenant.tenant_id, status),  # recorded, then reported
        )
        if defer:
            with self._unwritten_lock:
                self._unwritten[tenant.tenant_id] = (tenant, written)
        else:
            written.wait()
        return link, expires_at

    def confirm_links(self, tenant_ids: list[str]) -> dict[str, tuple[Tenant, Exception]]:
        """Wait until the deferred links of these tenants are committed; those the ledger
        could not record, with why (their tenant was reported nothing yet)."""
        failed: dict[str, tuple[Tenant, Exception]] = {}
        for tenant_id in tenant_ids:
            with self._unwritten_lock:
                entry = self._unwritten.pop(tenant_id, None)
            if entry is None:
                continue
            tenant, written = entry
            try:
                written.wait()
            except Exception as err:
                failed[tenant_id] = (tenant, err)
        return failed

    def record_failure(self, tenant: Tenant, exc: BaseException, count_attempt: bool) -> None:
        """Record `exc` as the tenant's last error here (a stored link stays, for reuse);
        never raises: the caller goes on with the error it has. A ledger that cannot be
        reached is not the tenant's failure, and could not be written anyway."""
        if isinstance(exc, LedgerUnavailableError):
            return
        known = isinstance(exc, OnboardingError)
        try:
            self.ledger.record_failure(
                **self._identity(tenant),
                error_code=exc.code if isinstance(exc, OnboardingError) else "internal_error",
                error_message=str(exc) if known else f"{type(exc).__name__}: {exc}",
                count_attempt=count_attempt,
            )
        except Exception as err:  # no traceback: it could show the statement being written
            log.warning(
                "could not record the failure of tenant %s: %s",
                tenant.tenant_id,
                type(err).__name__,
            )

    def outcome_not_sent(self, tenant_id: str) -> TenantOutcome:
        """A tenant whose mail the ledger held back: connected meanwhile, or another run holds
        a newer link for it (that run delivers it)."""
        record = self.ledger.get(tenant_id, self.connector_id)
        if record is not None and record.status is Status.CONNECTED:
            return TenantOutcome(tenant_id, OutcomeStatus.CONNECTED)
        return TenantOutcome(tenant_id, OutcomeStatus.SKIPPED)

    def _identity(self, tenant: Tenant) -> dict[str, Any]:
        return {
            "tenant_id": tenant.tenant_id,
            "connector_id": self.connector_id,
            "profile": self.profile.name,
            "tenant_name": tenant.name,
            "admin_email": tenant.admin_email,
            "run_id": self.run_id,
        }
