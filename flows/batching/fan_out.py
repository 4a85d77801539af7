"""A large batch fanned out to a work pool: one run of the chunk deployment per `chunk_size`
tenants, spread over the pool's workers, aggregated into one progress artifact and one table.

Chunks pay where workers have cores or machines of their own; on one machine a batch runs in
its own flow run, in slices (flows/batching/slices.py), with flat memory. A retried parent
adopts the chunk runs of its earlier attempt that are still going, and starts again those that ended
without a summary; past the deadline, chunk runs still going are cancelled and count as lost.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run

from flows.inputs.options import TenantEvents
from flows.reporting.progress import Progress
from flows.reporting.summary import OutcomeCounts
from onboarding.batch.outcomes import OutcomeStatus, TenantOutcome
from onboarding.batch.run_request import RunInputs
from onboarding.batch.run_summary import RunSummary
from onboarding.clock import utcnow
from onboarding.ledger import Ledger, Status

POLL_SECONDS = 2.0
WAITING_LOG_SECONDS = 60.0
READ_PAGE = 200  # the most flow runs the API returns in one read
STALE_CHUNK_DAYS = 7  # chunk summaries left by a parent that was killed go after this long


@dataclass(frozen=True)
class Chunk:
    index: int
    first: int
    stop: int

    @property
    def label(self) -> str:
        return f"chunk {self.index + 1} (tenants {self.first + 1}-{self.stop})"


def split(count: int, chunk_size: int) -> list[Chunk]:
    return [
        Chunk(i, first, min(first + chunk_size, count))
        for i, first in enumerate(range(0, count, chunk_size))
    ]


@dataclass(frozen=True)
class ChunkPlan:
    """How a batch fans out: `size` tenants per run of `deployment`, each given the roster and
    profile parameters the parent was given (`roster`, `profile`: a `secret:` roster stays a
    reference), waited for `deadline_minutes` at most."""

    size: int
    deployment: str
    deadline_minutes: float
    roster: str
    profile: str
    concurrency: int
    tenants_per_task: int | None
    tenant_events: TenantEvents


# Long: the chunk parameters, adopted earlier runs and the wait, read in order.
def run_chunks(inputs: RunInputs, ledger: Ledger, plan: ChunkPlan) -> OutcomeCounts:
    """Run every chunk of the inputs' roster on the work pool and add their summaries to one
    OutcomeCounts. A chunk already finished for this batch (the parent was retried) is not run
    again; one whose earlier run is still going is waited for, not started twice."""
    assert inputs.roster is not None
    batch, profile, request = inputs.roster, inputs.profiles[0], inputs.request
    logger = get_run_logger()
    batch_id = str(flow_run.id)
    chunks = split(len(batch), plan.size)
    progress = Progress(len(batch), profile.name)
    tally = OutcomeCounts()

    def add_chunk_summary(chunk: Chunk, summary: RunSummary) -> None:
        tally.merge(summary)
        progress.advance(failed=summary.failed, count=chunk.stop - chunk.first)

    def parameters(chunk: Chunk) -> dict[str, Any]:
        return {
            "profile": plan.profile,
            "roster": plan.roster,
            "digest": batch.digest,
            "batch_id": batch_id,
            "chunk": chunk.index,
            "chunks": len(chunks),
            "first": chunk.first,
            "stop": chunk.stop,
            "deliver": request.deliver,
            "concurrency": plan.concurrency,
            "only": list(request.only) if request.only else None,
            "tenants_per_task": plan.tenants_per_task,
            "tenant_events": plan.tenant_events,
        }

    logger.info(
        "%d tenants in %d chunks of up to %d, as runs of deployment %r on its work pool",
        len(batch),
        len(chunks),
        plan.size,
        plan.deployment,
    )
    todo = []
    for chunk in chunks:
        done = ledger.chunk_summary(batch_id, chunk.index)
        if done is not None:
            add_chunk_summary(chunk, RunSummary.from_json(done))
        else:
            todo.append(chunk)
    if len(todo) < len(chunks):
        logger.info(
            "%d chunk(s) finished before this attempt; not run again", len(chunks) - len(todo)
        )

    started = _start_chunk_runs(todo, parameters, plan.deployment, batch_id)
    deadline = time.monotonic() + plan.deadline_minutes * 60
    for chunk, run_state in _wait_for_runs(started, logger, deadline):
        done = ledger.chunk_summary(batch_id, chunk.index)
        add_chunk_summary(
            chunk,
            RunSummary.from_json(done) if done else _lost_chunk_summary(chunk, run_state),
        )
    progress.finish()
    ledger.forget_batch(batch_id)
    ledger.forget_chunks_before(utcnow() - timedelta(days=STALE_CHUNK_DAYS))
    return tally


def _start_chunk_runs(
    chunks: list[Chunk],
    parameters: Any,
    deployment: str,
    batch_id: str,
) -> dict[UUID, Chunk]:
    """Start a run for each chunk, or adopt the run an earlier attempt of this parent started
    that has not ended. The idempotency key names this attempt, so a retried parent gets a new
    run for a chunk whose earlier run crashed, instead of the crashed one back."""
    from prefect.deployments import run_deployment

    tag = f"onboarding-batch:{batch_id}"
    going = _unfinished_chunk_runs(tag)
    attempt = flow_run.run_count or 1
    started: dict[UUID, Chunk] = {}
    for chunk in chunks:
        if chunk.index in going:
            started[going[chunk.index]] = chunk
            continue
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: never a coroutine here
            name=deployment,
            parameters=parameters(chunk),
            timeout=0,  # start it and move on; the loop below waits for all of them
            idempotency_key=f"{batch_id}-chunk-{chunk.index}-attempt-{attempt}",
            tags=[tag],
            as_subflow=True,
        )
        started[run.id] = chunk
    return started


def _unfinished_chunk_runs(tag: str) -> dict[int, UUID]:
    """Chunk runs of this batch (by tag) that have not ended, by chunk index."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    going: dict[int, UUID] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    for run in runs:
        if run.state is None or not run.state.is_final():
            going[int(run.parameters["chunk"])] = run.id
    return going


