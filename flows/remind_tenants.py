"""Flow `remind-tenants`: chase the admins who were sent a link but have not connected."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from pydantic import Field

from flows.batching.runs import remind_tenants_batch
from flows.inputs.options import TenantEvents
from flows.inputs.parameters import connectors_of, run_inputs, run_request
from onboarding.batch.delivery import Delivery
from onboarding.settings import load_settings


def run_name() -> str:
    """'remind acme-crm (Acme CRM)': the connectors by name and display name (their files' names
    only when a profile does not load)."""
    # Prefect asks for the name before the flow starts: its own read of the settings.
    return "remind " + connectors_of(flow_run.parameters["profile"], load_settings())


@flow(name="remind-tenants", flow_run_name=run_name, log_prints=False)
def remind_tenants(
    profile: str | list[str],
    after_hours: Annotated[float, Field(ge=0)] = 48.0,
    max_reminders: Annotated[int, Field(ge=0)] = 3,
    dry_run: bool = False,
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4,
    tenants_per_task: Annotated[int | None, Field(ge=1, le=1000)] = None,
    tenant_events: TenantEvents = TenantEvents.AUTO,
) -> State[dict[str, Any]]:
    """Re-send the link to every tenant delivered by email more than `after_hours` ago that has
    not connected, at most `max_reminders` times. A link past its `link_ttl_hours` is re-issued
    first (a fresh state; the old one stays traceable). Links past their time that are not
    re-issued are marked `expired`.

    Args:
        profile: Path of the connector profile YAML, as the worker sees it; or a list of them
            (a campaign): one reminder per tenant, covering every connector it was emailed
            and has not connected.
        after_hours: Remind a tenant whose last email is older than this.
        max_reminders: Stop reminding a tenant after this many reminders.
        dry_run: Report who is due; send nothing, re-issue nothing.
        concurrency: Tenants in flight at once.
        tenants_per_task: Tenants per task run. Empty: one per tenant up to 100 tenants; above
            that, about an eighth of the batch per task run, 100 to 1,000 tenants.
        tenant_events: Which tenant status changes become Prefect events: all, failures
            only, off, or auto (all on a Prefect server, failures on the temporary one).
    """
    deliver = Delivery.STORE if dry_run else Delivery.EMAIL  # a dry run sends nothing
    settings = load_settings()  # read once, here, and passed down
    request = run_request(
        profile, deliver=deliver, dry_run=dry_run, reminders=True, settings=settings
    )
    inputs = run_inputs(request, settings)
    return remind_tenants_batch(
        inputs,
        settings,
        after_hours=after_hours,
        max_reminders=max_reminders,
        concurrency=concurrency,
        tenants_per_task=tenants_per_task,
        tenant_events=tenant_events,
    )
