"""A slice of tenants, one attempt at a time, without Prefect: each tenant called once per
attempt, a retry calls only the tenants that failed transiently, and every final outcome is
reported once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from onboarding import constants
from onboarding.errors import (
    AuthenticationError,
    BadRequestError,
    RateLimitedError,
    ServerError,
    SliceFailed,
)
from onboarding.ledger import Ledger
from onboarding.profile import load_profile
from onboarding.roster import Tenant
from onboarding.slices import TenantSlice, run_slice
from onboarding.tenant_steps import OnboardingJob, StatusChange, TenantOutcome

PROFILE = Path(__file__).resolve().parents[2] / "examples" / "profile.yaml"


def tenants(n: int) -> list[Tenant]:
    return [
        Tenant(tenant_id=f"t{i}", name=f"T{i}", admin_email=f"a{i}@x.com", fields={})
        for i in range(1, n + 1)
    ]


class Script:
    """A step that fails each tenant as scripted (a list of errors, then success)."""

    def __init__(self, plan: dict[str, list[Exception]]) -> None:
        self.plan = {k: list(v) for k, v in plan.items()}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, job: OnboardingJob, tenant: Tenant) -> TenantOutcome:
        with self._lock:
            self.calls[tenant.tenant_id] += 1
            errors = self.plan.get(tenant.tenant_id)
            error = errors.pop(0) if errors else None
        if error is not None:
            raise error
        return TenantOutcome(tenant.tenant_id, "delivered")


@pytest.fixture
def job(tmp_path: Path) -> OnboardingJob:
    changes: list[StatusChange] = []
    job = OnboardingJob(
        profile=load_profile(PROFILE),
        client=None,
        ledger=Ledger(f"sqlite:///{tmp_path / 'l.db'}"),
        on_status=changes.append,
    )
    job.changes = changes  # type: ignore[attr-defined]
    return job


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def test_every_tenant_once_in_roster_order(job: OnboardingJob, pool: ThreadPoolExecutor) -> None:
    step = Script({})
    batch = TenantSlice(tenants(10), first=11, last=20)
    outcomes = run_slice(job, batch, step, pool, last_attempt=False)
    assert [o.tenant_id for o in outcomes] == [f"t{i}" for i in range(1, 11)]
    assert set(step.calls.values()) == {1}
    assert batch.label == "tenants 11-20"


def test_a_retry_calls_only_the_tenants_that_failed_transiently(
    job: OnboardingJob, pool: ThreadPoolExecutor
) -> None:
    step = Script(
        {
            "t2": [ServerError(503, "unavailable", "down"), ServerError(502, "bad", "gw")],
            "t3": [BadRequestError(400, "validation_failed", "bad")],
            "t4": [RateLimitedError(429, "rate_limited", "slow", retry_after=3.0)],
        }
    )
    batch = TenantSlice(tenants(5))
    with pytest.raises(SliceFailed) as first:
        run_slice(job, batch, step, pool, last_attempt=False)
    assert set(first.value.retryable) == {"t2", "t4"}
    assert first.value.wait_seconds == 3.0
    # The 400 is final at once and reported once; transient failures are not reported yet.
    assert [(c.tenant_id, c.status) for c in job.changes] == [("t3", "failed")]  # type: ignore[attr-defined]
    assert "t3: validation_failed" in str(first.value)

    with pytest.raises(SliceFailed) as second:
        run_slice(job, batch, step, pool, last_attempt=False)
    assert set(second.value.retryable) == {"t2"}
    with pytest.raises(SliceFailed) as third:  # t3 still failed, so the slice still fails
        run_slice(job, batch, step, pool, last_attempt=False)
    assert third.value.retryable == {}
    assert step.calls == {"t1": 1, "t2": 3, "t3": 1, "t4": 2, "t5": 1}
    by_tenant = {o.tenant_id: o.status for o in third.value.outcomes}
    assert by_tenant == {
        "t1": "delivered",
        "t2": "delivered",
        "t3": "failed",
        "t4": "delivered",
        "t5": "delivered",
    }


def test_on_the_last_attempt_a_transient_failure_is_final(
    job: OnboardingJob, pool: ThreadPoolExecutor
) -> None:
    step = Script({"t1": [ServerError(503, "unavailable", "down")]})
    batch = TenantSlice(tenants(3))
    with pytest.raises(SliceFailed) as failed:
        run_slice(job, batch, step, pool, last_attempt=True)
    assert failed.value.retryable == {}
    assert [o.error_code for o in failed.value.outcomes] == ["unavailable", "", ""]
    assert [(c.tenant_id, c.status, c.error_code) for c in job.changes] == [  # type: ignore[attr-defined]
        ("t1", "failed", "unavailable")
    ]


def test_a_retry_after_beyond_the_cap_is_not_retried(
    job: OnboardingJob, pool: ThreadPoolExecutor
) -> None:
    too_long = constants.MAX_RETRY_AFTER_SECONDS + 1
    step = Script({"t1": [RateLimitedError(429, "rate_limited", "later", retry_after=too_long)]})
    with pytest.raises(SliceFailed) as failed:
        run_slice(job, TenantSlice(tenants(2)), step, pool, last_attempt=False)
    assert failed.value.retryable == {}


def test_one_tenant_raises_its_own_error(job: OnboardingJob) -> None:
    step = Script({"t1": [ServerError(503, "unavailable", "down")]})
    batch = TenantSlice(tenants(1))
    with pytest.raises(ServerError):
        run_slice(job, batch, step, None, last_attempt=False)
    assert batch.label == "t1"
    assert run_slice(job, batch, step, None, last_attempt=False)[0].status == "delivered"


def test_a_batch_fatal_error_stops_the_tenants_not_yet_started(job: OnboardingJob) -> None:
    step = Script({"t1": [AuthenticationError(401, "unauthenticated", "bad key")]})
    batch = TenantSlice(tenants(4))
    with pytest.raises(SliceFailed) as failed:
        run_slice(job, batch, step, None, last_attempt=False)  # in order, one at a time
    assert "bad key" in job.stop_reason
    assert step.calls == {"t1": 1}
    codes = [o.error_code for o in failed.value.outcomes]
    assert codes == ["unauthenticated", "not_attempted", "not_attempted", "not_attempted"]
    record = job.ledger.get("t4", job.profile.target_id)
    assert record is not None and record.error_code == "not_attempted"
    assert record.attempts == 0, "a tenant never tried counts no attempt"


def test_a_step_that_returns_a_failed_outcome_fails_its_one_tenant_slice(
    job: OnboardingJob,
) -> None:
    # A campaign's tenant comes back failed (one connector failed for good) without raising.
    def step(job: OnboardingJob, tenant: Tenant) -> TenantOutcome:
        return TenantOutcome(tenant.tenant_id, "failed", error_code="bad_url")

    with pytest.raises(SliceFailed) as failed:
        run_slice(job, TenantSlice(tenants(1)), step, None, last_attempt=False)
    assert failed.value.retryable == {}
    assert [o.error_code for o in failed.value.outcomes] == ["bad_url"]
