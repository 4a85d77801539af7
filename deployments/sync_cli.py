"""`onboard sync`: run the sync-connections flow in this process, as `onboard remind` runs its
flow, and print what it came to. Its inputs are checked before Prefect starts a run: bad input
(an InputError, turned into exit 2 by deployments/cli.py's command group) calls nothing."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from deployments.cli_output import err, out
from flows.inputs.options import TenantEvents
from onboarding.errors import InputError

if TYPE_CHECKING:
    from onboarding.settings import Settings

EXIT_OK, EXIT_SOME_FAILED = 0, 1


def sync(
    profile: Annotated[
        list[str],
        typer.Option(
            help="Connector profile YAML; repeat it for each system of an environment (a "
            "tenant is activated once connected to every one)."
        ),
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Read Versori and say what would change; write nothing."),
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="Versori calls in flight at once.")
    ] = 8,
    tenant_events: Annotated[
        TenantEvents,
        typer.Option(
            help="Tenant status changes sent as Prefect events: all, failures, off; auto: all "
            "on a Prefect server, failures on the temporary one."
        ),
    ] = TenantEvents.AUTO,
) -> None:
    """Read back from Versori who is connected, activated, broken or disconnected, and bring
    the ledger in line; activate tenants connected for every profile of an environment.
    Writes nothing to Versori but activations. Exit 0: synced; 1: an activation refused, or
    the run did not finish; 2: bad input, or no ledger."""
    from flows.inputs.sync_inputs import sync_profiles
    from onboarding.settings import load_settings

    settings = load_settings()
    _ledger_to_read(settings.ledger.db_url)
    sync_profiles(profile, settings)
    _load_api_key(settings)
    from flows.running.in_process import run_here
    from flows.sync_connections import sync_connections

    state = run_here(
        sync_connections,
        profile=profile[0] if len(profile) == 1 else profile,
        dry_run=dry_run,
        concurrency=concurrency,
        tenant_events=tenant_events,
    )
    result = state.result(raise_on_failure=False)
    if not isinstance(result, dict):
        err.print(f"[bold red]The run did not finish:[/] {state.message}", highlight=False)
        raise typer.Exit(EXIT_SOME_FAILED)
    for line in summary_lines(result):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if result["refused"]:
        raise typer.Exit(EXIT_SOME_FAILED)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `onboard sync` prints: a line per profile (tenants, changes by status,
    activations, Versori calls, seconds), the refusals by Versori's code, the totals."""
    dry = summary["dry_run"]
    lines = []
    for row in summary["profiles"]:
        name = row["profile"]
        if row["display_name"] != name:
            name = f"{name} ({row['display_name']})"
        changes = ", ".join(
            f"{status} {n}" for status, n in sorted(row["changes"].items(), key=lambda s: -s[1])
        )
        lines.append(
            f"{name}, {row['api']}: {row['tenants']} tenant(s); "
            + (f"{'would change' if dry else 'changed'}: {changes}" if changes else "no change")
            + (f"; activated {row['activated']}" if row["activated"] else "")
            + f"; {row['versori_calls']} Versori call(s) in {row['seconds']:g} s"
            + (f"; {row['raced']} raced (read again next sync)" if row["raced"] else "")
        )
    refused = summary["refused"]
    if refused:
        codes = ", ".join(f"{code} {n}" for code, n in refused.items())
        lines.append(f"Activations refused by Versori: {codes} (the next sync tries again):")
        lines += [f"  {r['tenant_id']}: {r['code']}: {r['message']}" for r in summary["refusals"]]
    total = (
        f"Activated {summary['activated']} tenant(s), {sum(refused.values())} refused; "
        if not dry
        else "Dry run: nothing written; "
    )
    lines.append(
        total
        + f"{summary['versori_calls']} Versori call(s) in all"
        + (
            f" ({summary['activation_calls']} for activations)"
            if summary["activation_calls"]
            else ""
        )
        + f"; {summary['seconds']:g} s."
    )
    return lines


def _ledger_to_read(url: str) -> None:
    """A SQLite ledger file that does not exist is not created: sync reads the tenants a run
    recorded, so a missing file is a wrong folder or ONBOARD_DB_URL (exit 2, naming it)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return  # the ledger's own error names it
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if not database.startswith("file:") and not os.path.exists(database):
        raise InputError(
            f"No ledger at {os.path.abspath(database)}: run `onboard run` first (or set "
            "ONBOARD_DB_URL)"
        )


def _load_api_key(settings: Settings) -> None:
    """The key kept in a Prefect Secret block (VERSORI_API_KEY_BLOCK) loads before the run
    starts, so a wrong block name is bad input, said once."""
    from flows.inputs.blocks import resolve_api_key

    try:
        resolve_api_key(settings.versori)
    except ValueError as error:
        raise InputError(
            f"VERSORI_API_KEY_BLOCK: no Secret block named {settings.versori.api_key_block!r} "
            "(create it with `onboard blocks create` or in the Prefect UI)"
        ) from error
