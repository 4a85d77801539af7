"""Flow `onboard-tenants-chunk`: one chunk of a large batch, started by `onboard-tenants`.

Not meant to be started by hand. The parent checked the whole roster; a chunk reads only its
slice of the same file (refused if the file changed since), onboards it like a small batch, and
writes its summary to the ledger, where the parent, on this machine or another, reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Annotated, Any
from uuid import UUID

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from pydantic import Field

from flows.batching.resources import tag_run
from flows.batching.runs import onboard_tenants_of
from flows.inputs.options import TenantEvents
from flows.inputs.parameters import run_inputs, run_request
from flows.reporting.summary import final_state, summarise
from onboarding.batch.campaign import Campaign
from onboarding.batch.delivery import Delivery
from onboarding.batch.run_request import RosterPart
from onboarding.batch.run_summary import RunSummary
from onboarding.ledger import Ledger
from onboarding.settings import load_settings

PARENT_CHECK_SECONDS = 10.0


def chunk_run_name() -> str:
    params = flow_run.parameters
    return (
        f"chunk {int(params['chunk']) + 1}/{params['chunks']}: tenants "
        f"{int(params['first']) + 1}-{params['stop']}"
    )


@flow(name="onboard-tenants-chunk", flow_run_name=chunk_run_name, log_prints=False)
def onboard_chunk(
    profile: str,
    roster: str,
    digest: str,
    batch_id: str,
    chunk: Annotated[int, Field(ge=0)],
    chunks: Annotated[int, Field(ge=1)],
    first: Annotated[int, Field(ge=0)],
    stop: Annotated[int, Field(ge=1)],
    deliver: Delivery = Delivery.STORE,
    concurrency: Annotated[int, Field(ge=1, le=256)] = 16,
    only: list[str] | None = None,
    tenants_per_task: Annotated[int | None, Field(ge=1, le=1000)] = None,
    tenant_events: TenantEvents = TenantEvents.AUTO,
) -> State[dict[str, Any]]:
    """Onboard tenants first..stop-1 of a roster that the batch's parent run has checked.

    Args:
        profile: Path of the connector profile YAML, as the worker sees it.
        roster: Path or URL of the roster the parent checked, as the worker sees it.
        digest: SHA-256 of that roster; a roster that changed since is refused.
        batch_id: The parent flow run's id.
        chunk: This chunk's index in the batch, from 0.
        chunks: How many chunks the batch has.
        first: Position of the chunk's first tenant in the roster (among those `only` selects).
        stop: Position after the chunk's last tenant.
        deliver: As in onboard-tenants.
        concurrency: Tenants in flight at once in this chunk.
        only: As in onboard-tenants.
        tenants_per_task: As in onboard-tenants.
        tenant_events: As in onboard-tenants.
    """
    # Through a deployment, the paths must lie in ONBOARD_FILES_ROOT (run_request's root).
    settings = load_settings()  # this run's own, read once at its start
    part = RosterPart(digest, first, stop)
    request = run_request(profile, roster, only=only, deliver=deliver, part=part, settings=settings)
    with closing(Ledger(settings.ledger.db_url)) as ledger:
        done = ledger.chunk_summary(batch_id, chunk)
        if done is not None:  # a re-run of a chunk that finished: nothing is done twice
            return final_state(RunSummary.from_json(done), "onboarded or skipped (earlier)")
        inputs = run_inputs(request, settings)
        tag_run(inputs.profiles)
        started = time.monotonic()
        tally = onboard_tenants_of(
            inputs,
            settings,
            ledger,
            concurrency,
            tenants_per_task,
            tenant_events,
            watch=lambda campaign: stop_when_parent_ends(campaign, batch_id),
        )
        summary = summarise(tally, time.monotonic() - started, chunk=chunk, first=first, stop=stop)
        ledger.record_chunk(batch_id, chunk, str(flow_run.id), summary.to_json())
        return final_state(summary, "onboarded or skipped")


@contextmanager
def stop_when_parent_ends(campaign: Campaign, batch_id: str) -> Iterator[None]:
    """Every PARENT_CHECK_SECONDS, ask whether the batch's parent run has ended (crashed,
    cancelled, failed); if so, stop this chunk: its tenants not yet started are recorded
    not_attempted, and the batch that replaces the parent does them. An orphaned chunk thus
    stops instead of working alongside the new batch."""
    from prefect.client.orchestration import get_client

    done = threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(PARENT_CHECK_SECONDS):
                try:
                    parent = client.read_flow_run(UUID(batch_id))
                except Exception:  # the API hiccuped: ask again next time
                    continue
                if parent.state is not None and parent.state.is_final():
                    why = f"the batch's parent run ended {parent.state.name}; the next batch "
                    for connector in campaign.connectors:
                        connector.stop.halt(why + "does these tenants")
                    return

    watcher = threading.Thread(target=watch, name="parent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
