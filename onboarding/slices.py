"""A slice: several tenants handled as one unit of work (one Prefect task run), each tenant
still tried, recorded and reported on its own.

One attempt at a slice runs its pending tenants concurrently on the batch's shared thread pool,
one call per tenant. A tenant that failed transiently stays pending, so a retried slice calls
only those tenants again: its done tenants are never called twice, and attempts never multiply.

Before its first attempt a slice claims its tenants in the ledger (Ledger.claim): a tenant that
another live run is working on is waited for, then looked at again, so two runs of one roster
at once never initialise or mail a tenant twice. A tenant is let go once it is decided.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from onboarding.delivery import Delivery
from onboarding.errors import APITimeoutError, SliceFailed, worth_retrying
from onboarding.ledger import Status
from onboarding.retry_policy import RetryRule, Verdict, verdict
from onboarding.roster import Tenant
from onboarding.tenant_steps import TenantOutcome, failed_outcome

# Claimed tenants another run holds are looked at again this often, for at most this long: a
# live run lets go of a slice when it is decided, a dead one's lease lapses within
# RUN_LEASE_SECONDS (onboarding/ledger/store.py).
CLAIM_POLL_SECONDS = 0.5
CLAIM_WAIT_SECONDS = 30.0


class BatchJob(Protocol):
    """What a batch's slices share: one connector's OnboardingJob, or a Campaign of several."""

    deliver: Delivery
    # When a failed tenant is tried again within the run (its deadline, timeouts).
    rule: RetryRule

    @property
    def name(self) -> str: ...

    @property
    def stop_reason(self) -> str:
        """Why the batch stopped (onboarding.retry_policy.BatchStop), or empty."""
        ...

    def note(self, tenant_id: str, outcome: TenantOutcome | BaseException) -> None:
        """Told of each tenant's try: what decides when the batch stops."""
        ...

    def report(self, tenant_id: str, status: Status | str, error_code: str = "") -> None: ...

    def not_attempted(self, tenant: Tenant) -> TenantOutcome: ...

    def claim(self, tenant_ids: list[str]) -> set[str]:
        """Claim the tenants in the ledger; those this run now holds."""
        ...

    def release(self, tenant_ids: list[str]) -> None: ...

    def settled(self, tenant_ids: list[str]) -> set[str]:
        """Of these claimed tenants, those that need nothing any more (another run did them
        since the batch began)."""
        ...


Step = Callable[[Any, Tenant], TenantOutcome]


@dataclass
class TenantSlice:
    """Some tenants of a batch, found between roster positions `first` and `last` (1-based;
    tenants that needed nothing were left out), and what became of each so far."""

    tenants: list[Tenant]
    first: int = 1
    last: int = 0
    done: dict[str, TenantOutcome] = field(default_factory=dict)
    # Set once its tenants are claimed (the first attempt); when, for the tenant deadline.
    claimed_at: float | None = None
    # Each tenant's last error, and how many of its tries timed out.
    errors: dict[str, BaseException] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)

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
    the task run's state says some of its tenants failed. A tenant that failed transiently
    stays pending while `verdict` says retry; every other outcome is final, reported once, and
    its claim let go."""
    if tenant_slice.claimed_at is None:
        _claim(job, tenant_slice)
    pending = tenant_slice.pending()

    def attempt(tenant: Tenant) -> TenantOutcome | BaseException:
        if job.stop_reason:
            earlier = tenant_slice.errors.get(tenant.tenant_id)
            if earlier is not None:  # it was tried: it keeps its real error
                return _final(job, tenant.tenant_id, earlier)
            return job.not_attempted(tenant)
        try:
            outcome = step(job, tenant)
        except Exception as exc:
            job.note(tenant.tenant_id, exc)
            return exc
        job.note(tenant.tenant_id, outcome)
        return outcome

    if pool is None or len(pending) == 1:
        results = [attempt(t) for t in pending]
    else:
        results = list(pool.map(attempt, pending))

    elapsed = time.monotonic() - (tenant_slice.claimed_at or time.monotonic())
    retryable: dict[str, BaseException] = {}
    decided: list[str] = []
    for tenant, result in zip(pending, results, strict=True):
        tid = tenant.tenant_id
        if isinstance(result, TenantOutcome):
            tenant_slice.done[tid] = result
            decided.append(tid)
            continue
        tenant_slice.errors[tid] = result
        if isinstance(result, APITimeoutError):
            tenant_slice.timeouts[tid] = tenant_slice.timeouts.get(tid, 0) + 1
        timeouts = tenant_slice.timeouts.get(tid, 0)
        if (
            not job.stop_reason
            and verdict(
                result,
                last_attempt=last_attempt,
                elapsed=elapsed,
                timeouts=timeouts,
                rule=job.rule,
            )
            is Verdict.RETRY
        ):
            retryable[tid] = result
            continue
        tenant_slice.done[tid] = _final(job, tid, result)
        decided.append(tid)
    if decided:
        job.release(decided)

    if not retryable and all(o.ok for o in tenant_slice.done.values()):
        return tenant_slice.outcomes()
    if len(tenant_slice.tenants) == 1:
        tid = tenant_slice.tenants[0].tenant_id
        error = tenant_slice.errors.get(tid)
        # The tenant's own error, so the task run shows the real cause; but not a transient
        # one it will not be tried again for (its deadline, a second timeout, a stopped
        # batch): the task's retry condition would retry that.
        if error is not None and (tid in retryable or not worth_retrying(error)):
            raise error
    # A tenant that failed for good in an earlier attempt keeps the slice failed.
    outcomes = [
        tenant_slice.done.get(t.tenant_id) or failed_outcome(t.tenant_id, retryable[t.tenant_id])
        for t in tenant_slice.tenants
    ]
    raise SliceFailed(tenant_slice.label, outcomes, retryable)


def _final(job: BatchJob, tenant_id: str, exc: BaseException) -> TenantOutcome:
    outcome = failed_outcome(tenant_id, exc)
    job.report(tenant_id, Status.FAILED, outcome.error_code)
    return outcome


def _claim(job: BatchJob, tenant_slice: TenantSlice) -> None:
    """Claim the slice's tenants; wait (a while) for those another run holds; decide as
    skipped those that need nothing any more, and those still held elsewhere after the wait."""
    wanted = [t.tenant_id for t in tenant_slice.pending()]
    held = job.claim(wanted)
    waited_until = time.monotonic() + CLAIM_WAIT_SECONDS
    while len(held) < len(wanted) and time.monotonic() < waited_until and not job.stop_reason:
        time.sleep(CLAIM_POLL_SECONDS)
        held |= job.claim([t for t in wanted if t not in held])
    tenant_slice.claimed_at = time.monotonic()
    settled = job.settled([t for t in wanted if t in held])
    for tid in wanted:
        if tid not in held:
            tenant_slice.done[tid] = TenantOutcome(
                tid,
                "skipped",
                error_message="another run is working on this tenant; the next run picks it "
                "up if that run does not finish it",
            )
        elif tid in settled:
            tenant_slice.done[tid] = TenantOutcome(tid, "skipped")
    if settled:
        job.release(list(settled))
