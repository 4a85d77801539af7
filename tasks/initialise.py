"""The Prefect task around one tenant's onboarding: retries, run name, no caching."""

from __future__ import annotations

import time
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from onboarding import constants
from onboarding.errors import RateLimitedError, is_transient
from onboarding.onboard import OnboardingJob, TenantOutcome, onboard_tenant, remind_tenant
from onboarding.roster import Tenant


def retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry transport errors, 408, 425, 429 and 5xx only; never sooner than Retry-After asks.

    Prefect's retry delays are fixed when the task is declared, so a server's Retry-After is
    honoured here, where the failure is known: the wait happens before Prefect's own backoff,
    which then adds to it. Sleeping is only reached when Prefect will retry (it asks this
    function only while retries are left).
    """
    exc = state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException) or not is_transient(exc):
        return False
    if isinstance(exc, RateLimitedError) and exc.retry_after:
        if exc.retry_after > constants.MAX_RETRY_AFTER_SECONDS:
            return False
        time.sleep(exc.retry_after)
    return True


# The policy both tasks share. No timeout_seconds: Prefect cannot interrupt a sync task in a
# worker thread (it only warns and waits); the client's own call deadline bounds one attempt.
# Side-effecting tasks never cache, and their results stay in memory.
RETRY_POLICY: dict[str, Any] = {
    "retries": constants.TASK_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=constants.TASK_RETRY_BACKOFF_SECONDS),
    "retry_jitter_factor": constants.TASK_RETRY_JITTER_FACTOR,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@task(name="onboard-tenant", task_run_name="onboard-{tenant.tenant_id}", **RETRY_POLICY)
def onboard_tenant_task(tenant: Tenant, job: OnboardingJob) -> TenantOutcome:
    return onboard_tenant(job, tenant)


@task(name="remind-tenant", task_run_name="remind-{tenant.tenant_id}", **RETRY_POLICY)
def remind_tenant_task(tenant: Tenant, job: OnboardingJob) -> TenantOutcome:
    return remind_tenant(job, tenant.tenant_id)
