"""Flow `onboard-tenants`: one link per tenant of a roster, recorded and delivered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from pydantic import Field

from flows.batching.fan_out import ChunkPlan
from flows.batching.runs import onboard_tenants_batch
from flows.inputs.options import FanOut, TenantEvents
from flows.inputs.parameters import connectors_of, run_inputs, run_request
from onboarding import constants
from onboarding.batch.delivery import Delivery
from onboarding.inputs.roster import TenantRow, display_source
from onboarding.settings import load_settings

MAX_INLINE_TENANTS = 100


def run_name() -> str:
    """'acme-crm (Acme CRM) from <roster file>', or '… for t1, t2' when tenants came inline:
    the connectors by name and display name (see connectors_of)."""
    params = flow_run.parameters
    # Prefect asks for the name before the flow starts: its own read of the settings.
    name = connectors_of(params.get("profile"), load_settings())
    if params.get("roster"):
        return f"{name} from {Path(display_source(str(params['roster']))).name}"
    ids = [str(dict(t).get("tenant_id", "?")) for t in params.get("tenants") or []]
    shown = ", ".join(ids[:3]) + (f" +{len(ids) - 3}" if len(ids) > 3 else "")
    return f"{name} for {shown or 'no tenants'}"


# Long for its docstring: the Prefect UI's run form shows each parameter's Args entry.
@flow(name="onboard-tenants", flow_run_name=run_name, log_prints=False)
def onboard_tenants(
    profile: str | list[str],
    roster: str | None = None,
    tenants: Annotated[list[TenantRow] | None, Field(max_length=MAX_INLINE_TENANTS)] = None,
    deliver: Delivery = Delivery.STORE,
    dry_run: bool = False,
    concurrency: Annotated[int, Field(ge=1, le=256)] = 16,
    only: list[str] | None = None,
    tenants_per_task: Annotated[int | None, Field(ge=1, le=1000)] = None,
    tenant_events: TenantEvents = TenantEvents.AUTO,
    fan_out: FanOut = FanOut.IN_PROCESS,
    chunk_size: Annotated[int, Field(ge=1)] = constants.CHUNK_SIZE,
    chunk_deployment: str = constants.CHUNK_DEPLOYMENT,
    chunk_deadline_minutes: Annotated[float, Field(gt=0)] = constants.CHUNK_DEADLINE_MINUTES,
) -> State[dict[str, Any]]:
    """Initialise a Versori OAuth2 link for every tenant that lacks a live one, and deliver it.

    Args:
        profile: Path of the connector profile YAML, as the worker sees it; or a list of
            them, a campaign: every tenant onboarded to each connector, with one email per
            tenant carrying every link it still needs.
        roster: Path or http(s) URL of a roster (.csv, .json, .jsonl, .yaml), or
            `secret:<block name>` for a URL kept in a Prefect Secret block (a signed URL must
            be passed that way on a server). Give this or `tenants`.
        tenants: Up to 100 tenants inline, for a backend calling the API. Give this or `roster`.
        deliver: store keeps the link in the ledger; email sends it to the admin; both does both.
        dry_run: Check the inputs and report what would happen; call nothing, send nothing.
        concurrency: Tenants in flight at once (in each chunk).
        only: Onboard only these tenant ids of the roster.
        tenants_per_task: Tenants per task run. Empty: one per tenant up to 100 tenants (each
            task run named after its tenant); above that, about an eighth of the batch per
            task run, 100 to 1,000 tenants.
        tenant_events: Which tenant status changes become Prefect events
            (`onboarding.tenant.<status>`): all, failures only, or off; auto: all on a Prefect
            server, failures only on Prefect's temporary server.
        fan_out: in_process: the whole batch in this flow run. deployment: split into chunks
            of `chunk_size`, each a run of `chunk_deployment` on its work pool, spread over its
            workers (each must see the profile and roster at the same path or URL, and share
            the ledger database).
        chunk_size: With fan_out deployment, tenants per chunk run.
        chunk_deployment: The deployment that runs chunks when fan_out is deployment.
        chunk_deadline_minutes: With fan_out deployment, how long to wait for the chunk runs;
            those still unfinished then are cancelled and their tenants counted as failed.
    """
    settings = load_settings()  # read once, here, and passed down
    request = run_request(
        profile,
        roster,
        tenants,
        only,
        deliver,
        dry_run,
        chunked=fan_out is FanOut.DEPLOYMENT,
        settings=settings,
    )
    inputs = run_inputs(request, settings)
    chunks = None
    if fan_out is FanOut.DEPLOYMENT and roster is not None:
        chunks = ChunkPlan(
            size=chunk_size,
            deployment=chunk_deployment,
            deadline_minutes=chunk_deadline_minutes,
            roster=roster,
            profile=request.profiles[0],
            concurrency=concurrency,
            tenants_per_task=tenants_per_task,
            tenant_events=tenant_events,
        )
    return onboard_tenants_batch(
        inputs,
        settings,
        concurrency=concurrency,
        tenants_per_task=tenants_per_task,
        tenant_events=tenant_events,
        chunks=chunks,
    )
