"""Running one task per tenant over a stream of tenants, and reporting on it: what the
onboarding and reminder flows share."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterable
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.common import Progress, quiet_routine_task_logs
from onboarding.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from onboarding.onboard import OnboardingJob, TenantOutcome, failed_outcome
from onboarding.roster import Tenant

# Errors that would fail every remaining tenant the same way: stop the batch, say it once.
BATCH_FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError)
TABLE_ROWS_MAX = 1000


def run_batch(
    job: OnboardingJob,
    task: Task[..., TenantOutcome],
    work: Iterable[Tenant | TenantOutcome],
    total: int,
    concurrency: int,
) -> list[TenantOutcome]:
    """Run `task(tenant=…, job=…)` for each Tenant of `work` (an outcome in `work` is a tenant
    decided without a task, e.g. skipped), submitting as workers free up so that at most
    2x concurrency futures exist at once. No tenant's failure stops the others, except a
    batch-fatal one, after which the rest are recorded `not_attempted`."""
    logger = get_run_logger()
    progress = Progress(total, job.profile.name)
    outcomes: list[TenantOutcome] = []
    in_flight: dict[PrefectFuture[TenantOutcome], str] = {}
    stop_reason = ""

    def collect(done: set[PrefectFuture[TenantOutcome]]) -> None:
        nonlocal stop_reason
        for future in done:
            tenant_id = in_flight.pop(future)
            result = job.latest.pop(tenant_id, None)
            if result is None:  # the task failed before reaching the core: ask Prefect
                result = future.result(raise_on_failure=False)
            if isinstance(result, TenantOutcome):
                outcome = result
            else:
                outcome = failed_outcome(tenant_id, result)
                if isinstance(result, BATCH_FATAL) and not stop_reason:
                    stop_reason = str(result)
                    logger.error("Stopping the batch: %s", stop_reason)
            outcomes.append(outcome)
            progress.advance(failed=not outcome.ok)

    def wait_for_one() -> None:
        by_wrapped = {f.wrapped_future: f for f in in_flight}  # type: ignore[attr-defined]
        done, _ = concurrent.futures.wait(
            by_wrapped, return_when=concurrent.futures.FIRST_COMPLETED
        )
        collect({by_wrapped[w] for w in done})

    with quiet_routine_task_logs(), ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        for item in work:
            if isinstance(item, TenantOutcome):
                outcomes.append(item)
                progress.advance(failed=not item.ok)
                continue
            if stop_reason:
                outcomes.append(not_attempted(job, item, stop_reason))
                progress.advance(failed=True)
                continue
            while len(in_flight) >= 2 * concurrency:
                wait_for_one()
            # quote(): Prefect would otherwise walk the job (client, ledger, results) per task.
            future = runner.submit(task, {"tenant": item, "job": quote(job)})
            in_flight[future] = item.tenant_id
        while in_flight:
            wait_for_one()
    progress.finish()
    return outcomes


def not_attempted(job: OnboardingJob, tenant: Tenant, reason: str) -> TenantOutcome:
    message = f"not attempted: the batch stopped early because {reason}"
    job.ledger.record_failure(
        tenant_id=tenant.tenant_id,
        connector_id=job.profile.connector_id,
        profile=job.profile.name,
        tenant_name=tenant.name,
        admin_email=tenant.admin_email,
        error_code="not_attempted",
        error_message=message,
        run_id=job.run_id,
        count_attempt=False,
    )
    return TenantOutcome(
        tenant.tenant_id, "failed", error_code="not_attempted", error_message=message
    )


def summarise(outcomes: list[TenantOutcome], seconds: float, **about: Any) -> dict[str, Any]:
    by_status = Counter(o.status for o in outcomes)
    errors = Counter(o.error_code for o in outcomes if o.error_code)
    return {
        **about,
        "total": len(outcomes),
        "failed": by_status.get("failed", 0),
        "skipped": by_status.get("skipped", 0),
        "by_status": dict(by_status),
        "errors": dict(errors),
        "seconds": round(seconds, 2),
        "outcomes": [o.__dict__ for o in outcomes],
    }


def publish(
    key: str, title: str, source: str, summary: dict[str, Any], outcomes: list[TenantOutcome]
) -> None:
    """The table and summary artifacts, under keys stable per profile so the UI keeps history."""
    failed_first = sorted(outcomes, key=lambda o: (o.status != "failed", o.tenant_id))
    rows = [
        {
            "tenant": o.tenant_id,
            "status": o.status,
            "link host": o.link_host,
            "state": o.masked_state,
            "error": f"{o.error_code}: {o.error_message}" if o.error_code else "",
        }
        for o in failed_first[:TABLE_ROWS_MAX]
    ]
    cut = len(outcomes) - len(rows)
    create_table_artifact(
        key=key,
        table=rows,
        description=f"Tenants of {source}"
        + (f" (first {len(rows)}, failures first; `onboard export` has all)" if cut else ""),
    )
    lines = [
        f"# {title}{' (dry run)' if summary.get('dry_run') else ''}",
        "",
        f"{source}: {summary['total']} tenant(s) in {summary['seconds']} s.",
        "",
        "| status | tenants |",
        "| --- | --- |",
        *(f"| {status} | {n} |" for status, n in sorted(summary["by_status"].items())),
    ]
    if summary["errors"]:
        lines += ["", "| error | tenants |", "| --- | --- |"]
        lines += [f"| {code} | {n} |" for code, n in Counter(summary["errors"]).most_common()]
    create_markdown_artifact(key=key.replace("-", "-summary-", 1), markdown="\n".join(lines))


def final_state(summary: dict[str, Any], done: str) -> State[dict[str, Any]]:
    """Completed when no tenant failed; Failed, after every tenant was tried, when any did."""
    if summary["failed"]:
        return Failed(
            message=f"{summary['failed']} of {summary['total']} tenant(s) failed; "
            "the next run retries them",
            data=summary,
        )
    return Completed(message=f"{summary['total']} tenant(s) {done}", data=summary)
