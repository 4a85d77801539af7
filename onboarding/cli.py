"""The `onboard` command line. The only module of the core package that may import Prefect."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.table import Table

from onboarding import constants
from onboarding.errors import InputError
from onboarding.ledger import EXPORT_KEYS, Ledger, redact_url, utcnow
from onboarding.onboard import Delivery, FanOut, TenantEvents
from onboarding.settings import LedgerSettings, VersoriSettings

app = typer.Typer(
    help="Onboard every tenant to a Versori OAuth2 connector, in batch, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()


@app.callback()
def _prefect_defaults() -> None:
    """Before any command imports Prefect (its settings are read once, on import): no analytics
    from a temporary server, and more than Prefect's 20 s for one to start on a busy machine.
    Either, set in the environment, wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


err = Console(stderr=True)

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PROJECT_DIR = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = PROJECT_DIR / "examples"
# Faults the demo injects into a few example tenants so that retries and failures show.
DEMO_SCRIPT = {
    "flaky-": ["503", "503"],
    "throttled-": ["429"],
    "down-under-": ["503*"],
    "badlink-": ["bad_url"],
}


def _bad_input(error: InputError) -> typer.Exit:
    err.print("[bold red]Bad input[/] (nothing was sent to Versori):", highlight=False)
    for line in str(error).splitlines():
        err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _quiet_task_logs(verbose: bool) -> None:
    # One INFO line per task run drowns the progress lines in a batch of thousands.
    if not verbose:
        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)


def _preflight(
    roster: str | None, profile: str, only: list[str] | None, dry_run: bool, deliver: Delivery
) -> None:
    """Check everything a run needs before Prefect starts, so bad input exits 2 at once."""
    from flows.common import resolve_api_key
    from onboarding.profile import load_profile
    from onboarding.roster import load_roster

    connector = load_profile(profile)
    needs: list[str] = []
    if deliver.sends_email:
        needs = _check_mail_settings(connector.email_templates)
    if roster is not None:
        load_roster(roster, connector, only, also_needs=needs)
    Ledger(LedgerSettings().db_url).close()
    if not dry_run:
        versori = VersoriSettings()
        if not (versori.api_key or versori.api_key_block):
            raise InputError(
                "VERSORI_API_KEY is not set: set it to a Versori API key, or set "
                "VERSORI_API_KEY_BLOCK to the name of a Prefect Secret block that holds one"
            )
        resolve_api_key(versori)


def _check_mail_settings(templates: str | None) -> list[str]:
    """Fail fast on templates or SMTP settings; return the roster columns the templates read."""
    from onboarding.mail import MailTemplates, SmtpSettings

    fields = MailTemplates(Path(templates) if templates else None).tenant_fields_used
    settings = SmtpSettings()
    if settings.block and not settings.host:
        return fields  # read when the flow starts; a missing block fails it with its name
    missing = [
        name
        for name, value in (
            ("ONBOARD_SMTP_HOST", settings.host),
            ("ONBOARD_EMAIL_FROM", settings.email_from),
        )
        if not value
    ]
    if missing:
        raise InputError(
            f"email delivery needs {' and '.join(missing)} (or ONBOARD_SMTP_BLOCK, the name of "
            "a prefect-email EmailServerCredentials block); see the README's Configuration"
        )
    return fields


def _run_flow(
    roster: str,
    profile: str,
    deliver: Delivery,
    concurrency: int,
    dry_run: bool,
    only: list[str] | None,
    **options: Any,
) -> dict[str, Any] | None:
    from flows.local import run_here
    from flows.onboard_tenants import onboard_tenants

    state = run_here(
        onboard_tenants,
        roster=roster,
        profile=profile,
        deliver=deliver,
        concurrency=concurrency,
        dry_run=dry_run,
        only=only,
        **options,
    )
    return _summary_of(state)


