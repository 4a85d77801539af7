"""What a batch's tasks share, opened by its flow: one Versori client and pacer per connector,
the SMTP sender, tenant events, the run's lease in the ledger."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from datetime import datetime

from prefect import get_run_logger

from flows.inputs.blocks import open_mailer, resolve_api_key
from flows.inputs.options import TenantEvents
from flows.reporting.events import TenantEventSender
from flows.running.in_process import on_interrupt
from onboarding.batch.call_pacing import PACE_SHARE, Pacer, Spacing
from onboarding.batch.campaign import Campaign
from onboarding.batch.connector_run import ConnectorRun
from onboarding.batch.retry_policy import BatchStop, RetryRule
from onboarding.batch.run_request import RunInputs
from onboarding.constants import PLATFORM_V2
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Ledger
from onboarding.settings import Settings, VersoriSettings
from onboarding.versori.client import VersoriClient
from onboarding.versori.wire import Api


def tag_run(profiles: list[ConnectorProfile]) -> None:
    """Tag the current flow run `profile:<slug>` for each profile, so the UI can filter runs
    by profile."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    tags = list(flow_run.tags or [])
    wanted = [f"profile:{p.slug}" for p in profiles if f"profile:{p.slug}" not in tags]
    if flow_run.id is None or not wanted:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*tags, *wanted])


def open_campaign(
    stack: ExitStack,
    inputs: RunInputs,
    settings: Settings,
    ledger: Ledger,
    concurrency: int,
    events: TenantEvents = TenantEvents.AUTO,
    remind_before: datetime | None = None,
    max_reminders: int = 0,
) -> Campaign:
    """A run's shared parts: per profile, a Versori client for its API, a pacer and a batch
    stop; one SMTP sender and one tenant event sender for all; the run's lease on the tenants
    it claims in the ledger. Closed with `stack`. `settings`: the run's (its SMTP and connect
    sections read only when it emails). `remind_before` makes it a reminder batch (a tenant is
    due while last sent before then)."""
    from prefect.runtime import flow_run

    deliver = inputs.request.deliver
    claimant = str(flow_run.id or uuid.uuid4())
    stack.enter_context(ledger.run_lease(claimant, settings.ledger.run_lease_seconds))
    retry, versori = settings.retry, settings.versori
    key_setting = api_key_setting(versori)
    on_status = stack.enter_context(TenantEventSender(events))
    connectors = [
        ConnectorRun(
            profile=profile,
            client=stack.enter_context(open_client(concurrency, versori, profile.api)),
            ledger=ledger,
            deliver=deliver,
            run_id=flow_run.id,
            pacer=make_pacer(profile, ledger),
            on_status=on_status,
            stop=batch_stop(profile, retry.stop_after, key_setting),
            claimant=claimant,
            profile_path=path,
        )
        for profile, path in zip(inputs.profiles, inputs.request.profiles, strict=True)
    ]

    def interrupt() -> None:
        for connector in connectors:
            connector.stop.interrupt()

    # Ctrl-C: no new tenant starts, so the run unwinds (and lets go of its claims) in time.
    stack.enter_context(on_interrupt(interrupt))
    return Campaign(
        connectors,
        deliver,
        mailer=open_mailer(stack, settings.smtp) if deliver.sends_email else None,
        templates=inputs.templates,
        rule=RetryRule(deadline=retry.tenant_deadline_seconds),
        remind_before=remind_before,
        max_reminders=max_reminders,
        connect_base_url=settings.connect.base_url if deliver.sends_email else None,
        defer_writes=True,  # honoured when links are only stored (Campaign.defers_writes)
    )


def api_key_setting(versori: VersoriSettings) -> str:
    """Where a run's API key comes from, as a refused key's message names it: VERSORI_API_KEY,
    which wins when set, else the Secret block VERSORI_API_KEY_BLOCK names."""
    if versori.api_key is None and versori.api_key_block:
        return (
            f"the key in the Secret block {versori.api_key_block!r} (VERSORI_API_KEY_BLOCK; "
            "VERSORI_API_KEY, when set, wins over it)"
        )
    return "VERSORI_API_KEY"


def batch_stop(profile: ConnectorProfile, after: int, key_setting: str) -> BatchStop:
    """The profile's batch stop, its messages naming the profile's connector (or system)."""
    kind = "system" if profile.api == PLATFORM_V2 else "connector"
    return BatchStop(
        after,
        key_setting=key_setting,
        target=f"{kind} {profile.target_id} of organisation {profile.organisation_id}",
        ids=f"organisation_id and {kind}_id in the profile {profile.name!r}",
    )


def rate_limit_name(profile: ConnectorProfile) -> str:
    return f"onboarding-rate-{profile.slug}"


def make_pacer(profile: ConnectorProfile, ledger: Ledger) -> Pacer:
    """A pacer at a little under the profile's `rate_limit_per_second`, if it sets one,
    shared through the ledger by every run of the profile on it (chunks, workers, two CLI
    runs at once); else one that only holds off after a 429 (onboarding/batch/call_pacing.py)."""
    rate = profile.rate_limit_per_second
    if rate is None:
        return Pacer()
    get_run_logger().info(
        "Pacing %s at %.4g calls/s (%g/s less %.0f%%), shared by every run on this ledger",
        profile.name,
        rate * PACE_SHARE,
        rate,
        100 * (1 - PACE_SHARE),
    )
    return Spacing(rate, name=rate_limit_name(profile), times=ledger)


def effective_concurrency(profiles: list[ConnectorProfile], asked: int) -> int:
    """`asked`, within every profile's `max_concurrency`."""
    caps = [p.max_concurrency for p in profiles if p.max_concurrency]
    return min([asked, *caps])


def open_client(
    concurrency: int, versori: VersoriSettings, api: Api = "connect-v1"
) -> VersoriClient:
    """A Versori client from the run's VERSORI_* settings (its key from VERSORI_API_KEY, else the
    Secret block VERSORI_API_KEY_BLOCK names), pooled for `concurrency` calls at once, for `api`
    (a profile's): unless VERSORI_BASE_URL is set, that API's production base URL."""
    return VersoriClient.from_settings(
        versori, api=api, api_key=resolve_api_key(versori), max_connections=concurrency
    )
