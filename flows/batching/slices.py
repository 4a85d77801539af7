"""A batch's tenants in slices, each slice a task run, at most `concurrency` tenants in flight:
what every run's batch goes through (onboard and remind, one connector or several)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from prefect import Task, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.inputs.parameters import connector_label
from flows.reporting.progress import Progress, quiet_routine_task_logs
from flows.reporting.summary import OutcomeCounts
from flows.running.in_process import INTERRUPTED, count_task_run
from onboarding.batch.campaign import Campaign
from onboarding.batch.outcomes import TenantOutcome, failed_outcome
from onboarding.batch.tenant_slices import SliceFailed, TenantSlice
from onboarding.inputs.roster import Tenant
from onboarding.settings import RetrySettings
from tasks.slice_tasks import with_retry_backoff

# Up to this many tenants, one task run per tenant: the UI shows each by name. Above it, one
# task run per slice, the batch cut into about SLICES_PER_BATCH of them, each SLICE_SIZE to
# MAX_SLICE_SIZE tenants: a task run costs the engine ~10 ms of CPU, the run's thread a result
# to collect and the server ~3 events to record, a tenant's call well under 1 ms, so per-tenant
# task runs would make Prefect, not Versori, the bottleneck (bench/run.py measures both). Slices
# of 100 at 2,000 tenants (20 task runs) kept the temporary server at 0.95 s of CPU during the
# batch, slices of 250 at 0.55 s.
ONE_TASK_PER_TENANT_MAX = 100
SLICE_SIZE = 100
MAX_SLICE_SIZE = 1000
SLICES_PER_BATCH = 8


def tenants_per_task(total: int, asked: int | None = None) -> int:
    """`asked` when given; else one for a small batch, a slice of about an eighth of a large
    one (SLICE_SIZE to MAX_SLICE_SIZE tenants)."""
    if asked:
        return asked
    if total <= ONE_TASK_PER_TENANT_MAX:
        return 1
    return min(MAX_SLICE_SIZE, max(SLICE_SIZE, math.ceil(total / SLICES_PER_BATCH)))


def tenant_threads(campaign: Campaign, concurrency: int) -> int:
    """Threads for the tenants of a batch's slices. The Versori client lets `concurrency` calls
    be in flight whatever the thread count. When a tenant's thread hands its link to the
    ledger's writer without waiting (Campaign.defers_writes: links only stored, one
    connector), `concurrency` threads keep the calls busy; more only wait for the client's
    call slots (bench/run.py: twice as many cost 0.25 ms of CPU a tenant more; 2 or 4 more
    made each call 7-13 ms slower, the slots handed over through the GIL). With email, each
    thread keeps an SMTP connection of its own, so the threads stay at `concurrency` and so do
    the SMTP connections. Otherwise (a campaign of several connectors that only stores) a
    thread waits for its commits, holding no Versori slot: twice the threads keep the slots
    busy."""
    if campaign.defers_writes or campaign.deliver.sends_email:
        return concurrency
    return 2 * concurrency


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


# Long: the submit and collect loop with its bookkeeping (in flight, tally, progress) in
# one place, where the flat-memory and stop-the-batch rules can be read together.
def run_batch(
    campaign: Campaign,
    task: Task[..., list[TenantOutcome]],
    work: Iterable[Tenant | TenantOutcome],
    total: int,
    concurrency: int,
    per_task: int | None = None,
    progress: Progress | None = None,
    *,
    retry: RetrySettings,
) -> OutcomeCounts:
    """Run `task` over the tenants of `work` in slices of `per_task` (automatic when None), at
    most `concurrency` tenants in flight in all: slices share one thread pool of that size.
    `retry`: the run's retry settings (the backoff between a slice's tries).
    Slices are submitted as task runners free up, so memory stays flat however long `work`
    is. No tenant's failure stops the others, except a batch-fatal one, after which the rest
    are recorded `not_attempted`."""
    logger = get_run_logger()
    task = with_retry_backoff(task, retry)
    size = tenants_per_task(total, per_task)
    progress = progress or Progress(total, campaign.name)
    tally = OutcomeCounts()
    # Enough slices at once to keep every tenant thread busy while one slice winds down.
    slices_at_once = concurrency if size == 1 else max(2, math.ceil(2 * concurrency / size))
    threads = tenant_threads(campaign, concurrency)
    in_flight: dict[PrefectFuture[list[TenantOutcome]], TenantSlice] = {}
    announced: set[str] = set()

    def add(outcomes: list[TenantOutcome]) -> None:
        for outcome in outcomes:
            tally.add(outcome)
        progress.advance(failed=sum(not o.ok for o in outcomes), count=len(outcomes))
        announce_stops(campaign, announced, logger)

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
        pool = stack.enter_context(ThreadPoolExecutor(threads, "tenant")) if size > 1 else None
        runner: ThreadPoolTaskRunner[list[TenantOutcome]] = stack.enter_context(
            ThreadPoolTaskRunner(max_workers=slices_at_once)
        )
        for item in slice_up(work, size):
            if isinstance(item, TenantOutcome):
                add([item])
            elif INTERRUPTED.is_set():
                break  # the rest of the roster is left as it is, for the next run
            elif campaign.stop_reason:
                add([campaign.not_attempted(t) for t in item.tenants])
            else:
                while len(in_flight) >= 2 * slices_at_once:
                    collect_one()
                # quote(): Prefect would otherwise walk the campaign (clients, ledger) per task run.
                parameters = {"tenant_slice": item, "campaign": campaign, "pool": pool}
                future = runner.submit(task, {k: quote(v) for k, v in parameters.items()})
                count_task_run(flow_run.id)
                in_flight[future] = item
        while in_flight:
            collect_one()
    announce_stops(campaign, announced, logger)
    progress.finish()
    tally.stopped.update(stops_of(campaign))
    return tally


# The extra a stop's log record carries: `onboard run` says the stop itself when the run ends
# (deployments/cli.py), and leaves this record out of its console.
STOP_RECORD = {"onboarding_stop": True}


def announce_stops(campaign: Campaign, announced: set[str], logger: Any) -> None:
    """Log each connector's stop once, when first seen: why, and what to fix."""
    for connector in campaign.connectors:
        stop = connector.stop
        if stop.reason and not stop.interrupted and connector.connector_id not in announced:
            announced.add(connector.connector_id)
            several = len(campaign.connectors) > 1
            name = f" for {connector_label([connector.profile])}" if several else ""
            detail = f" ({stop.detail})" if stop.detail else ""
            logger.error("Stopping the batch%s: %s%s", name, stop.reason, detail, extra=STOP_RECORD)


def stops_of(campaign: Campaign) -> dict[str, dict[str, str]]:
    """Each stopped connector's stop, by profile name (as by_connector counts them), for the
    summary (not an interrupt)."""
    return {
        c.profile.name: {
            "reason": c.stop.reason,
            "cause": c.stop.cause,
            "detail": c.stop.detail,
            "error_code": c.stop.error_code,
        }
        for c in campaign.connectors
        if c.stop.reason and not c.stop.interrupted
    }


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