def _summary_of(state: Any) -> dict[str, Any] | None:
    """A finished run's summary (Completed or Failed alike), or None after saying why the run
    did not get that far (bad input inside the flow, a crash)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        return result
    err.print(f"[bold red]The run did not finish:[/] {state.message}", highlight=False)
    return None


def _print_outcomes(summary: dict[str, Any], everything: bool) -> None:
    rows = sorted(summary["outcomes"], key=lambda r: r["tenant_id"])
    if not everything:
        rows = [r for r in rows if r["status"] == "failed"]
    if rows:
        table = Table(title="Tenants" if everything else "Failed tenants")
        for column in ("tenant", "status", "link host", "state", "error"):
            table.add_column(column, overflow="fold")
        for r in rows:
            style = "red" if r["status"] == "failed" else ""
            error = r["error_message"] or r["error_code"]
            table.add_row(
                r["tenant_id"], r["status"], r["link_host"], r["masked_state"], error, style=style
            )
        out.print(table)
    if summary.get("outcomes_left_out"):
        out.print(
            f"…and {summary['outcomes_left_out']} more tenant(s) not listed here: "
            "`onboard status` and `onboard export` show the ledger."
        )
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["by_status"].items()))
    out.print(
        f"[bold]{summary['total']}[/] tenant(s) in {summary['seconds']} s: {counts}",
        highlight=False,
    )


@app.command()
def run(
    roster: Annotated[str, typer.Option(help="Roster file (.csv .json .jsonl .yaml) or URL.")],
    profile: Annotated[str, typer.Option(help="Connector profile YAML.")],
    deliver: Annotated[
        Delivery, typer.Option(help="store: ledger only; email: send to the admin; both.")
    ] = Delivery.STORE,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Tenants at once.")] = 16,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check inputs, call nothing.")] = False,
    only: Annotated[
        list[str] | None, typer.Option(help="Only this tenant_id (repeatable).")
    ] = None,
    tenants_per_task: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1000,
            help="Tenants per Prefect task run [default: 1 up to 100 tenants, else 100].",
        ),
    ] = None,
    tenant_events: Annotated[
        TenantEvents,
        typer.Option(
            help="Tenant status changes sent as Prefect events: all, failures, off; auto: all "
            "on a Prefect server, failures on the temporary one."
        ),
    ] = TenantEvents.AUTO,
    fan_out: Annotated[
        FanOut,
        typer.Option(
            help="in_process: the whole batch in one flow run; deployment: chunks as runs of "
            "--chunk-deployment on its work pool's workers (needs PREFECT_API_URL)."
        ),
    ] = FanOut.IN_PROCESS,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="With --fan-out deployment: tenants per chunk run.")
    ] = constants.CHUNK_SIZE,
    chunk_deployment: Annotated[
        str, typer.Option(help="flow/deployment that runs chunks with --fan-out deployment.")
    ] = constants.CHUNK_DEPLOYMENT,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log every task run.")] = False,
) -> None:
    """Onboard a roster. Exit 0: all succeeded; 1: some failed (after all were tried); 2: bad
    input (nothing was called)."""
    try:
        _preflight(roster, profile, only, dry_run, deliver)
    except InputError as error:
        raise _bad_input(error) from None
    _quiet_task_logs(verbose)
    summary = _run_flow(
        roster,
        profile,
        deliver,
        concurrency,
        dry_run,
        only,
        chunk_size=chunk_size,
        fan_out=fan_out,
        chunk_deployment=chunk_deployment,
        tenants_per_task=tenants_per_task,
        tenant_events=tenant_events,
    )
    if summary is None:
        raise typer.Exit(EXIT_SOME_FAILED)
    _print_outcomes(summary, everything=dry_run)
    if summary["failed"]:
        out.print("The next `onboard run` retries the failed tenants.")
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Folder for the demo's ledger and mail.")] = Path(
        "demo-output"
    ),
) -> None:
    """Onboard the example roster against a local emulator and a local SMTP server: no
    account, no set-up."""
    from onboarding.demo.smtp import LocalSmtpServer
    from onboarding.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer

    output.mkdir(parents=True, exist_ok=True)
    mail_dir = output / "mail"
    for stale in [*output.glob("onboarding.db*"), *mail_dir.glob("*.eml")]:
        stale.unlink()
    ledger_url = f"sqlite:///{(output / 'onboarding.db').resolve()}"
    roster, profile = str(EXAMPLES_DIR / "tenants.csv"), str(EXAMPLES_DIR / "profile.yaml")
    out.print(
        "[bold]Demo:[/] onboarding the 25 tenants of examples/tenants.csv through a local "
        "Versori emulator, emailing each admin through a local SMTP server.\nFour tenants meet "
        "injected faults: two recover after retries, two fail (a 503 that never clears, a "
        "returned URL without a state).",
        highlight=False,
    )
    with (
        EmulatorServer(EmulatorConfig(script=DEMO_SCRIPT, seed=7)) as emulator,
        LocalSmtpServer(mail_dir) as smtp,
    ):
        for name in (
            "VERSORI_API_KEY_BLOCK",
            "ONBOARD_SMTP_BLOCK",
            "ONBOARD_SMTP_USERNAME",
            "ONBOARD_SMTP_PASSWORD",
            "ONBOARD_SMTP_CA_FILE",
        ):
            os.environ.pop(name, None)
        os.environ.update(
            VERSORI_BASE_URL=emulator.base_url,
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=ledger_url,
            ONBOARD_SMTP_HOST=smtp.host,
            ONBOARD_SMTP_PORT=str(smtp.port),
            ONBOARD_SMTP_SECURITY="none",
            ONBOARD_EMAIL_FROM="onboarding@demo.example.com",
        )
        summary = _run_flow(roster, profile, Delivery.BOTH, 8, False, None)
    if summary is None:
        raise typer.Exit(EXIT_SOME_FAILED)
    _print_outcomes(summary, everything=True)
    emails = len(list(mail_dir.glob("*.eml")))
    out.print(
        f"\nWhere to look next:\n"
        f"  emails     {mail_dir}/ ({emails} .eml file(s), one per delivered tenant)\n"
        f"  ledger     {output / 'onboarding.db'}\n"
        f"  counts     ONBOARD_DB_URL={ledger_url} uv run onboard status\n"
        f"  links      ONBOARD_DB_URL={ledger_url} uv run onboard export --format csv\n"
        f"  your data  uv run onboard emulator, then `onboard run` in a second shell (README)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def remind(
    profile: Annotated[str, typer.Option(help="Connector profile YAML.")],
    after_hours: Annotated[
        float, typer.Option(min=0, help="Remind when the last email is older than this.")
    ] = 48.0,
    max_reminders: Annotated[int, typer.Option(min=0, help="Stop after this many.")] = 3,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Tenants at once.")] = 4,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List who is due; send nothing.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log every task run.")] = False,
) -> None:
    """Re-send links to admins who have not connected, re-issuing links past their time.
    Exit 0: all reminders sent; 1: some failed; 2: bad input."""
    from flows.local import run_here
    from flows.remind_tenants import remind_tenants

    try:
        _preflight(None, profile, None, dry_run, Delivery.EMAIL if not dry_run else Delivery.STORE)
    except InputError as error:
        raise _bad_input(error) from None
    _quiet_task_logs(verbose)
    state = run_here(
        remind_tenants,
        profile=profile,
        after_hours=after_hours,
        max_reminders=max_reminders,
        concurrency=concurrency,
        dry_run=dry_run,
    )
    summary = _summary_of(state)
    if summary is None:
        raise typer.Exit(EXIT_SOME_FAILED)
    _print_outcomes(summary, everything=True)
    if summary.get("expired"):
        out.print(f"{summary['expired']} link(s) past their time were marked expired.")
    if summary["failed"]:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command("mark-connected")
def mark_connected(
    state: Annotated[
        str,
        typer.Option(
            help="The state your OAuth callback received; '-' reads it from stdin (keeps it "
            "out of the process list and shell history)."
        ),
    ],
    connection_id: Annotated[
        str | None, typer.Option(help="Versori's id of the new connection.")
    ] = None,
) -> None:
    """Record that the tenant owning STATE connected. A state is accepted once, while its link
    is current and unexpired. Exit 0: recorded; 1: unknown, superseded, expired or already
    used state (nothing recorded); 2: bad input."""
    from pydantic import SecretStr

    from flows.local import run_here
    from flows.record_connection import record_connection_flow

    if state == "-":
        state = sys.stdin.readline()
    try:
        Ledger(LedgerSettings().db_url).close()
    except InputError as error:
        raise _bad_input(error) from None
    # A SecretStr: the run's parameters, as stored by the Prefect API, show it masked.
    result = run_here(
        record_connection_flow, state=SecretStr(state.strip()), connection_id=connection_id
    )
    data = result.result(raise_on_failure=False)
    if result.is_completed() and isinstance(data, dict):
        out.print(f"Tenant {data['tenant_id']} is connected.", highlight=False)
        return
    err.print(f"[bold red]Not recorded:[/] {result.message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Delay added to every request.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of requests answered 503.")] = 0.0,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests/s accepted; beyond, 429 + Retry-After.")
    ] = None,
    api_key: Annotated[str, typer.Option(help="The Bearer key it accepts.")] = "",
) -> None:
    """Serve a local emulator of Versori's initialise endpoint (knows examples/profile.yaml)."""
    from onboarding.emulator import DEFAULT_API_KEY, EmulatorConfig, run_emulator

    key = api_key or DEFAULT_API_KEY
    try:
        config = EmulatorConfig(
            api_keys=frozenset({key}),
            latency_ms=latency_ms,
            error_rate=error_rate,
            rate_limit=rate_limit,
        )
    except ValueError as error:
        raise _bad_input(InputError(str(error))) from None
    err.print(
        f"Versori emulator on http://{host}:{port}\n"
        f"  export VERSORI_BASE_URL=http://{host}:{port} VERSORI_API_KEY=<its key"
        f"{'' if api_key else ': ' + DEFAULT_API_KEY}>",
        highlight=False,
    )
    run_emulator(config, host=host, port=port)


