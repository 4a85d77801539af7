"""Flow `onboard-tenants`: one link per tenant of a roster, recorded and delivered."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.runtime import deployment, flow_run
from pydantic import Field

from flows.batch import OutcomeCounts, conclude, run_batch, skip_live
from flows.campaign import load_campaign, onboard_campaign, profile_paths
from flows.events import on_temporary_server
from flows.fan_out import run_chunks
from flows.inputs.options import FanOut, TenantEvents
from flows.job import effective_concurrency, load_templates, open_job, tag_run
from onboarding import constants
from onboarding.delivery import Delivery
from onboarding.errors import InputError
from onboarding.ledger import Ledger
from onboarding.profile import load_profile
from onboarding.roster import (
    TenantRow,
    display_source,
    load_inline_roster,
    load_roster,
)
from onboarding.settings import LedgerSettings, files_root
from onboarding.tenant_steps import TenantOutcome
from tasks.slice_tasks import onboard_slice_task

MAX_INLINE_TENANTS = 100


def run_name() -> str:
    """'<profile> from <roster file>', or '<profile> for t1, t2' when tenants came inline."""
    params = flow_run.parameters
    try:
        paths = profile_paths(params["profile"])
        name = " + ".join(load_profile(p, root=run_files_root()).name for p in paths)
    except Exception:  # the flow itself reports a bad profile; the name must not fail first
        profile = params.get("profile")
        paths = [profile] if isinstance(profile, str) else list(profile or [])
        name = " + ".join(Path(str(p)).stem for p in paths)
    if params.get("roster"):
        return f"{name} from {Path(display_source(str(params['roster']))).name}"
    ids = [str(dict(t).get("tenant_id", "?")) for t in params.get("tenants") or []]
    shown = ", ".join(ids[:3]) + (f" +{len(ids) - 3}" if len(ids) > 3 else "")
    return f"{name} for {shown or 'no tenants'}"


SECRET_ROSTER = "secret:"


def roster_location(roster: str) -> str:
    """Where to read the roster from. `secret:<name>` reads it from the Prefect Secret block of
    that name: the way to pass a URL that carries a credential (a signed URL, a token), which
    as a flow parameter a Prefect server keeps, and shows, in clear. Such a URL given as the
    parameter itself is refused on a server (Prefect's temporary server ends with the run)."""
    if roster.startswith(SECRET_ROSTER):
        from prefect.blocks.system import Secret

        name = roster.removeprefix(SECRET_ROSTER)
        try:
            return str(Secret.load(name).get())  # type: ignore[union-attr]  # sync call
        except ValueError as err:
            raise InputError(
                f"roster {roster}: no Secret block named {name!r}; create it in the Prefect UI "
                "(Blocks, Secret) with the roster URL as its value"
            ) from err
    parts = urlsplit(roster)
    if parts.scheme in ("http", "https") and not on_temporary_server():
        keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
        held = [k for k in keys if any(w in k.lower() for w in constants.SECRET_QUERY_WORDS)]
        if held:
            raise InputError(
                f"roster {display_source(roster)}: the URL carries a credential (query "
                f"key {held[0]!r}), and the Prefect server would keep it in clear with the "
                "run's parameters; put the URL in a Prefect Secret block and pass "
                "`secret:<block name>` as the roster"
            )
    return roster


def run_files_root() -> Path | None:
    """Local paths of a run started through a deployment (by whoever may call it) must lie in
    ONBOARD_FILES_ROOT; a run started by hand reads any path its user can."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        return files_root(context.flow_run.deployment_id is not None)
    return files_root(deployment.id is not None)  # naming a run: its context is not set yet


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
            task run named after its tenant), 100 per task run above that.
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
    logger = get_run_logger()
    if (roster is None) == (tenants is None):
        raise InputError("give either `roster` (a file or URL) or `tenants` (inline), not both")
    root = run_files_root()
    profiles = load_campaign(profile_paths(profile), root)
    if len(profiles) > 1 and fan_out is FanOut.DEPLOYMENT:
        raise InputError(
            "fan_out deployment: a campaign (several profiles) runs in one flow run; "
            "use fan_out in_process, or one run per profile to fan out"
        )
    # A campaign's email uses its first profile's templates.
    templates = load_templates(profiles[0]) if deliver.sends_email else None
    needs = templates.tenant_fields_used if templates else ()
    if roster is not None:
        batch = load_roster(
            roster_location(roster), profiles, only, template_columns=needs, root=root
        )
    else:
        batch = load_inline_roster(tenants or [], profiles, only, template_columns=needs)
    source = display_source(roster) if roster is not None else batch.source
    if len(profiles) > 1:
        return onboard_campaign(
            profiles=profiles,
            batch=batch,
            templates=templates,
            source=source,
            deliver=deliver,
            dry_run=dry_run,
            concurrency=concurrency,
            tenants_per_task=tenants_per_task,
            tenant_events=tenant_events,
        )
    connector = profiles[0]
    tag_run(connector)
    ledger = Ledger(LedgerSettings().db_url)
    logger.info(
        "Onboarding %d tenant(s) of %s to %s (concurrency %d, deliver %s%s)",
        len(batch),
        source,
        connector.name,
        concurrency,
        deliver.value,
        ", dry run" if dry_run else "",
    )
    concurrency = effective_concurrency(connector, concurrency)
    started = time.monotonic()
    if dry_run:
        live = ledger.ids_needing_nothing(connector.target_id)
        tally = OutcomeCounts.of(
            TenantOutcome(t.tenant_id, "skipped" if t.tenant_id in live else "would_initialise")
            for t in batch
        )
    else:
        with ExitStack() as stack:
            if roster is not None and fan_out is FanOut.DEPLOYMENT and len(batch) > chunk_size:
                tally = run_chunks(
                    batch=batch,
                    location=roster,
                    profile_path=profile_paths(profile)[0],
                    profile=connector,
                    ledger=ledger,
                    deliver=deliver,
                    concurrency=concurrency,
                    only=only,
                    chunk_size=chunk_size,
                    chunk_deployment=chunk_deployment,
                    tenants_per_task=tenants_per_task,
                    tenant_events=tenant_events,
                    deadline_minutes=chunk_deadline_minutes,
                )
            else:
                live = ledger.ids_needing_nothing(connector.target_id)
                job = open_job(
                    stack, connector, ledger, deliver, templates, concurrency, tenant_events
                )
                tally = run_batch(
                    job,
                    onboard_slice_task,
                    skip_live(batch, live),
                    len(batch),
                    concurrency,
                    tenants_per_task,
                )
    ledger.close()
    return conclude(
        tally,
        started,
        "onboarded or skipped",
        artifact=(
            f"onboarding-{connector.slug}",
            f"Onboarding {connector.name}",
            f"Roster `{source}`",
        ),
        profile=connector.name,
        connector_id=connector.target_id,
        roster=source,
        dry_run=dry_run,
        deliver=deliver.value,
    )
