"""A slice: several tenants handled as one unit of work (one Prefect task run), each tenant
still tried, recorded and reported on its own.

One attempt at a slice runs its pending tenants concurrently on the batch's shared thread pool,
one call per tenant. A tenant that failed transiently stays pending, so a retried slice calls
only those tenants again: its done tenants are never called twice, and attempts never multiply.

Before its first attempt a slice claims its tenants in the ledger (Ledger.claim): a tenant that
another live run is working on is waited for, then looked at again, so two runs of one roster
at once never initialise or mail a tenant twice. A tenant is let go once it is decided.

When links are only stored (Campaign.defers_writes), a tenant's thread hands its link to the
ledger's writer and goes on to the next tenant; the attempt then waits for its links to be
committed, and only then counts its tenants and lets go of their claims (a link the ledger
could not record is decided as if recording it had failed in the step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from onboarding.batch.campaign import Campaign, confirm_links
from onboarding.batch.outcomes import OutcomeStatus, TenantOutcome, failed_outcome
from onboarding.batch.retry_policy import RetryLater, Tries, Verdict, decide
from onboarding.errors import APITimeoutError, OnboardingError, is_transient
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Status

# Claimed tenants another run holds are looked at again this often, for at most this long: a
# live run lets go of a slice when it is decided, a dead one's lease lapses within
# RUN_LEASE_SECONDS (onboarding/ledger/run_coordination.py).
CLAIM_POLL_SECONDS = 0.5
CLAIM_WAIT_SECONDS = 30.0

# A tenant's step: onboarding.batch.campaign.onboard_tenant or remind_tenant.
Step = Callable[[Campaign, Tenant, Tries], TenantOutcome]


class SliceFailed(OnboardingError):
    """Some tenants of a slice failed. `retryable` are those a retry of the slice would call
    again (their last error by tenant id); `outcomes` has every tenant, the retryable ones
    counted as failed, for when no retry is left."""

    code = "slice_failed"

    def __init__(
        self, label: str, outcomes: list[TenantOutcome], retryable: dict[str, BaseException]
    ) -> None:
        self.label = label
        self.outcomes = outcomes
        self.retryable = retryable
        failed = [o for o in outcomes if not o.ok]
        shown = "; ".join(f"{o.tenant_id}: {o.error_code}" for o in failed[:5])
        more = f"; +{len(failed) - 5} more" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} of {len(outcomes)} tenant(s) of {label} failed ({shown}{more})"
            + (f"; {len(retryable)} may be retried" if retryable else "")
        )


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

    def tries(self, tenant_id: str, last_attempt: bool) -> Tries:
        elapsed = time.monotonic() - (self.claimed_at or time.monotonic())
        return Tries(last_attempt, elapsed, self.timeouts.get(tenant_id, 0))


def run_slice(
    campaign: Campaign,
    tenant_slice: TenantSlice,
    step: Step,
    pool: Executor | None,
    last_attempt: bool,
) -> list[TenantOutcome]:
    """One attempt over the slice's pending tenants: `step` for each, concurrently on `pool`
    (in this thread for one tenant, or without a pool).

    Returns every tenant's outcome when all succeeded. Otherwise raises: a one-tenant slice
    raises the tenant's own error (the task run shows the real cause), a larger one SliceFailed,
    so that the task run's state says some of its tenants failed. A tenant whose step raised
    RetryLater stays pending; every other outcome is final, and its claim let go."""
    if tenant_slice.claimed_at is None:
        _claim(campaign, tenant_slice)
    pending = tenant_slice.pending()

    def attempt(tenant: Tenant) -> TenantOutcome | RetryLater:
        tid = tenant.tenant_id
        if campaign.stop_reason:
            earlier = tenant_slice.errors.get(tid)
            if earlier is not None:  # it was tried: it keeps its real error
                return _final(campaign, tid, earlier)
            return campaign.not_attempted(tenant)
        tries = tenant_slice.tries(tid, last_attempt)
        try:
            return step(campaign, tenant, tries)
        except RetryLater as later:
            return later
        except Exception as exc:  # not the step's own decision: a failure outside its tries
            if decide(exc, tid, tries, campaign.rule) is Verdict.RETRY:
                return RetryLater(exc)
            return _final(campaign, tid, exc)

    if pool is None or len(pending) == 1:
        results = [attempt(t) for t in pending]
    else:
        results = list(pool.map(attempt, pending))
    if campaign.defers_writes:  # nothing is counted, reported or let go before it is recorded
        ids = [t.tenant_id for t in pending]
        redo = confirm_links(campaign, ids, lambda tid: tenant_slice.tries(tid, last_attempt))
        if redo:
            results = [redo.get(t.tenant_id, r) for t, r in zip(pending, results, strict=True)]

    retryable = _settle(campaign, tenant_slice, pending, results)
    if not retryable and all(o.ok for o in tenant_slice.done.values()):
        return tenant_slice.outcomes()
    raise _failure(tenant_slice, retryable)


def _settle(
    campaign: Campaign,
    tenant_slice: TenantSlice,
    pending: list[Tenant],
    results: list[TenantOutcome | RetryLater],
) -> dict[str, BaseException]:
    """Record what this attempt decided; let go of the decided tenants' claims; return the
    tenants to try again, with their errors."""
    retryable: dict[str, BaseException] = {}
    for tenant, result in zip(pending, results, strict=True):
        tid = tenant.tenant_id
        if isinstance(result, TenantOutcome):
            tenant_slice.done[tid] = result
            continue
        tenant_slice.errors[tid] = result.cause
        if campaign.stop_reason:  # stopped meanwhile: no retry for anyone
            tenant_slice.done[tid] = _final(campaign, tid, result.cause)
            continue
        retryable[tid] = result.cause
        if isinstance(result.cause, APITimeoutError):
            tenant_slice.timeouts[tid] = tenant_slice.timeouts.get(tid, 0) + 1
    decided = [t.tenant_id for t in pending if t.tenant_id not in retryable]
    if decided:
        campaign.release(decided)
    return retryable


def _failure(tenant_slice: TenantSlice, retryable: dict[str, BaseException]) -> BaseException:
    """What a slice with failed tenants raises: a one-tenant slice its tenant's own error, so
    the task run shows the real cause (but not a transient one it will not be tried again
    for: its deadline, a second timeout, a stopped batch; the task's retry condition would
    retry that); else SliceFailed, a tenant failed in an earlier attempt keeping it failed."""
    if len(tenant_slice.tenants) == 1:
        tid = tenant_slice.tenants[0].tenant_id
        error = retryable.get(tid) or getattr(tenant_slice.done.get(tid), "cause", None)
        if error is not None and (tid in retryable or not is_transient(error)):
            return error
    outcomes = [
        tenant_slice.done.get(t.tenant_id) or failed_outcome(t.tenant_id, retryable[t.tenant_id])
        for t in tenant_slice.tenants
    ]
    return SliceFailed(tenant_slice.label, outcomes, retryable)


def _final(campaign: Campaign, tenant_id: str, exc: BaseException) -> TenantOutcome:
    outcome = failed_outcome(tenant_id, exc)
    campaign.report(tenant_id, Status.FAILED, outcome.error_code)
    return outcome


def _claim(campaign: Campaign, tenant_slice: TenantSlice) -> None:
    """Claim the slice's tenants; wait (a while) for those another run holds; decide as
    skipped those that need nothing any more, and those still held elsewhere after the wait."""
    wanted = [t.tenant_id for t in tenant_slice.pending()]
    held = campaign.claim(wanted)
    waited_until = time.monotonic() + CLAIM_WAIT_SECONDS
    while len(held) < len(wanted) and time.monotonic() < waited_until and not campaign.stop_reason:
        time.sleep(CLAIM_POLL_SECONDS)
        held |= campaign.claim([t for t in wanted if t not in held])
    tenant_slice.claimed_at = time.monotonic()
    settled = campaign.settled([t for t in wanted if t in held])
    for tid in wanted:
        if tid not in held:
            tenant_slice.done[tid] = TenantOutcome(
                tid,
                OutcomeStatus.SKIPPED,
                error_message="another run is working on this tenant; the next run picks it "
                "up if that run does not finish it",
            )
        elif tid in settled:
            tenant_slice.done[tid] = TenantOutcome(tid, OutcomeStatus.SKIPPED)
    if settled:
        campaign.release(list(settled))
