"""Flow `remind-tenants`: chase the admins who were sent a link but have not connected."""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from pydantic import Field

from flows.batch import OutcomeCounts, conclude, run_batch
from flows.campaign import load_campaign, profile_paths, remind_campaign
from flows.inputs.options import TenantEvents
from flows.job import effective_concurrency, load_templates, open_job, tag_run
from flows.onboard_tenants import run_files_root
from onboarding.clock import utcnow
from onboarding.delivery import Delivery
from onboarding.ledger import Ledger, Status
from onboarding.profile import load_profile
from onboarding.settings import LedgerSettings
from onboarding.tenant_steps import TenantOutcome, tenant_of
from tasks.slice_tasks import remind_slice_task


def run_name() -> str:
    profile = flow_run.parameters["profile"]
    paths = [profile] if isinstance(profile, str) else list(profile or [])
    return "remind " + " + ".join(Path(str(p)).stem for p in paths)


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
        tenants_per_task: Tenants per task run. Empty: one per tenant up to 100 tenants, 100
            per task run above that.
        tenant_events: Which tenant status changes become Prefect events: all, failures
            only, off, or auto (all on a Prefect server, failures on the temporary one).
    """
    logger = get_run_logger()
    paths = profile_paths(profile)
    if len(paths) > 1:
        return remind_campaign(
            profiles=load_campaign(paths, run_files_root()),
            after_hours=after_hours,
            max_reminders=max_reminders,
            dry_run=dry_run,
            concurrency=concurrency,
            tenants_per_task=tenants_per_task,
            tenant_events=tenant_events,
        )
    connector = load_profile(paths[0], root=run_files_root())
    tag_run(connector)
    ledger = Ledger(LedgerSettings().db_url)
    now = utcnow()

    sent_before = now - timedelta(hours=after_hours)
    due = ledger.due_for_reminder(
        connector.target_id, sent_before=sent_before, max_reminders=max_reminders
    )
    logger.info(
        "%d tenant(s) of %s are due a reminder (sent over %g h ago, fewer than %d reminders)",
        len(due),
        connector.name,
        after_hours,
        max_reminders,
    )
    concurrency = effective_concurrency(connector, concurrency)
    started = time.monotonic()
    if dry_run:
        outcomes = OutcomeCounts.of(
            TenantOutcome(
                r.tenant_id,
                "would_reissue" if r.expires_at and r.expires_at <= now else "would_remind",
            )
            for r in due
        )
        expired = ledger.count_past_expiry(connector.target_id, now)
    else:
        with ExitStack() as stack:
            templates = load_templates(connector)
            # A tenant another run reminded meanwhile is no longer due: each is looked at
            # again once claimed (onboarding/slices.py), so no admin is reminded twice.
            job = open_job(
                stack,
                connector,
                ledger,
                Delivery.EMAIL,
                templates,
                concurrency,
                tenant_events,
                remind_before=sent_before,
                max_reminders=max_reminders,
            )
            outcomes = run_batch(
                job,
                remind_slice_task,
                (tenant_of(r) for r in due),
                len(due),
                concurrency,
                tenants_per_task,
            )
            expired_ids = ledger.expire_links(connector.target_id, utcnow())
            for tenant_id in expired_ids:
                job.report(tenant_id, Status.EXPIRED)
        expired = len(expired_ids)
    if expired:
        logger.info("%d link(s) past their time and not re-issued are now expired", expired)
    ledger.close()
    return conclude(
        outcomes,
        started,
        "reminded",
        artifact=(
            f"reminders-{connector.slug}",
            f"Reminders for {connector.name}",
            f"Ledger, {len(due)} due",
        ),
        profile=connector.name,
        connector_id=connector.target_id,
        dry_run=dry_run,
        expired=expired,
    )
