"""Flow `onboard-tenants-chunk`: one chunk of a large batch, started by `onboard-tenants`.

Not meant to be started by hand. The parent checked the whole roster; a chunk reads only its
slice of the same file (refused if the file changed since), onboards it like a small batch, and
writes its summary to the ledger, where the parent, on this machine or another, reads it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State
from pydantic import Field

from flows.batch import final_state, run_batch, skip_live, summarise
from flows.common import effective_concurrency, load_templates, open_job, tag_run
from onboarding.ledger import Ledger
from onboarding.onboard import Delivery
from onboarding.profile import load_profile
from onboarding.roster import open_roster_slice
from onboarding.settings import LedgerSettings
from tasks.initialise import onboard_tenant_task


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
    """
    connector = load_profile(profile)
    tag_run(connector)
    ledger = Ledger(LedgerSettings().db_url)
    try:
        done = ledger.chunk_summary(batch_id, chunk)
        if done is not None:  # a re-run of a chunk that finished: nothing is done twice
            return final_state(done, "onboarded or skipped (earlier)")
        templates = load_templates(connector) if deliver.sends_email else None
        tenants = list(open_roster_slice(roster, digest, first, stop, only))
        live = ledger.live_tenant_ids(connector.connector_id, among=[t.tenant_id for t in tenants])
        concurrency = effective_concurrency(connector, concurrency)
        started = time.monotonic()
        with ExitStack() as stack:
            job = open_job(stack, connector, ledger, deliver, templates, concurrency)
            tally = run_batch(
                job, onboard_tenant_task, skip_live(tenants, live), len(tenants), concurrency
            )
        summary = summarise(tally, time.monotonic() - started, chunk=chunk, first=first, stop=stop)
        ledger.record_chunk(batch_id, chunk, str(flow_run.id), summary)
        return final_state(summary, "onboarded or skipped")
    finally:
        ledger.close()