def _wait_for_runs(started: dict[UUID, Chunk], logger: Any, deadline: float) -> Any:
    """Yield (chunk, final state) as each chunk run ends; say every minute what the rest
    are doing, so a batch waiting for a worker says so. Past `deadline`, cancel the runs
    still going and yield them with their last state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelling

    pending = dict(started)
    last_waiting_log = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            if time.monotonic() > deadline:
                logger.error(
                    "%d chunk run(s) still going past the deadline: cancelling them; their "
                    "tenants count as failed and the next run retries them",
                    len(pending),
                )
                why = "past the batch's deadline"
                for run_id in list(pending):  # a state object each: a state belongs to one run
                    client.set_flow_run_state(run_id, Cancelling(message=why), force=True)
                    yield pending.pop(run_id), Cancelling(message=why)
                return
            time.sleep(POLL_SECONDS)
            ids = list(pending)
            states: Counter[str] = Counter()
            for page in range(0, len(ids), READ_PAGE):
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids[page : page + READ_PAGE])
                    ),
                    limit=READ_PAGE,
                )
                for run in runs:
                    if run.state is not None and run.state.is_final():
                        yield pending.pop(run.id), run.state
                    else:
                        states[(run.state.name if run.state else None) or "unknown"] += 1
            if pending and time.monotonic() - last_waiting_log >= WAITING_LOG_SECONDS:
                logger.info(
                    "%d chunk run(s) not finished: %s",
                    len(pending),
                    ", ".join(f"{n} {name}" for name, n in states.most_common()),
                )
                last_waiting_log = time.monotonic()


def _lost_chunk_summary(chunk: Chunk, state: Any) -> RunSummary:
    """A chunk run that ended without writing its summary (it crashed, was cancelled, or failed
    before its first tenant): its tenants count as failed, and the next run picks up every one
    of them that the ledger does not show as done."""
    name = getattr(state, "name", None) or "without a state"
    why = getattr(state, "message", None) or ""
    message = f"the run of {chunk.label} ended {name} before reporting" + (
        f" ({why})" if why else ""
    )
    count = chunk.stop - chunk.first
    lost = TenantOutcome(
        chunk.label,
        OutcomeStatus.FAILED,
        error_code="chunk_lost",
        error_message=message + "; see `onboard status`; the next run retries",
    )
    return RunSummary(
        total=count,
        failed=count,
        by_status={Status.FAILED.value: count},
        errors={"chunk_lost": count},
        outcomes=lost.rows(),
    )
