"""Flow `onboard-tenants`: one link per tenant of a roster, recorded in the ledger."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.common import Progress, quiet_routine_task_logs, resolve_api_key
from onboarding.client import VersoriClient
from onboarding.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from onboarding.ledger import Ledger
from onboarding.onboard import (
    Delivery,
    OnboardingJob,
    TenantOutcome,
    failed_outcome,
)
from onboarding.profile import ConnectorProfile, load_profile
from onboarding.roster import Roster, display_source, load_roster
from onboarding.settings import LedgerSettings, VersoriSettings
from tasks.initialise import onboard_tenant_task

# Errors that would fail every remaining tenant the same way: stop the batch, say it once.
BATCH_FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError)
TABLE_ROWS_MAX = 1000


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
    """Initialise a Versori OAuth2 link for every tenant of `roster` that lacks a live one."""
    logger = get_run_logger()
    connector = load_profile(profile)
    tenants = load_roster(roster, connector, only)
    ledger = Ledger(LedgerSettings().db_url)
    live = ledger.live_tenant_ids(connector.connector_id)
    logger.info(
        "Onboarding %d tenant(s) of %s to %s (concurrency %d, deliver %s%s)",
        len(tenants),
        display_source(roster),
        connector.name,
        concurrency,
        deliver.value,
        ", dry run" if dry_run else "",
    )
    started = time.monotonic()
    if dry_run:
        outcomes = _dry_run(tenants, live)
    else:
        versori = VersoriSettings()
        client = VersoriClient(
            api_key=resolve_api_key(versori),
            base_url=versori.base_url,
            connect_timeout=versori.connect_timeout,
            read_timeout=versori.read_timeout,
            call_deadline=versori.call_deadline,
            max_connections=concurrency,
        )
        job = OnboardingJob(
            profile=connector, client=client, ledger=ledger, deliver=deliver, run_id=flow_run.id
        )
        with client:
            outcomes = _run_batch(job, tenants, live, concurrency)
    summary = _summarise(
        connector, display_source(roster), outcomes, time.monotonic() - started, dry_run
    )
    _publish(connector, summary, outcomes)
    ledger.close()
    if summary["failed"]:
        return Failed(
            message=f"{summary['failed']} of {summary['total']} tenant(s) failed; "
            "the next run retries them",
            data=summary,
        )
    return Completed(message=f"{summary['total']} tenant(s) onboarded or skipped", data=summary)


def _dry_run(tenants: Roster, live: set[str]) -> list[TenantOutcome]:
    return [
        TenantOutcome(t.tenant_id, "skipped" if t.tenant_id in live else "would_initialise")
        for t in tenants
    ]


def _run_batch(
    job: OnboardingJob, tenants: Roster, live: set[str], concurrency: int
) -> list[TenantOutcome]:
    """Submit tenants as workers free up, so at most 2x concurrency futures exist at once."""
    logger = get_run_logger()
    progress = Progress(len(tenants), job.profile.name)
    outcomes: list[TenantOutcome] = []
    in_flight: dict[PrefectFuture[TenantOutcome], str] = {}
    stop_reason = ""

    def collect(done: set[PrefectFuture[TenantOutcome]]) -> None:
        nonlocal stop_reason
        for future in done:
            tenant_id = in_flight.pop(future)
            result = job.latest.pop(tenant_id, None)
            if result is None:  # the task failed before reaching the core: ask Prefect
                result = future.result(raise_on_failure=False)
            if isinstance(result, TenantOutcome):
                outcome = result
            else:
                outcome = failed_outcome(tenant_id, result)
                if isinstance(result, BATCH_FATAL) and not stop_reason:
                    stop_reason = str(result)
                    logger.error("Stopping the batch: %s", stop_reason)
            outcomes.append(outcome)
            progress.advance(failed=not outcome.ok)

    def wait_for_one() -> None:
        by_wrapped = {f.wrapped_future: f for f in in_flight}  # type: ignore[attr-defined]
        done, _ = concurrent.futures.wait(
            by_wrapped, return_when=concurrent.futures.FIRST_COMPLETED
        )
        collect({by_wrapped[w] for w in done})

    with quiet_routine_task_logs(), ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        for tenant in tenants:
            if tenant.tenant_id in live:
                outcomes.append(TenantOutcome(tenant.tenant_id, "skipped"))
                progress.advance()
                continue
            if stop_reason:
                outcomes.append(_not_attempted(job, tenant.tenant_id, tenant, stop_reason))
                progress.advance(failed=True)
                continue
            while len(in_flight) >= 2 * concurrency:
                wait_for_one()
            # quote(): Prefect would otherwise walk the job (client, ledger, results) per task.
            future = runner.submit(onboard_tenant_task, {"tenant": tenant, "job": quote(job)})
            in_flight[future] = tenant.tenant_id
        while in_flight:
            wait_for_one()
    progress.finish()
    return outcomes


def _not_attempted(job: OnboardingJob, tenant_id: str, tenant: Any, reason: str) -> TenantOutcome:
    message = f"not attempted: the batch stopped early because {reason}"
    job.ledger.record_failure(
        tenant_id=tenant_id,
        connector_id=job.profile.connector_id,
        profile=job.profile.name,
        tenant_name=tenant.name,
        admin_email=tenant.admin_email,
        error_code="not_attempted",
        error_message=message,
        run_id=job.run_id,
        count_attempt=False,
    )
    return TenantOutcome(tenant_id, "failed", error_code="not_attempted", error_message=message)


def _summarise(
    connector: ConnectorProfile,
    roster: str,
    outcomes: list[TenantOutcome],
    seconds: float,
    dry_run: bool,
) -> dict[str, Any]:
    by_status = Counter(o.status for o in outcomes)
    errors = Counter(o.error_code for o in outcomes if o.error_code)
    return {
        "profile": connector.name,
        "connector_id": connector.connector_id,
        "roster": roster,
        "dry_run": dry_run,
        "total": len(outcomes),
        "failed": by_status.get("failed", 0),
        "skipped": by_status.get("skipped", 0),
        "by_status": dict(by_status),
        "errors": dict(errors),
        "seconds": round(seconds, 2),
        "outcomes": [o.__dict__ for o in outcomes],
    }


def _publish(
    connector: ConnectorProfile, summary: dict[str, Any], outcomes: list[TenantOutcome]
) -> None:
    """The table and summary artifacts, under keys stable per profile so the UI keeps history."""
    failed_first = sorted(outcomes, key=lambda o: (o.status != "failed", o.tenant_id))
    rows = [
        {
            "tenant": o.tenant_id,
            "status": o.status,
            "link host": o.link_host,
            "state": o.masked_state,
            "error": f"{o.error_code}: {o.error_message}" if o.error_code else "",
        }
        for o in failed_first[:TABLE_ROWS_MAX]
    ]
    cut = len(outcomes) - len(rows)
    create_table_artifact(
        key=f"onboarding-{connector.slug}",
        table=rows,
        description=f"Tenants of {summary['roster']}"
        + (f" (first {len(rows)}, failures first; `onboard export` has all)" if cut else ""),
    )
    lines = [
        f"# Onboarding {connector.name}{' (dry run)' if summary['dry_run'] else ''}",
        "",
        f"Roster `{summary['roster']}`: {summary['total']} tenant(s) in {summary['seconds']} s.",
        "",
        "| status | tenants |",
        "| --- | --- |",
        *(f"| {status} | {n} |" for status, n in sorted(summary["by_status"].items())),
    ]
    if summary["errors"]:
        lines += ["", "| error | tenants |", "| --- | --- |"]
        lines += [f"| {code} | {n} |" for code, n in Counter(summary["errors"]).most_common()]
    create_markdown_artifact(key=f"onboarding-summary-{connector.slug}", markdown="\n".join(lines))
