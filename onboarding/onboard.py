"""One tenant's data path, without Prefect: render, initialise, check, record, deliver."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from onboarding.client import VersoriClient
from onboarding.errors import OnboardingError
from onboarding.ledger import Ledger, Status, utcnow
from onboarding.links import check_link, mask_state
from onboarding.profile import ConnectorProfile
from onboarding.roster import Tenant

log = logging.getLogger(__name__)


class Delivery(StrEnum):
    STORE = "store"


@dataclass
class OnboardingJob:
    """What every tenant of one batch shares. One per flow run; safe to use from many threads."""

    profile: ConnectorProfile
    client: VersoriClient
    ledger: Ledger
    deliver: Delivery = Delivery.STORE
    run_id: str | None = None
    clock: Callable[[], datetime] = field(default=utcnow)
    # The latest attempt's result per tenant, for the flow to collect without asking the
    # orchestrator for it. Written by worker threads, popped by the flow: one key per tenant.
    latest: dict[str, TenantOutcome | Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantOutcome:
    """One tenant's row in a run's table: nothing secret in it."""

    tenant_id: str
    status: str
    link_host: str = ""
    masked_state: str = ""
    error_code: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.status not in (Status.FAILED, Status.PENDING)


def onboard_tenant(job: OnboardingJob, tenant: Tenant) -> TenantOutcome:
    """Make, check, record and deliver one tenant's link. Every failure is recorded, then raised
    again so that the caller may retry it."""
    profile = job.profile
    identity: dict[str, Any] = {
        "tenant_id": tenant.tenant_id,
        "connector_id": profile.connector_id,
        "profile": profile.name,
        "tenant_name": tenant.name,
        "admin_email": tenant.admin_email,
        "run_id": job.run_id,
    }
    try:
        request = profile.render(tenant.values)
        url = job.client.initialise(profile.organisation_id, profile.connector_id, request)
        link = check_link(url, request)
        created = job.clock()
        job.ledger.record_link(
            **identity,
            url=link.url,
            state=link.state,
            created_at=created,
            expires_at=created + timedelta(hours=profile.link_ttl_hours),
            delivered_by=job.deliver.value if job.deliver is Delivery.STORE else None,
        )
    except Exception as exc:
        code = exc.code if isinstance(exc, OnboardingError) else "internal_error"
        message = str(exc) if isinstance(exc, OnboardingError) else f"{type(exc).__name__}: {exc}"
        try:
            job.ledger.record_failure(**identity, error_code=code, error_message=message)
        except Exception:
            log.exception("could not record the failure of tenant %s", tenant.tenant_id)
        job.latest[tenant.tenant_id] = exc
        raise
    status = Status.DELIVERED if job.deliver is Delivery.STORE else Status.LINK_CREATED
    outcome = TenantOutcome(
        tenant_id=tenant.tenant_id,
        status=status.value,
        link_host=link.host,
        masked_state=mask_state(link.state),
    )
    job.latest[tenant.tenant_id] = outcome
    return outcome


def failed_outcome(tenant_id: str, exc: BaseException) -> TenantOutcome:
    code = exc.code if isinstance(exc, OnboardingError) else "internal_error"
    return TenantOutcome(
        tenant_id=tenant_id,
        status=Status.FAILED.value,
        error_code=code,
        error_message=str(exc) if isinstance(exc, OnboardingError) else type(exc).__name__,
    )
