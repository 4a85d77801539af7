"""Running slices of tenants as task runs over a stream of tenants, and reporting on it: what
the onboarding and reminder flows share."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.local import INTERRUPTED
from flows.progress import Progress, quiet_routine_task_logs
from onboarding.errors import SliceFailed
from onboarding.roster import Tenant
from onboarding.slices import BatchJob, TenantSlice
from onboarding.tenant_steps import TenantOutcome, failed_outcome
from tasks.slice_tasks import with_retry_backoff

TABLE_ROWS_MAX = 1000


class OutcomeCounts:
    """A batch's counts, and a sample of its outcomes for the table: every failure up to `keep`,
    then others until `keep` rows in all. Memory stays flat however many tenants go by; the
    ledger (`onboard export`) has every tenant."""

    def __init__(self, keep: int = TABLE_ROWS_MAX) -> None:
        self.keep = keep
        self.by_status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        # A campaign's counts for each connector (by name), from its tenants' parts.
        self.by_connector: dict[str, Counter[str]] = {}
        self.rows_seen = 0  # table rows offered: one per tenant, or per (tenant, connector)
        self._failed: list[dict[str, str]] = []
        self._others: list[dict[str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def add(self, outcome: TenantOutcome) -> None:
        self.by_status[outcome.status] += 1
        for part in outcome.parts:
            self.by_connector.setdefault(part.connector, Counter())[part.status] += 1
        for row in outcome.rows():
            if row["error_code"]:
                self.errors[row["error_code"]] += 1
            self._keep(row)

    def merge(self, summary: dict[str, Any]) -> None:
        """Fold in another batch's summary (a chunk's), sample included."""
        self.by_status.update(summary["by_status"])
        self.errors.update(summary["errors"])
        for name, counts in summary.get("by_connector", {}).items():
            self.by_connector.setdefault(name, Counter()).update(counts)
        for row in summary["outcomes"]:
            self._keep(row)
        self.rows_seen += summary.get("outcomes_left_out", 0)

    def _keep(self, row: dict[str, str]) -> None:
        self.rows_seen += 1
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
    def of(cls, outcomes: Iterable[TenantOutcome]) -> OutcomeCounts:
        tally = cls()
        for outcome in outcomes:
            tally.add(outcome)
        return tally


# Up to this many tenants, one task run per tenant: the UI shows each by name. Above it, one
# task run per slice of SLICE_SIZE tenants: a task run costs the engine milliseconds of CPU and
# the server ~3 events, a tenant's call ~1-2 ms, so per-tenant task runs would make Prefect,
# not Versori, the bottleneck (bench/run.py measures both).
ONE_TASK_PER_TENANT_MAX = 100
SLICE_SIZE = 100


def tenants_per_task(total: int, asked: int | None = None) -> int:
    """`asked` when given; else one for a small batch, SLICE_SIZE for a large one."""
    if asked:
        return asked
    return 1 if total <= ONE_TASK_PER_TENANT_MAX else SLICE_SIZE


def tenant_threads(job: BatchJob, concurrency: int) -> int:
    """Threads for the tenants of a batch's slices. The Versori client lets `concurrency` calls
    be in flight whatever the thread count. When links are only stored, a tenant's thread spends
    about a third of its time waiting for its ledger commit (bench/run.py under py-spy --idle),
    holding no Versori slot: twice the threads keep the slots busy (ratio 0.87 -> 0.90). With
    email, each thread keeps an SMTP connection of its own, so the threads stay at
    `concurrency` and so do the SMTP connections."""
    return concurrency if job.deliver.sends_email else 2 * concurrency


def slice_up(
    work: Iterable[Tenant | TenantOutcome], size: int
) -> Iterator[TenantSlice | TenantOutcome]:
    """Group the tenants of `work` into slices of `size`, in roster order; an outcome (a tenant
    decided without a task) passes through."""
    tenants: list[Tenant] = []
    first = position = 0
    for position, item in enumerate(work, 1):
        if isinstance(item, TenantOutcome):
            yield item
            continue
        if not tenants:
            first = position
        tenants.append(item)
        if len(tenants) == size:
            yield TenantSlice(tenants, first, position)
            tenants = []
    if tenants:
        yield TenantSlice(tenants, first, position)


def run_batch(
    job: BatchJob,
    task: Task[..., list[TenantOutcome]],
    work: Iterable[Tenant | TenantOutcome],
    total: int,
    concurrency: int,
    per_task: int | None = None,
    progress: Progress | None = None,
) -> OutcomeCounts:
    """Run `task` over the tenants of `work` in slices of `per_task` (automatic when None), at
    most `concurrency` tenants in flight in all: slices share one thread pool of that size.
    Slices are submitted as task runners free up, so memory stays flat however long `work`
    is. No tenant's failure stops the others, except a batch-fatal one, after which the rest
    are recorded `not_attempted`."""
    logger = get_run_logger()
    task = with_retry_backoff(task)
    size = tenants_per_task(total, per_task)
    progress = progress or Progress(total, job.name)
    tally = OutcomeCounts()
    # Enough slices at once to keep every tenant thread busy while one slice winds down.
    slices_at_once = concurrency if size == 1 else max(2, math.ceil(2 * concurrency / size))
    threads = tenant_threads(job, concurrency)
    in_flight: dict[PrefectFuture[list[TenantOutcome]], TenantSlice] = {}
    announced = False

    def add(outcomes: list[TenantOutcome]) -> None:
        nonlocal announced
        for outcome in outcomes:
            tally.add(outcome)
        progress.advance(failed=sum(not o.ok for o in outcomes), count=len(outcomes))
        if job.stop_reason and not announced:
            announced = True
            logger.error("Stopping the batch: %s", job.stop_reason)

    def collect_one() -> None:
        """Wait for the first task run in flight to finish, and count its tenants."""
        future = next(as_completed(list(in_flight)))
        add(outcomes_of(in_flight.pop(future), future.result(raise_on_failure=False)))

    if size > 1:
        logger.info(
            "%d tenants per task run, %d task runs at once sharing %d tenant threads",
            size,
            slices_at_once,
            threads,
        )
    with ExitStack() as stack:
        stack.enter_context(quiet_routine_task_logs())
        pool = None
        if size > 1:
            pool = stack.enter_context(ThreadPoolExecutor(threads, "tenant"))
        runner: ThreadPoolTaskRunner[list[TenantOutcome]] = stack.enter_context(
            ThreadPoolTaskRunner(max_workers=slices_at_once)
        )
        for item in slice_up(work, size):
            if isinstance(item, TenantOutcome):
                add([item])
            elif INTERRUPTED.is_set():
                break  # the rest of the roster is left as it is, for the next run
            elif job.stop_reason:
                add([job.not_attempted(t) for t in item.tenants])
            else:
                while len(in_flight) >= 2 * slices_at_once:
                    collect_one()
                # quote(): Prefect would otherwise walk the job (client, ledger) per task run.
                future = runner.submit(
                    task, {"tenant_slice": quote(item), "job": quote(job), "pool": quote(pool)}
                )
                in_flight[future] = item
        while in_flight:
            collect_one()
    progress.finish()
    return tally


def outcomes_of(tenant_slice: TenantSlice, result: object) -> list[TenantOutcome]:
    """Every tenant's outcome from what a slice's task run ended with: its list of outcomes,
    a SliceFailed carrying them, or another error (a one-tenant slice's own, or a crash)."""
    if isinstance(result, list):
        return result
    if isinstance(result, SliceFailed):
        return result.outcomes
    error = result if isinstance(result, BaseException) else RuntimeError(repr(result))
    return [
        tenant_slice.done.get(t.tenant_id) or failed_outcome(t.tenant_id, error)
        for t in tenant_slice.tenants
    ]


def skip_live(tenants: Iterable[Tenant], live: set[str]) -> Iterator[Tenant | TenantOutcome]:
    """The tenants to onboard, with those that need nothing already decided as skipped."""
    for tenant in tenants:
        yield TenantOutcome(tenant.tenant_id, "skipped") if tenant.tenant_id in live else tenant


def summarise(tally: OutcomeCounts, seconds: float, **about: Any) -> dict[str, Any]:
    """A run's result: counts, and `outcomes`, the table's sample (every tenant up to 1,000)."""
    rows = tally.rows()
    return {
        **about,
        "total": tally.total,
        "failed": tally.by_status.get("failed", 0),
        "skipped": tally.by_status.get("skipped", 0),
        "by_status": dict(tally.by_status),
        "by_connector": {name: dict(counts) for name, counts in tally.by_connector.items()},
        "errors": dict(tally.errors),
        "seconds": round(seconds, 2),
        "outcomes": rows,
        "outcomes_left_out": max(0, tally.rows_seen - len(rows)),
    }


def publish(key: str, title: str, source: str, summary: dict[str, Any]) -> None:
    """The table and summary artifacts, under keys stable per profile so the UI keeps history."""
    campaign = bool(summary.get("by_connector"))
    rows = [
        {
            "tenant": o["tenant_id"],
            **({"connector": o.get("connector", "")} if campaign else {}),
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
    if campaign:
        statuses = sorted({s for counts in summary["by_connector"].values() for s in counts})
        lines += ["", f"| connector | {' | '.join(statuses)} |", "|---" * (len(statuses) + 1) + "|"]
        lines += [
            f"| {name} | {' | '.join(str(counts.get(s, 0)) for s in statuses)} |"
            for name, counts in summary["by_connector"].items()
        ]
    if summary.get("coverage"):
        c = summary["coverage"]
        lines += [
            "",
            f"Ledger, over these {len(summary['by_connector']) or 1} connector(s): "
            f"{c['fully']} tenant(s) fully connected, {c['partly']} partly, "
            f"{c['none']} not at all.",
        ]
    if summary["errors"]:
        lines += ["", "| error | tenants |", "| --- | --- |"]
        lines += [f"| {code} | {n} |" for code, n in Counter(summary["errors"]).most_common()]
    create_markdown_artifact(key=key.replace("-", "-summary-", 1), markdown="\n".join(lines))


def conclude(
    tally: OutcomeCounts,
    started: float,
    done: str,
    *,
    artifact: tuple[str, str, str],
    **about: Any,
) -> State[dict[str, Any]]:
    """A run's end: its summary (`about` and the counts since `started`, a time.monotonic()),
    published as artifacts under `artifact` (key, title, source; see `publish`), and its final
    state, which says `done` when no tenant failed."""
    summary = summarise(tally, time.monotonic() - started, **about)
    publish(*artifact, summary)
    return final_state(summary, done)


def final_state(summary: dict[str, Any], done: str) -> State[dict[str, Any]]:
    """Completed when no tenant failed; Failed, after every tenant was tried, when any did."""
    if summary["failed"]:
        return Failed(
            message=f"{summary['failed']} of {summary['total']} tenant(s) failed; "
            "the next run retries them",
            data=summary,
        )
    return Completed(message=f"{summary['total']} tenant(s) {done}", data=summary)
