"""A tenant's connection, recorded: the app's OAuth callback (or `onboard mark-connected`)
names the `state` it received, and the ledger finds the tenant that owns it."""

from __future__ import annotations

from datetime import datetime

from onboarding.clock import utcnow
from onboarding.errors import (
    ExpiredStateError,
    StateUsedError,
    SupersededStateError,
    UnknownStateError,
)
from onboarding.inputs.roster import Tenant
from onboarding.ledger import ConnectOutcome, Ledger, Record
from onboarding.versori.authorize_url import mask_state


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
