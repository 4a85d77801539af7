"""Campaigns: `onboard-tenants` and `remind-tenants` given several profiles. Every tenant is
onboarded to every connector in one flow run, with one email per tenant (onboarding/campaign.py
has one tenant's path); reminders cover every connector a tenant has not connected."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.client.schemas.objects import State

from flows.batch import OutcomeCounts, conclude, run_batch
from flows.inputs.options import TenantEvents
from flows.job import effective_concurrency, load_templates, open_campaign, tag_run
from onboarding.campaign import combined
from onboarding.clock import utcnow
from onboarding.delivery import Delivery
from onboarding.errors import InputError
from onboarding.ledger import Ledger, Record, Status
from onboarding.profile import ConnectorProfile, load_profile
from onboarding.roster import Roster, Tenant
from onboarding.settings import LedgerSettings
from onboarding.tenant_steps import TenantOutcome, tenant_of
from tasks.slice_tasks import onboard_campaign_slice_task, remind_campaign_slice_task

if TYPE_CHECKING:
    from onboarding.mail import MailTemplates


def profile_paths(profile: str | Sequence[str]) -> list[str]:
    """The profile paths a run was given: one (a str), or several for a campaign."""
    paths = [profile] if isinstance(profile, str) else list(profile)
    if not paths:
        raise InputError("profile: give at least one connector profile")
    return paths


def load_campaign(paths: list[str], root: Path | None) -> list[ConnectorProfile]:
    """Each profile of a campaign, refusing two that name one connector (or system)."""
    profiles = [load_profile(path, root=root) for path in paths]
    seen: dict[str, str] = {}
    for path, profile in zip(paths, profiles, strict=True):
        first = seen.get(profile.target_id)
        seen[profile.target_id] = path
        if first is not None:
            raise InputError(
                f"profile {path}: names connector {profile.target_id}, as {first} does; "
                "a campaign needs each connector once"
            )
    return profiles


def campaign_label(profiles: Sequence[ConnectorProfile]) -> str:
    return " + ".join(p.name for p in profiles)


def onboard_campaign(
    *,
    profiles: list[ConnectorProfile],
    batch: Roster,
    templates: MailTemplates | None,
    source: str,
    deliver: Delivery,
    dry_run: bool,
    concurrency: int,
    tenants_per_task: int | None,
    tenant_events: TenantEvents,
) -> State[dict[str, Any]]:
    """Onboard every tenant of `batch` to every profile; one email per tenant."""
    logger = get_run_logger()
    if templates is not None:
        templates.check_campaign()
    ledger, capped = _begin(profiles, concurrency)
    label = campaign_label(profiles)
    logger.info(
        "Onboarding %d tenant(s) of %s to %d connectors, %s (concurrency %d, deliver %s%s)",
        len(batch),
        source,
        len(profiles),
        label,
        concurrency,
        deliver.value,
        ", dry run" if dry_run else "",
    )
    concurrency = capped
    started = time.monotonic()
    ids = [p.target_id for p in profiles]
    with ExitStack() as stack:
        needing_nothing = {cid: ledger.ids_needing_nothing(cid) for cid in ids}
        if dry_run:
            tally = OutcomeCounts.of(_dry_run(batch, profiles, needing_nothing))
        else:
            campaign = open_campaign(
                stack,
                profiles,
                ledger,
                deliver,
                templates,
                concurrency,
                tenant_events,
                needing_nothing=needing_nothing,
            )
            done = set.intersection(*needing_nothing.values())
            tally = run_batch(
                campaign,
                onboard_campaign_slice_task,
                _skip_done(batch, done, profiles),
                len(batch),
                concurrency,
                tenants_per_task,
            )
    coverage = ledger.connection_coverage(ids)
    ledger.close()
    return conclude(
        tally,
        started,
        "onboarded or skipped",
        artifact=(
            _artifact_key("onboarding", profiles),
            f"Onboarding {label}",
            f"Roster `{source}`",
        ),
        profile=label,
        connector_id=",".join(ids),
        roster=source,
        dry_run=dry_run,
        deliver=deliver.value,
        coverage=coverage,
    )


def remind_campaign(
    *,
    profiles: list[ConnectorProfile],
    after_hours: float,
    max_reminders: int,
    dry_run: bool,
    concurrency: int,
    tenants_per_task: int | None,
    tenant_events: TenantEvents,
) -> State[dict[str, Any]]:
    """One reminder per tenant due one (for any connector of the campaign), covering every
    connector it was emailed and has not connected."""
    logger = get_run_logger()
    ledger, concurrency = _begin(profiles, concurrency)
    label = campaign_label(profiles)
    ids = [p.target_id for p in profiles]

    sent_before = utcnow() - timedelta(hours=after_hours)
    first: dict[str, Record] = {}
    for cid in ids:
        for record in ledger.due_for_reminder(
            cid, sent_before=sent_before, max_reminders=max_reminders
        ):
            first.setdefault(record.tenant_id, record)
    due = list(first.values())
    logger.info(
        "%d tenant(s) are due a reminder for %s (sent over %g h ago, fewer than %d reminders)",
        len(due),
        label,
        after_hours,
        max_reminders,
    )
    started = time.monotonic()
    expired = 0
    if dry_run:
        tally = OutcomeCounts.of(TenantOutcome(r.tenant_id, "would_remind") for r in due)
        expired = ledger.count_past_expiry(ids, utcnow())
    else:
        with ExitStack() as stack:
            templates = load_templates(profiles[0])
            templates.check_campaign()
            campaign = open_campaign(
                stack,
                profiles,
                ledger,
                Delivery.EMAIL,
                templates,
                concurrency,
                tenant_events,
                remind_before=sent_before,
                max_reminders=max_reminders,
            )
            tally = run_batch(
                campaign,
                remind_campaign_slice_task,
                (tenant_of(r) for r in due),
                len(due),
                concurrency,
                tenants_per_task,
            )
            for job in campaign.jobs:
                for tenant_id in ledger.expire_links(job.profile.target_id, utcnow()):
                    job.report(tenant_id, Status.EXPIRED)
                    expired += 1
    if expired:
        logger.info("%d link(s) past their time and not re-issued are now expired", expired)
    coverage = ledger.connection_coverage(ids)
    ledger.close()
    return conclude(
        tally,
        started,
        "reminded",
        artifact=(
            _artifact_key("reminders", profiles),
            f"Reminders for {label}",
            f"Ledger, {len(due)} due",
        ),
        profile=label,
        connector_id=",".join(ids),
        dry_run=dry_run,
        expired=expired,
        coverage=coverage,
    )


def _begin(profiles: list[ConnectorProfile], concurrency: int) -> tuple[Ledger, int]:
    """Tag the run with every profile; the ledger, and `concurrency` within every profile's cap."""
    for profile in profiles:
        tag_run(profile)
        concurrency = effective_concurrency(profile, concurrency)
    return Ledger(LedgerSettings().db_url), concurrency


def _dry_run(
    batch: Iterable[Tenant], profiles: list[ConnectorProfile], needing_nothing: dict[str, set[str]]
) -> Iterator[TenantOutcome]:
    for tenant in batch:
        parts = [
            TenantOutcome(
                tenant.tenant_id,
                "skipped"
                if tenant.tenant_id in needing_nothing[p.target_id]
                else "would_initialise",
                connector=p.name,
            )
            for p in profiles
        ]
        yield combined(tenant.tenant_id, parts)


def _skip_done(
    batch: Iterable[Tenant], done: set[str], profiles: list[ConnectorProfile]
) -> Iterator[Tenant | TenantOutcome]:
    """The tenants to onboard, with those needing nothing from any connector decided skipped."""
    for tenant in batch:
        if tenant.tenant_id in done:
            parts = [TenantOutcome(tenant.tenant_id, "skipped", connector=p.name) for p in profiles]
            yield combined(tenant.tenant_id, parts)
        else:
            yield tenant


def _artifact_key(kind: str, profiles: list[ConnectorProfile]) -> str:
    # Keyed by the campaign's profiles, so each campaign keeps its own history in the UI.
    return (f"{kind}-campaign-" + "-".join(p.slug for p in profiles))[:200]
