"""What became of a tenant in a run, and the status changes reported on the way: nothing
secret in either (no link, state or email address)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from onboarding.errors import OnboardingError
from onboarding.ledger import Status
from onboarding.versori.authorize_url import Link, mask_state


class OutcomeStatus(StrEnum):
    """A tenant's status in a run's table: every ledger `Status` (the same values: a test
    keeps them in step), and what only a run says of a tenant. A StrEnum, so it compares,
    formats and serializes (json) as its plain string."""

    # The ledger's Status, value for value.
    PENDING = "pending"
    LINK_CREATED = "link_created"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    REMINDED = "reminded"
    CONNECTED = "connected"
    OPENED = "opened"
    DECLINED = "declined"
    ACTIVATED = "activated"
    BROKEN = "broken"
    DISCONNECTED = "disconnected"
    # A run's only: nothing to do for the tenant (already delivered or connected, another
    # run holds it, no reminder due).
    SKIPPED = "skipped"
    # A dry run's: what a real run would do.
    WOULD_INITIALISE = "would_initialise"
    WOULD_REMIND = "would_remind"
    WOULD_REISSUE = "would_reissue"
    # A tenant an interrupted run never started.
    NOT_STARTED = "not_started"


# The outcome of a tenant an interrupted run never started.
NOT_STARTED = OutcomeStatus.NOT_STARTED
# A campaign tenant's status over its connectors: the first of these any connector reached.
_PRECEDENCE = [
    OutcomeStatus.REMINDED,
    OutcomeStatus.DELIVERED,
    OutcomeStatus.WOULD_INITIALISE,
    OutcomeStatus.CONNECTED,
    OutcomeStatus.SKIPPED,
]


@dataclass(frozen=True)
class StatusChange:
    """A tenant's ledger status changed (the flow layer makes a Prefect event of it)."""

    tenant_id: str
    connector_id: str
    profile: str
    status: str
    error_code: str = ""
    # The tenant's connection in Versori, when the change is about one (connected, activated,
    # broken): the label `onboarding.connection-id` of its event.
    connection_id: str | None = None


@dataclass(frozen=True, init=False)
class TenantOutcome:
    """One tenant's row in a run's table. In a campaign of several connectors, `parts` holds
    its outcome for each (`connector` names it), in the campaign's order. `cause`, in this
    process only, is the error a failed outcome came from (a one-tenant task run raises it).
    `status` may be given as its string ("delivered"): it is made an OutcomeStatus, and an
    unknown one refused (ValueError)."""

    tenant_id: str
    status: OutcomeStatus
    link_host: str = ""
    masked_state: str = ""
    error_code: str = ""
    error_message: str = ""
    connector: str = ""
    parts: tuple[TenantOutcome, ...] = ()
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    def __init__(
        self,
        tenant_id: str,
        status: OutcomeStatus | str,
        link_host: str = "",
        masked_state: str = "",
        error_code: str = "",
        error_message: str = "",
        connector: str = "",
        parts: tuple[TenantOutcome, ...] = (),
        cause: BaseException | None = None,
    ) -> None:
        # Written out (not the dataclass's own) so that a status may be given as a string.
        for name, value in (
            ("tenant_id", tenant_id),
            ("status", OutcomeStatus(status)),
            ("link_host", link_host),
            ("masked_state", masked_state),
            ("error_code", error_code),
            ("error_message", error_message),
            ("connector", connector),
            ("parts", parts),
            ("cause", cause),
        ):
            object.__setattr__(self, name, value)

    @property
    def ok(self) -> bool:
        return self.status not in (OutcomeStatus.FAILED, OutcomeStatus.PENDING)

    def rows(self) -> list[dict[str, str]]:
        """The table's rows: one per connector in a campaign, else one."""
        return [
            {
                "tenant_id": o.tenant_id,
                "connector": o.connector,
                "status": o.status.value,
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
        status=OutcomeStatus.FAILED,
        error_code=exc.code if isinstance(exc, OnboardingError) else "internal_error",
        error_message=str(exc) if known else type(exc).__name__,
        cause=exc,
    )


def succeeded(tenant_id: str, status: Status, link: Link) -> TenantOutcome:
    return TenantOutcome(
        tenant_id=tenant_id,
        status=OutcomeStatus(status),
        link_host=link.host,
        masked_state=mask_state(link.state),
    )


def combined(tenant_id: str, parts: list[TenantOutcome]) -> TenantOutcome:
    """A tenant's outcome over its connectors: one connector's own; for several, failed if
    any part failed (the next run retries that connector), else the most that happened."""
    if len(parts) == 1:
        return replace(parts[0], connector="")
    failed = [p for p in parts if p.status is OutcomeStatus.FAILED]
    if failed:
        first = failed[0]
        return TenantOutcome(
            tenant_id,
            OutcomeStatus.FAILED,
            error_code=first.error_code,
            error_message=f"{first.connector}: {first.error_message}",
            parts=tuple(parts),
            cause=first.cause,
        )
    rank = {s: i for i, s in enumerate(_PRECEDENCE)}
    status = min((p.status for p in parts), key=lambda s: rank.get(s, -1))
    return TenantOutcome(tenant_id, status, parts=tuple(parts))
