"""What became of a tenant in a run, and the status changes reported on the way: nothing
secret in either (no link, state or email address)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from onboarding.errors import OnboardingError
from onboarding.ledger import Status
from onboarding.versori.authorize_url import Link, mask_state

# The outcome of a tenant an interrupted run never started.
NOT_STARTED = "not_started"
# A campaign tenant's status over its connectors: the first of these any connector reached.
_PRECEDENCE = ["reminded", "delivered", "would_initialise", "connected", "skipped"]


@dataclass(frozen=True)
class StatusChange:
    """A tenant's ledger status changed (the flow layer makes a Prefect event of it)."""

    tenant_id: str
    connector_id: str
    profile: str
    status: str
    error_code: str = ""


@dataclass(frozen=True)
class TenantOutcome:
    """One tenant's row in a run's table. In a campaign of several connectors, `parts` holds
    its outcome for each (`connector` names it), in the campaign's order. `cause`, in this
    process only, is the error a failed outcome came from (a one-tenant task run raises it)."""

    tenant_id: str
    status: str
    link_host: str = ""
    masked_state: str = ""
    error_code: str = ""
    error_message: str = ""
    connector: str = ""
    parts: tuple[TenantOutcome, ...] = ()
    cause: BaseException | None = field(default=None, compare=False, repr=False)

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


def failed_outcome(tenant_id: str, exc: BaseException) -> TenantOutcome:
    known = isinstance(exc, OnboardingError)
    return TenantOutcome(
        tenant_id=tenant_id,
        status=Status.FAILED.value,
        error_code=exc.code if isinstance(exc, OnboardingError) else "internal_error",
        error_message=str(exc) if known else type(exc).__name__,
        cause=exc,
    )


def succeeded(tenant_id: str, status: Status, link: Link) -> TenantOutcome:
    return TenantOutcome(
        tenant_id=tenant_id,
        status=status.value,
        link_host=link.host,
        masked_state=mask_state(link.state),
    )


def combined(tenant_id: str, parts: list[TenantOutcome]) -> TenantOutcome:
    """A tenant's outcome over its connectors: one connector's own; for several, failed if
    any part failed (the next run retries that connector), else the most that happened."""
    if len(parts) == 1:
        return replace(parts[0], connector="")
    failed = [p for p in parts if p.status == Status.FAILED]
    if failed:
        first = failed[0]
        return TenantOutcome(
            tenant_id,
            Status.FAILED.value,
            error_code=first.error_code,
            error_message=f"{first.connector}: {first.error_message}",
            parts=tuple(parts),
            cause=first.cause,
        )
    rank = {s: i for i, s in enumerate(_PRECEDENCE)}
    status = min((p.status for p in parts), key=lambda s: rank.get(s, -1))
    return TenantOutcome(tenant_id, status, parts=tuple(parts))
