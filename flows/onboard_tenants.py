"""Flow `onboard-tenants`: one link per tenant of a roster, recorded and delivered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows.batch import final_state, publish, run_batch, summarise
from flows.common import load_templates, open_client, open_mailer
from onboarding.ledger import Ledger
from onboarding.onboard import Delivery, OnboardingJob, TenantOutcome
from onboarding.profile import load_profile
from onboarding.roster import Roster, Tenant, display_source, load_roster
from onboarding.settings import LedgerSettings
from tasks.initialise import onboard_tenant_task


def run_name() -> str:
    """'<profile name> from <roster file>', e.g. 'zendesk-demo from tenants.csv'."""
    params = flow_run.parameters
    try:
        name = load_profile(str(params["profile"])).name
    except Exception:  # the flow itself reports a bad profile; the name must not fail first
        name = Path(str(params["profile"])).stem
    return f"{name} from {Path(display_source(str(params['roster']))).name}"


@flow(name="onboard-tenants", flow_run_name=run_name, log_prints=False)
def onboard_tenants(
    roster: str,
    profile: str,
    deliver: Delivery = Delivery.STORE,
    dry_run: bool = False,
    concurrency: int = 16,
    only: list[str] | None = None,
) -> State[dict[str, Any]]:
    """Initialise a Versori OAuth2 link for every tenant of `roster` that lacks a live one, and
    deliver it: `store` keeps it in the ledger, `email` sends it to the admin, `both` does both."""
    logger = get_run_logger()
    connector = load_profile(profile)
    templates = load_templates(connector) if deliver.sends_email else None
    tenants = load_roster(
        roster, connector, only, also_needs=templates.tenant_fields_used if templates else ()
    )
    source = display_source(roster)
    ledger = Ledger(LedgerSettings().db_url)
    live = ledger.live_tenant_ids(connector.connector_id)
    logger.info(
        "Onboarding %d tenant(s) of %s to %s (concurrency %d, deliver %s%s)",
        len(tenants),
        source,
        connector.name,
        concurrency,
        deliver.value,
        ", dry run" if dry_run else "",
    )
    started = time.monotonic()
    if dry_run:
        outcomes = [
            TenantOutcome(t.tenant_id, "skipped" if t.tenant_id in live else "would_initialise")
            for t in tenants
        ]
    else:
        with ExitStack() as stack:
            client = stack.enter_context(open_client(concurrency))
            mailer = open_mailer(stack) if deliver.sends_email else None
            job = OnboardingJob(
                profile=connector,
                client=client,
                ledger=ledger,
                deliver=deliver,
                mailer=mailer,
                templates=templates,
                run_id=flow_run.id,
            )
            outcomes = run_batch(
                job, onboard_tenant_task, _work(tenants, live), len(tenants), concurrency
            )
    summary = summarise(
        outcomes,
        time.monotonic() - started,
        profile=connector.name,
        connector_id=connector.connector_id,
        roster=source,
        dry_run=dry_run,
        deliver=deliver.value,
    )
    publish(
        f"onboarding-{connector.slug}",
        f"Onboarding {connector.name}",
        f"Roster `{source}`",
        summary,
        outcomes,
    )
    ledger.close()
    return final_state(summary, "onboarded or skipped")


def _work(tenants: Roster, live: set[str]) -> Iterator[Tenant | TenantOutcome]:
    for tenant in tenants:
        yield TenantOutcome(tenant.tenant_id, "skipped") if tenant.tenant_id in live else tenant
