"""The two bodies every run goes through, for one connector or a campaign of several: onboard
a roster (in this flow run, or fanned out in chunks), and remind the admins who have not
connected. The flows on top (flows/*.py) turn their parameters into checked inputs and call
one of these; a chunk run calls `onboard_tenants_of` for its part of the roster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing
from datetime import datetime, timedelta
from typing import Any

from prefect import get_run_logger
from prefect.client.schemas.objects import State

from flows.batching.fan_out import ChunkPlan, run_chunks
from flows.batching.resources import effective_concurrency, open_campaign, tag_run
from flows.batching.slices import run_batch
from flows.inputs.options import TenantEvents
from flows.inputs.parameters import connector_label
from flows.reporting.summary import OutcomeCounts, final_state, publish, summarise
from onboarding.batch.campaign import Campaign
from onboarding.batch.outcomes import OutcomeStatus, TenantOutcome, combined
from onboarding.batch.run_request import RunInputs
from onboarding.clock import utcnow
from onboarding.connections.record_connection import tenant_of
from onboarding.inputs.profile import ConnectorProfile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Record, Status, funnel_lines
from onboarding.settings import Settings
from tasks.slice_tasks import onboard_slice_task, remind_slice_task


def onboard_tenants_batch(
    inputs: RunInputs,
    settings: Settings,
    *,
    concurrency: int,
    tenants_per_task: int | None,
    tenant_events: TenantEvents,
    chunks: ChunkPlan | None = None,
) -> State[dict[str, Any]]:
    """Onboard every tenant of the inputs' roster to every profile, one email per tenant; in
    chunks on a work pool when `chunks` says so and the roster is larger than a chunk.
    `settings`: the run's, read when its flow started."""
    profiles, request = inputs.profiles, inputs.request
    assert inputs.roster is not None
    get_run_logger().info(
        "Onboarding %d tenant(s) of %s to %s (concurrency %d, deliver %s%s)",
        len(inputs.roster),
        inputs.source,
        connector_label(profiles),
        concurrency,
        request.deliver.value,
        ", dry run" if request.dry_run else "",
    )
    tag_run(profiles)
    started = time.monotonic()
    with closing(Ledger(settings.ledger.db_url)) as ledger:
        if chunks is not None and not request.dry_run and len(inputs.roster) > chunks.size:
            tally = run_chunks(inputs, ledger, chunks)
        else:
            tally = onboard_tenants_of(
                inputs, settings, ledger, concurrency, tenants_per_task, tenant_events
            )
        artifact = ("onboarding", "Onboarding", f"Roster `{inputs.source}`")
        about = {"roster": inputs.source, "deliver": request.deliver.value}
        return _end(tally, started, "onboarded or skipped", inputs, ledger, artifact, **about)


def onboard_tenants_of(
    inputs: RunInputs,
    settings: Settings,
    ledger: Ledger,
    concurrency: int,
    tenants_per_task: int | None,
    tenant_events: TenantEvents,
    watch: Callable[[Campaign], AbstractContextManager[Any]] | None = None,
) -> OutcomeCounts:
    """The roster's tenants, in slices as task runs in this flow run; those needing nothing
    from any connector are counted skipped without a task run. `watch`, given the campaign,
    is entered for the batch's time (a chunk stops when its parent ends)."""
    assert inputs.roster is not None
    profiles, roster = inputs.profiles, inputs.roster
    # A chunk asks about its own tenants only; a whole roster about every tenant at once.
    only = [t.tenant_id for t in roster] if roster.stop is not None else None
    needing_nothing = {
        p.target_id: ledger.ids_needing_nothing(p.target_id, only_ids=only) for p in profiles
    }
    if inputs.request.dry_run:
        return OutcomeCounts.of(_dry_run(roster, profiles, needing_nothing))
    concurrency = effective_concurrency(profiles, concurrency)
    with ExitStack() as stack:
        campaign = open_campaign(stack, inputs, settings, ledger, concurrency, tenant_events)
        campaign.needing_nothing = needing_nothing
        if watch is not None:
            stack.enter_context(watch(campaign))
        work = _to_do(roster, campaign)
        return run_batch(
            campaign,
            onboard_slice_task,
            work,
            len(roster),
            concurrency,
            tenants_per_task,
            retry=settings.retry,
        )


