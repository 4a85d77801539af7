"""Flow `sync-connections`: know who is live in Versori. Each profile's tenants in the ledger
read back from Versori (onboarding.sync.versori_sync) and the ledger brought in line:
connected (a connection made elsewhere included), activated, broken, disconnected; tenants
connected for every profile of an environment activated. See docs/sync.md."""

from __future__ import annotations

from contextlib import ExitStack, closing
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from pydantic import Field

from flows.batching.resources import effective_concurrency, open_client, tag_run
from flows.inputs.options import TenantEvents
from flows.inputs.parameters import connector_label, connectors_of
from flows.inputs.sync_inputs import sync_profiles
from flows.reporting.sync_summary import publish_sync, send_events, summarise_sync, sync_state
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Ledger
from onboarding.settings import load_settings
from onboarding.sync.versori_sync import sync
from onboarding.versori.client import VersoriClient


def run_name() -> str:
    """'sync acme-crm (Acme CRM)': the connectors by name and display name."""
    return "sync " + connectors_of(flow_run.parameters["profile"], load_settings())


@flow(name="sync-connections", flow_run_name=run_name, log_prints=False)
def sync_connections(
    profile: str | list[str],
    dry_run: bool = False,
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8,
    tenant_events: TenantEvents = TenantEvents.AUTO,
) -> State[dict[str, Any]]:
    """Read back from Versori what each profile's tenants hold (end users, connections and
    their credentials' health, activations) and bring the ledger in line: connected, activated,
    broken, disconnected. Tenants connected for every profile of an environment are activated.
    Writes nothing to Versori but activations; each ledger write lands only if the record is
    still as sync read it (safe beside a running batch and the connect service).

    Args:
        profile: Path of the connector profile YAML, as the worker sees it; or a list of them
            (an environment of several systems is activated once each is connected).
        dry_run: Read Versori and report what would change; write nothing, to the ledger or
            to Versori.
        concurrency: Versori calls in flight at once: the reads of tenants whose activation
            does not hold their connection (one each), and the activations.
        tenant_events: Which tenant status changes become Prefect events: all, failures
            only, off, or auto (all on a Prefect server, failures on the temporary one).
    """
    logger = get_run_logger()
    settings = load_settings()  # read once, here, and passed down
    profiles = sync_profiles(profile, settings)
    tag_run(profiles)
    concurrency = effective_concurrency(profiles, concurrency)
    logger.info(
        "Syncing %s with Versori (concurrency %d%s)",
        connector_label(profiles),
        concurrency,
        ", dry run" if dry_run else "",
    )
    with ExitStack() as stack:
        ledger = stack.enter_context(closing(Ledger(settings.ledger.db_url)))
        clients: dict[str, VersoriClient] = {}

        def client_for(p: ConnectorProfile) -> VersoriClient:
            """One client per API (its base URL), shared by that API's profiles."""
            if p.api not in clients:
                clients[p.api] = stack.enter_context(
                    open_client(concurrency, settings.versori, p.api)
                )
            return clients[p.api]

        report = sync(ledger, profiles, client_for, dry_run=dry_run, concurrency=concurrency)
        if not dry_run:
            sent, lost = send_events(report, profiles, tenant_events)
            logger.info("%d tenant event(s) sent%s", sent, f", {lost} lost" if lost else "")
        funnels = ledger.funnel([p.target_id for p in profiles])
    summary = summarise_sync(report, profiles, funnels)
    for row in summary["profiles"]:
        logger.info(
            "%s: %d tenant(s), changes %s, %d activated; %d Versori call(s) in %.2f s",
            row["profile"],
            row["tenants"],
            row["changes"] or "none",
            row["activated"],
            row["versori_calls"],
            row["seconds"],
        )
    publish_sync(summary, report, profiles, funnels)
    return sync_state(summary)