@app.command()
def serve() -> None:
    """Serve every deployment of prefect.yaml from this process (schedules included) against
    the Prefect API in PREFECT_API_URL. Stop with Ctrl-C."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise _bad_input(
            InputError(
                "PREFECT_API_URL is not set: start a server (`uv run prefect server start`) and "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or point it at Prefect Cloud"
            )
        )
    import httpx

    api = str(PREFECT_API_URL.value()).rstrip("/")
    try:
        httpx.get(f"{api}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise _bad_input(
            InputError(
                f"cannot reach the Prefect API at {api} ({type(error).__name__}); is "
                "`prefect server start` running, and is PREFECT_API_URL right?"
            )
        ) from None
    from deployments.serve import serve_all

    serve_all()


blocks_app = typer.Typer(help="Keep secrets in Prefect blocks instead of the environment.")
app.add_typer(blocks_app, name="blocks")


@blocks_app.command("register")
def blocks_register() -> None:
    """Register the block types this project uses (Secret, EmailServerCredentials)."""
    from prefect.blocks.system import Secret
    from prefect_email import EmailServerCredentials

    for block_type in (Secret, EmailServerCredentials):
        block_type.register_type_and_schema()
    out.print("Registered block types: Secret, EmailServerCredentials")


@blocks_app.command("create")
def blocks_create(
    api_key_block: Annotated[str, typer.Option(help="Secret block for the API key.")] = (
        "versori-api-key"
    ),
    smtp_block: Annotated[
        str, typer.Option(help="EmailServerCredentials block for SMTP.")
    ] = "onboarding-smtp",
    skip_smtp: Annotated[bool, typer.Option("--skip-smtp", help="Only the API key.")] = False,
) -> None:
    """Save VERSORI_API_KEY and the ONBOARD_SMTP_* settings of this environment into blocks
    (asking for what is missing when run in a terminal), so that deployments name the blocks
    and nothing secret sits in prefect.yaml or in parameters."""
    from prefect.blocks.system import Secret

    versori = VersoriSettings()
    key = versori.api_key.get_secret_value() if versori.api_key else _ask("VERSORI_API_KEY")
    Secret(value=key).save(api_key_block, overwrite=True)
    out.print(f"Saved the Versori API key in Secret block {api_key_block!r}.")
    names = [f"VERSORI_API_KEY_BLOCK={api_key_block}"]
    if not skip_smtp:
        from prefect_email import EmailServerCredentials

        from onboarding.mail import SmtpSettings

        smtp = SmtpSettings()
        host = smtp.host or _ask("ONBOARD_SMTP_HOST", hide=False)
        password = smtp.password.get_secret_value() if smtp.password else None
        kind = {"ssl": "SSL", "starttls": "STARTTLS", "none": "INSECURE"}[smtp.security]
        EmailServerCredentials(
            smtp_server=host,
            smtp_port=smtp.port,
            smtp_type=kind,
            username=smtp.username,
            password=password,
        ).save(smtp_block, overwrite=True)
        out.print(f"Saved SMTP settings for {host} in EmailServerCredentials block {smtp_block!r}.")
        names.append(f"ONBOARD_SMTP_BLOCK={smtp_block}")
    out.print("Runs find them with: " + " ".join(names), highlight=False, soft_wrap=True)


def _ask(variable: str, hide: bool = True) -> str:
    if not sys.stdin.isatty():
        raise _bad_input(InputError(f"{variable} is not set; set it, or run this in a terminal"))
    value: str = typer.prompt(variable, hide_input=hide)
    return value


def _open_ledger() -> Ledger:
    try:
        return Ledger(LedgerSettings().db_url)
    except InputError as error:
        raise _bad_input(error) from None


@app.command()
def status(
    connector: Annotated[str | None, typer.Option(help="Only this connector id.")] = None,
) -> None:
    """Count tenants by status in the ledger (ONBOARD_DB_URL)."""
    ledger = _open_ledger()
    counts = ledger.counts_by_status(connector)
    stale = ledger.count_past_expiry(connector, utcnow())
    # Redacted: the URL may hold a password, in its user part or its query.
    table = Table(title=f"Ledger {redact_url(ledger.url)}")
    table.add_column("status")
    table.add_column("tenants", justify="right")
    for name, n in sorted(counts.items()):
        table.add_row(name, str(n))
    table.add_row("[bold]total[/]", f"[bold]{sum(counts.values())}[/]")
    out.print(table)
    if stale:
        out.print(f"{stale} link(s) are past their expiry and not connected.")


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


@app.command()
def export(
    format: Annotated[ExportFormat, typer.Option("--format", help="csv or jsonl.")],
    output: Annotated[Path | None, typer.Option(help="File to write; stdout if absent.")] = None,
    connector: Annotated[str | None, typer.Option(help="Only this connector id.")] = None,
) -> None:
    """Write every onboarding record, links included: handle the output as a secret."""
    ledger = _open_ledger()
    stream = _private_file(output) if output else sys.stdout
    try:
        writer = csv.DictWriter(stream, fieldnames=EXPORT_KEYS, lineterminator="\n")
        if format is ExportFormat.CSV:
            writer.writeheader()
        n = 0
        for record in ledger.iter_records(connector):
            row = {k: _plain(getattr(record, k)) for k in EXPORT_KEYS}
            if format is ExportFormat.CSV:
                writer.writerow(row)
            else:
                stream.write(json.dumps(row) + "\n")
            n += 1
    finally:
        if output:
            stream.close()
    if output:
        err.print(f"{n} record(s) written to {output}", highlight=False)


def _private_file(path: Path) -> TextIO:
    """`path` opened for writing, readable by its owner only (0600): it holds live links. An
    existing file is truncated and made 0600 too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "w", newline="", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    return value


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