def remind_tenants_batch(
    inputs: RunInputs,
    settings: Settings,
    *,
    after_hours: float,
    max_reminders: int,
    concurrency: int,
    tenants_per_task: int | None,
    tenant_events: TenantEvents,
) -> State[dict[str, Any]]:
    """One reminder per tenant due one (for any connector of the run), covering every
    connector it was emailed and has not connected; links past their time and not re-issued
    are then marked expired."""
    logger = get_run_logger()
    profiles, label = inputs.profiles, connector_label(inputs.profiles)
    tag_run(profiles)
    with closing(Ledger(settings.ledger.db_url)) as ledger:
        now = utcnow()
        sent_before = now - timedelta(hours=after_hours)
        due = _due(ledger, profiles, sent_before, max_reminders)
        logger.info(
            "%d tenant(s) are due a reminder for %s (sent over %g h ago, fewer than %d reminders)",
            len(due),
            label,
            after_hours,
            max_reminders,
        )
        started = time.monotonic()
        if inputs.request.dry_run:
            tally = OutcomeCounts.of(_would_remind(r, now) for r in due)
            expired = ledger.count_past_expiry([p.target_id for p in profiles], now)
        else:  # the due tenants in slices as task runs, then links past their time expired
            concurrency = effective_concurrency(profiles, concurrency)
            with ExitStack() as stack:
                campaign = open_campaign(
                    stack,
                    inputs,
                    settings,
                    ledger,
                    concurrency,
                    tenant_events,
                    remind_before=sent_before,
                    max_reminders=max_reminders,
                )
                work = (tenant_of(r) for r in due)
                tally = run_batch(
                    campaign,
                    remind_slice_task,
                    work,
                    len(due),
                    concurrency,
                    tenants_per_task,
                    retry=settings.retry,
                )
                expired = _expire(campaign)
        if expired:
            logger.info("%d link(s) past their time and not re-issued are now expired", expired)
        artifact = ("reminders", "Reminders for", f"Ledger, {len(due)} due")
        return _end(tally, started, "reminded", inputs, ledger, artifact, expired=expired)


def _label(profiles: list[ConnectorProfile]) -> str:
    return " + ".join(p.name for p in profiles)


def _key(kind: str, profiles: list[ConnectorProfile]) -> str:
    """The artifacts' key, stable per profile (or campaign), so the UI keeps their history."""
    if len(profiles) == 1:
        return f"{kind}-{profiles[0].slug}"
    return (f"{kind}-campaign-" + "-".join(p.slug for p in profiles))[:200]


def _end(
    tally: OutcomeCounts,
    started: float,
    done: str,
    inputs: RunInputs,
    ledger: Ledger,
    artifact: tuple[str, str, str],
    **about: Any,
) -> State[dict[str, Any]]:
    """A run's end: its summary (the counts since `started`, a time.monotonic(); `about`; each
    connector's funnel in the ledger and, for a campaign, how many tenants are connected to
    all, some, none of its connectors), published as artifacts (`artifact`: key kind, title,
    source), and its final state, which says `done` when no tenant failed."""
    profiles, label = inputs.profiles, _label(inputs.profiles)
    ids = [p.target_id for p in profiles]
    funnels = ledger.funnel(ids)
    funnel = {
        p.display_name: funnel_lines(funnels[p.target_id])
        for p in profiles
        if p.target_id in funnels
    }
    coverage = {"coverage": ledger.connection_coverage(ids)} if len(profiles) > 1 else {}
    summary = summarise(
        tally,
        time.monotonic() - started,
        profile=label,
        connector_id=",".join(ids),
        connector_names={p.name: p.display_name for p in profiles},
        dry_run=inputs.request.dry_run,
        **about,
        funnel=funnel,
        **coverage,
    )
    kind, title, source = artifact
    publish(_key(kind, profiles), f"{title} {connector_label(profiles)}", source, summary)
    return final_state(summary, done)


def _to_do(roster: Iterable[Tenant], campaign: Campaign) -> Iterator[Tenant | TenantOutcome]:
    """The tenants to onboard, with those needing nothing from any connector decided skipped
    (already delivered, or connected): they take no task run."""
    done = set.intersection(*campaign.needing_nothing.values())
    for tenant in roster:
        if tenant.tenant_id in done:
            skipped = TenantOutcome(
                tenant.tenant_id, OutcomeStatus.SKIPPED, error_message=ALREADY_DONE
            )
            yield campaign.outcome(
                tenant.tenant_id, dict.fromkeys(campaign.needing_nothing, skipped)
            )
        else:
            yield tenant


ALREADY_DONE = "already delivered or connected, no task run needed"


def _dry_run(
    roster: Iterable[Tenant],
    profiles: list[ConnectorProfile],
    needing_nothing: dict[str, set[str]],
) -> Iterator[TenantOutcome]:
    for tenant in roster:
        tid = tenant.tenant_id
        parts = [
            TenantOutcome(
                tid,
                OutcomeStatus.SKIPPED
                if tid in needing_nothing[p.target_id]
                else OutcomeStatus.WOULD_INITIALISE,
                connector=p.name,
            )
            for p in profiles
        ]
        yield combined(tid, parts)


def _due(
    ledger: Ledger, profiles: list[ConnectorProfile], sent_before: datetime, max_reminders: int
) -> list[Record]:
    """Each tenant due a reminder under any of the profiles' connectors, once."""
    first: dict[str, Record] = {}
    for profile in profiles:
        for record in ledger.due_for_reminder(
            profile.target_id, sent_before=sent_before, max_reminders=max_reminders
        ):
            first.setdefault(record.tenant_id, record)
    return list(first.values())


def _would_remind(record: Record, now: datetime) -> TenantOutcome:
    stale = record.expires_at is not None and record.expires_at <= now
    return TenantOutcome(
        record.tenant_id, OutcomeStatus.WOULD_REISSUE if stale else OutcomeStatus.WOULD_REMIND
    )


def _expire(campaign: Campaign) -> int:
    expired = 0
    for connector in campaign.connectors:
        for tenant_id in connector.ledger.expire_links(connector.connector_id, utcnow()):
            connector.report(tenant_id, Status.EXPIRED)
            expired += 1
    return expired
