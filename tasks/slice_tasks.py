"""The Prefect tasks over a slice of tenants: retries, run names, no caching.

A task run holds one tenant for small batches and up to a hundred for large ones (see
flows/batching/slices.py). Retries are Prefect task retries; a retried slice calls again only
its tenants that failed transiently (onboarding/batch/tenant_slices.py)."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import task_run as current_task_run

from onboarding.batch.campaign import Campaign, onboard_tenant, remind_tenant
from onboarding.batch.outcomes import TenantOutcome
from onboarding.batch.retry_policy import BATCH_RETRY, batch_retry
from onboarding.batch.tenant_slices import SliceFailed, Step, TenantSlice, run_slice
from onboarding.errors import is_transient
from onboarding.settings import RetrySettings


def retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a slice that has tenants to try again (onboarding.batch.retry_policy.decide said so),
    or a one-tenant slice whose own error is transient. A Retry-After is waited out before
    the next call by the connector's pacer, not here. Prefect asks only while retries are left."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, SliceFailed):
        return bool(exc.retryable)
    return isinstance(exc, BaseException) and is_transient(exc)


P = ParamSpec("P")
R = TypeVar("R")

# The policy both tasks share, its retry numbers BATCH_RETRY's. No timeout_seconds: Prefect
# cannot interrupt a sync task in a worker thread (it only warns and waits); the client's own
# call deadline bounds each call. Side-effecting tasks never cache, and their results stay in
# memory.
RETRY_POLICY: dict[str, Any] = {
    "retries": BATCH_RETRY.retries,
    "retry_delay_seconds": BATCH_RETRY.waits(),
    "retry_jitter_factor": BATCH_RETRY.jitter,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


def with_retry_backoff(task: Task[P, R], settings: RetrySettings) -> Task[P, R]:
    """`task` with the backoff ONBOARD_RETRY_BACKOFF_SECONDS sets (retry_policy.batch_retry),
    when it is set; else `task` as declared. `settings` is the run's (read when it starts, not
    when this module is imported, so a bad value fails the run, naming the variable, rather
    than the import)."""
    policy = batch_retry(settings)
    if policy is BATCH_RETRY:
        return task
    return task.with_options(retry_delay_seconds=policy.waits())


def _run(
    verb: str, step: Step, tenant_slice: TenantSlice, campaign: Campaign, pool: Executor | None
) -> list[TenantOutcome]:
    try:
        return run_slice(campaign, tenant_slice, step, pool, _last_attempt())
    except SliceFailed as failed:
        logger = get_run_logger()
        for outcome in failed.outcomes:
            if not outcome.ok:
                again = " (will retry)" if outcome.tenant_id in failed.retryable else ""
                logger.warning(
                    "%s %s failed%s: %s: %s",
                    verb,
                    outcome.tenant_id,
                    again,
                    outcome.error_code,
                    outcome.error_message,
                )
        raise


def _last_attempt() -> bool:
    """Prefect retries while retries are left; on the last attempt a transient failure is final."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    retries = context.task.retries if context is not None else 0
    return (current_task_run.run_count or 1) > retries


def _name(verb: str) -> Any:
    """'onboard t001' for one tenant, 'onboard tenants 101-200' for a slice."""

    def name(parameters: dict[str, Any]) -> str:
        return f"{verb} {parameters['tenant_slice'].label}"

    return name


@task(name="onboard-tenants-slice", task_run_name=_name("onboard"), **RETRY_POLICY)
def onboard_slice_task(
    tenant_slice: TenantSlice, campaign: Campaign, pool: Executor | None = None
) -> list[TenantOutcome]:
    return _run("onboard", onboard_tenant, tenant_slice, campaign, pool)


@task(name="remind-tenants-slice", task_run_name=_name("remind"), **RETRY_POLICY)
def remind_slice_task(
    tenant_slice: TenantSlice, campaign: Campaign, pool: Executor | None = None
) -> list[TenantOutcome]:
    return _run("remind", remind_tenant, tenant_slice, campaign, pool)
