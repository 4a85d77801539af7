"""A slice: several tenants handled as one unit of work (one Prefect task run), each tenant
still tried, recorded and reported on its own.

One attempt at a slice runs its pending tenants concurrently on the batch's shared thread pool,
one call per tenant. A tenant that failed transiently stays pending, so a retried slice calls
only those tenants again: its done tenants are never called twice, and attempts never multiply.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from onboarding.errors import (
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    SliceFailed,
    worth_retrying,
)
from onboarding.ledger import Status
from onboarding.roster import Tenant
from onboarding.tenant_steps import Delivery, TenantOutcome, failed_outcome

# Errors that would fail every remaining tenant the same way: stop the batch, say it once.
BATCH_FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError)


class BatchJob(Protocol):
    """What a batch's slices share: one connector's OnboardingJob, or a Campaign of several."""

    deliver: Delivery
    # Set by the first batch-fatal failure; every tenant not yet started is then not attempted.
    stop_reason: str

    @property
    def name(self) -> str: ...

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None: ...

    def not_attempted(self, tenant: Tenant) -> TenantOutcome: ...


Step = Callable[[Any, Tenant], TenantOutcome]


@dataclass
class TenantSlice:
    """Some tenants of a batch, found between roster positions `first` and `last` (1-based;
    tenants that needed nothing were left out), and what became of each so far."""

    tenants: list[Tenant]
    first: int = 1
    last: int = 0
    done: dict[str, TenantOutcome] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if len(self.tenants) == 1:
            return self.tenants[0].tenant_id
        return f"tenants {self.first}-{max(self.last, self.first + len(self.tenants) - 1)}"

    def pending(self) -> list[Tenant]:
        return [t for t in self.tenants if t.tenant_id not in self.done]

    def outcomes(self) -> list[TenantOutcome]:
        """The outcomes decided so far, in roster order (pending tenants have none yet)."""
        return [self.done[t.tenant_id] for t in self.tenants if t.tenant_id in self.done]


def run_slice(
    job: BatchJob,
    tenant_slice: TenantSlice,
    step: Step,
    pool: Executor | None,
    last_attempt: bool,
) -> list[TenantOutcome]:
    """One attempt over the slice's pending tenants: `step(job, tenant)` for each, concurrently
    on `pool` (in this thread for one tenant, or without a pool).

    Returns every tenant's outcome when all succeeded. Otherwise raises: a one-tenant slice
    raises the tenant's own error (the task run shows the real cause), a larger one, or one
    whose step returned a failed outcome (a campaign's tenant), raises SliceFailed, so that
    the task run's state says some of its tenants failed. A tenant that
    failed transiently stays pending unless this is the last attempt; every other outcome is
    final and reported once."""
    pending = tenant_slice.pending()

    def attempt(tenant: Tenant) -> TenantOutcome | BaseException:
        if job.stop_reason:
            return job.not_attempted(tenant)
        try:
            return step(job, tenant)
        except Exception as exc:
            if isinstance(exc, BATCH_FATAL) and not job.stop_reason:
                job.stop_reason = str(exc)
            return exc

    if pool is None or len(pending) == 1:
        results = [attempt(t) for t in pending]
    else:
        results = list(pool.map(attempt, pending))

    retryable: dict[str, BaseException] = {}
    errors: dict[str, BaseException] = {}
    for tenant, result in zip(pending, results, strict=True):
        tid = tenant.tenant_id
        if isinstance(result, TenantOutcome):
            tenant_slice.done[tid] = result
            continue
        errors[tid] = result
        if worth_retrying(result) and not last_attempt:
            retryable[tid] = result
            continue
        outcome = failed_outcome(tid, result)
        tenant_slice.done[tid] = outcome
        job.report(tid, Status.FAILED, outcome.error_code)

    if not retryable and all(o.ok for o in tenant_slice.done.values()):
        return tenant_slice.outcomes()
    if len(tenant_slice.tenants) == 1 and errors:
        raise next(iter(errors.values()))
    # A tenant that failed for good in an earlier attempt keeps the slice failed.
    outcomes = [
        tenant_slice.done.get(t.tenant_id) or failed_outcome(t.tenant_id, retryable[t.tenant_id])
        for t in tenant_slice.tenants
    ]
    raise SliceFailed(tenant_slice.label, outcomes, retryable)
