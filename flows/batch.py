"""Running one task per tenant over a stream of tenants, and reporting on it: what the
onboarding and reminder flows share."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterable, Iterator
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


class Tally:
    """A batch's counts, and a sample of its outcomes for the table: every failure up to `keep`,
    then others until `keep` rows in all. Memory stays flat however many tenants go by; the
    ledger (`onboard export`) has every tenant."""

    def __init__(self, keep: int = TABLE_ROWS_MAX) -> None:
        self.keep = keep
        self.by_status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._failed: list[dict[str, str]] = []
        self._others: list[dict[str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def add(self, outcome: TenantOutcome) -> None:
        self.by_status[outcome.status] += 1
        if outcome.error_code:
            self.errors[outcome.error_code] += 1
        self._keep(dict(outcome.__dict__))

    def merge(self, summary: dict[str, Any]) -> None:
        """Fold in another batch's summary (a chunk's), sample included."""
        self.by_status.update(summary["by_status"])
        self.errors.update(summary["errors"])
        for row in summary["outcomes"]:
            self._keep(row)

    def _keep(self, row: dict[str, str]) -> None:
        failed = row["status"] == "failed"
        if failed and len(self._failed) < self.keep:
            self._failed.append(row)
        elif not failed and len(self._failed) + len(self._others) < self.keep:
            self._others.append(row)

    def rows(self) -> list[dict[str, str]]:
        """Failures first, each part in tenant order; at most `keep`."""
        ordered = sorted(self._failed, key=lambda r: r["tenant_id"])
        ordered += sorted(self._others, key=lambda r: r["tenant_id"])
        return ordered[: self.keep]

    @classmethod
    def of(cls, outcomes: Iterable[TenantOutcome]) -> Tally:
        tally = cls()
        for outcome in outcomes:
            tally.add(outcome)
        return tally


def run_batch(
    job: OnboardingJob,
    task: Task[..., TenantOutcome],
    work: Iterable[Tenant | TenantOutcome],
    total: int,
    concurrency: int,
    progress: Progress | None = None,
) -> Tally:
    """Run `task(tenant=…, job=…)` for each Tenant of `work` (an outcome in `work` is a tenant
    decided without a task, e.g. skipped), submitting as workers free up so that at most
    2x concurrency futures exist at once. No tenant's failure stops the others, except a
    batch-fatal one, after which the rest are recorded `not_attempted`."""
    logger = get_run_logger()
    progress = progress or Progress(total, job.profile.name)
    outcomes = Tally()
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
            outcomes.add(outcome)
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
                outcomes.add(item)
                progress.advance(failed=not item.ok)
                continue
            if stop_reason:
                outcomes.add(not_attempted(job, item, stop_reason))
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


def skip_live(tenants: Iterable[Tenant], live: set[str]) -> Iterator[Tenant | TenantOutcome]:
    """The tenants to onboard, with those that need nothing already decided as skipped."""
    for tenant in tenants:
        yield TenantOutcome(tenant.tenant_id, "skipped") if tenant.tenant_id in live else tenant


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


def summarise(tally: Tally, seconds: float, **about: Any) -> dict[str, Any]:
    """A run's result: counts, and `outcomes`, the table's sample (every tenant up to 1,000)."""
    rows = tally.rows()
    return {
        **about,
        "total": tally.total,
        "failed": tally.by_status.get("failed", 0),
        "skipped": tally.by_status.get("skipped", 0),
        "by_status": dict(tally.by_status),
        "errors": dict(tally.errors),
        "seconds": round(seconds, 2),
        "outcomes": rows,
        "outcomes_left_out": tally.total - len(rows),
    }


def publish(key: str, title: str, source: str, summary: dict[str, Any]) -> None:
    """The table and summary artifacts, under keys stable per profile so the UI keeps history."""
    rows = [
        {
            "tenant": o["tenant_id"],
            "status": o["status"],
            "link host": o["link_host"],
            "state": o["masked_state"],
            "error": f"{o['error_code']}: {o['error_message']}" if o["error_code"] else "",
        }
        for o in summary["outcomes"]
    ]
    cut = summary["outcomes_left_out"]
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
