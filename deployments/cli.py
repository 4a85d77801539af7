"""The `onboard` command line: each command parses its options, calls the core or a flow, and
prints what came of it. Bad input, an InputError from wherever it is raised, exits 2
(`_Commands`). Each command imports what it uses when it runs: SQLAlchemy, httpx and Prefect
take seconds to import, which `onboard --help` should not pay for, nor `status` for Prefect."""

from __future__ import annotations

import os
import sys
from contextlib import closing, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from deployments import connect_cli, sync_cli
from deployments.automations_cli import automations_app
from deployments.cli_output import (
    connector_label,
    err,
    out,
    print_outcomes,
    print_status,
    quiet_task_logs,
    report_interrupted_run,
    send_connected_event,
    what_next,
)
from flows.inputs.options import FanOut, TenantEvents
from onboarding import constants
from onboarding.batch.delivery import Delivery
from onboarding.clock import utcnow
from onboarding.errors import InputError
from onboarding.export import ExportFormat

if TYPE_CHECKING:
    from onboarding.batch.run_request import RunInputs
    from onboarding.batch.run_summary import RunSummary
    from onboarding.settings import LedgerSettings, Settings

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Commands(TyperGroup):
    """Runs every command, those of `onboard blocks` too: the one place an InputError becomes
    its message on stderr and exit 2."""

    # Any: the Context class is typer's own copy of click's, which typer keeps private.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as error:
            err.print("[bold red]Bad input[/] (nothing was sent to Versori):", highlight=False)
            for line in str(error).splitlines():
                err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None


app = typer.Typer(
    cls=_Commands,
    help="Onboard every tenant to a Versori OAuth2 connector, in batch, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _prefect_defaults() -> None:
    """Before any command imports Prefect (its settings are read once, on import): no analytics
    from a temporary server, and more than Prefect's 20 s for one to start on a busy machine.
    Either, set in the environment, wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _check_run_inputs(
    settings: Settings,
    roster: str | None,
    profiles: list[str],
    only: list[str] | None,
    dry_run: bool,
    deliver: Delivery,
    fan_out: FanOut = FanOut.IN_PROCESS,
) -> RunInputs:
    """Everything a run needs, checked before Prefect starts, so bad input exits 2 at once;
    the command gives these inputs to the run it starts (`given_inputs`), which takes them as
    they are. The ledger is opened here too (the inputs' check reads only its URL's form): one
    that does not answer, or that a newer version of this tool wrote, exits 2 as well."""
    from flows.inputs.blocks import resolve_api_key
    from flows.inputs.parameters import run_request
    from onboarding.batch.run_request import check_run
    from onboarding.ledger import Ledger

    request = run_request(
        profiles,
        roster,
        only=only,
        deliver=deliver,
        dry_run=dry_run,
        reminders=roster is None,
        chunked=fan_out is FanOut.DEPLOYMENT,
        settings=settings,
    )
    inputs = check_run(request, settings)
    Ledger(settings.ledger.db_url).close()
    if not dry_run:
        resolve_api_key(settings.versori)  # loads the Secret block VERSORI_API_KEY_BLOCK names
    return inputs


def _run_flow(
    roster: str,
    profile: str | list[str],
    deliver: Delivery,
    concurrency: int,
    dry_run: bool,
    only: list[str] | None,
    **options: Any,
) -> RunSummary | None:
    from flows.onboard_tenants import onboard_tenants

    return _summary_of_run(
        onboard_tenants,
        roster=roster,
        profile=profile,
        deliver=deliver,
        concurrency=concurrency,
        dry_run=dry_run,
        only=only,
        **options,
    )


def _summary_of_run(flow: Any, **parameters: Any) -> RunSummary | None:
    """Run `flow` in this process; its summary once finished (Completed or Failed alike), or
    None after saying why the run did not get that far (bad input inside the flow, a crash)."""
    from flows.running.in_process import run_here

    state = run_here(flow, **parameters)
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        from onboarding.batch.run_summary import RunSummary

        return RunSummary.from_json(result)
    err.print(f"[bold red]The run did not finish:[/] {state.message}", highlight=False)
    return None


# Long for its options: each is declared with its help, as typer shows it in `onboard run --help`.
@app.command()
def run(
    roster: Annotated[str, typer.Option(help="Roster file (.csv .json .jsonl .yaml) or URL.")],
    profile: Annotated[
        list[str],
        typer.Option(
            help="Connector profile YAML; repeat it for a campaign (one email per tenant "
            "with every link it still needs)."
        ),
    ],
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
            help="Tenants per Prefect task run [default: 1 up to 100 tenants, else an eighth "
            "of the batch, 100-1000].",
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
    """Onboard a roster, to one connector or, with several --profile, to each (a campaign).
    Exit 0: all succeeded; 1: some failed (after all were tried); 2: bad input (nothing was
    called)."""
    from flows.inputs.parameters import given_inputs
    from flows.running.in_process import EXIT_INTERRUPTED, stop_on_interrupt
    from onboarding.settings import load_settings

    settings = load_settings()
    inputs = _check_run_inputs(settings, roster, profile, only, dry_run, deliver, fan_out)
    quiet_task_logs(verbose)
    ledger_url = settings.ledger.db_url
    try:
        with (
            stop_on_interrupt(lambda: report_interrupted_run(inputs, ledger_url)) as interrupt,
            given_inputs(inputs),
        ):
            summary = _run_flow(
                roster,
                profile[0] if len(profile) == 1 else profile,
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
    except KeyboardInterrupt:
        interrupt.report_once()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if interrupt.interrupted:  # the flow ended (Crashed) without raising the interrupt
        interrupt.report_once()
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary is None:
        raise typer.Exit(EXIT_SOME_FAILED)
    print_outcomes(summary, everything=dry_run)
    if summary.failed:
        out.print(what_next(summary), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def remind(
    profile: Annotated[
        list[str],
        typer.Option(
            help="Connector profile YAML; repeat it for a campaign (one reminder per tenant "
            "covering every connector it has not connected)."
        ),
    ],
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
    Exit 0: all reminders sent, or none due; 1: some failed; 2: bad input, or no ledger."""
    from onboarding.settings import load_settings

    settings = load_settings()
    deliver = Delivery.STORE if dry_run else Delivery.EMAIL
    if _nothing_to_remind(settings, profile, deliver, dry_run, after_hours, max_reminders):
        return
    from flows.inputs.parameters import given_inputs
    from flows.remind_tenants import remind_tenants

    inputs = _check_run_inputs(settings, None, profile, None, dry_run, deliver)
    quiet_task_logs(verbose)
    with given_inputs(inputs):
        summary = _summary_of_run(
            remind_tenants,
            profile=profile[0] if len(profile) == 1 else profile,
            after_hours=after_hours,
            max_reminders=max_reminders,
            concurrency=concurrency,
            dry_run=dry_run,
        )
    if summary is None:
        raise typer.Exit(EXIT_SOME_FAILED)
    print_outcomes(summary, everything=True)
    if summary.expired:
        out.print(f"{summary.expired} link(s) past their time were marked expired.")
    if summary.stopped:  # a refused key: what to fix, once
        out.print(what_next(summary), highlight=False, markup=False, soft_wrap=True)
    if summary.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _nothing_to_remind(
    settings: Settings,
    profiles: list[str],
    deliver: Delivery,
    dry_run: bool,
    after_hours: float,
    max_reminders: int,
) -> bool:
    """True, having said so and naming the ledger, when no tenant of these profiles is due a
    reminder and no link is past its time (which a reminder run would mark expired): asked of
    the ledger before Prefect is imported or its temporary server started. The inputs are
    checked first, as the run checks them (bad input exits 2)."""
    from onboarding.batch.run_request import RunRequest, check_run
    from onboarding.db_url import redact
    from onboarding.ledger import Ledger

    url = _ledger_url_to_read(settings.ledger)
    request = RunRequest(tuple(profiles), deliver=deliver, dry_run=dry_run, reminders=True)
    connectors = check_run(request, settings).profiles
    ids = [p.target_id for p in connectors]
    now = utcnow()
    sent_before = now - timedelta(hours=after_hours)
    with closing(Ledger(url)) as ledger:
        due = sum(
            ledger.count_due_for_reminder(i, sent_before=sent_before, max_reminders=max_reminders)
            for i in ids
        )
        if due or ledger.count_past_expiry(ids, now):
            return False
        held = sum(ledger.counts_by_status(ids).values())
        anything = held or bool(ledger.connector_profiles())
    where = f"the ledger {redact(url)}"
    label = " + ".join(connector_label(p.name, p.display_name) for p in connectors)
    if not anything:
        said = f"Nothing to remind: {where} holds no records yet (`onboard run` makes them)."
    elif not held:
        said = f"Nothing to remind: {where} holds no records of {label}."
    else:
        said = (
            f"Nothing to remind in {where}: of its {held} record(s) of {label}, none was "
            f"emailed more than {after_hours:g} h ago without connecting (with fewer than "
            f"{max_reminders} reminders), and no link is past its time."
        )
    out.print(said, highlight=False, markup=False, soft_wrap=True)
    return True


def _ledger_url_to_read(ledger: LedgerSettings) -> str:
    """ONBOARD_DB_URL, when a ledger is there. A SQLite file that does not exist is not
    created: the command says where it looked and exits 2 (a wrong folder, or a wrong or
    unset ONBOARD_DB_URL, is what a run that reads an empty ledger would hide)."""
    url = ledger.db_url
    missing = _missing_sqlite_file(url)
    if missing is not None:
        err.print(
            f"No ledger at {missing}: run `onboard run` first (or set ONBOARD_DB_URL).",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    return url


def _missing_sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file `url` names when there is no such file; None for
    any other URL (an unusable one is named by the ledger's own error)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    path = os.path.abspath(database)
    return None if os.path.exists(path) else path


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
    from rich.markup import escape

    from onboarding.connections.record_connection import record_connection
    from onboarding.errors import OnboardingError
    from onboarding.ledger import Ledger
    from onboarding.settings import load_settings

    if state == "-":
        state = sys.stdin.readline()
    with closing(Ledger(_ledger_url_to_read(load_settings().ledger))) as ledger:
        try:
            record = record_connection(ledger, state.strip(), connection_id)
        except InputError:
            raise
        except OnboardingError as error:  # the state's error says which, never the whole state
            err.print(f"[bold red]Not recorded:[/] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(EXIT_SOME_FAILED) from None
    out.print(f"Tenant {record.tenant_id} is connected to {record.profile}.", highlight=False)
    send_connected_event(record)


# The demo and its stand-ins come with demo/ (and its packages), which the wheel leaves out.
try:
    from demo.commands import demo_command, emulator, smtp_sink
except ModuleNotFoundError as missing:  # pragma: no cover - an install without demo/
    if missing.name != "demo":
        raise
else:
    app.command("demo")(demo_command(_run_flow, print_outcomes))
    app.command()(emulator)
    app.command("smtp-sink")(smtp_sink)


@app.command()
def serve() -> None:
    """Serve every deployment of prefect.yaml from this process against the Prefect API in
    PREFECT_API_URL, with their schedules as prefect.yaml declares them (every one shipped
    off; it lists them and says how to turn one on). Stop with Ctrl-C."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise InputError(
            "PREFECT_API_URL is not set: start a server (`uv run prefect server start`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or point it at Prefect Cloud"
        )
    import httpx

    api = str(PREFECT_API_URL.value()).rstrip("/")
    try:
        httpx.get(f"{api}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise InputError(
            f"cannot reach the Prefect API at {api} ({type(error).__name__}); is "
            "`prefect server start` running, and is PREFECT_API_URL right?"
        ) from None
    from deployments.serve import serve_all

    serve_all()


blocks_app = typer.Typer(help="Keep secrets in Prefect blocks instead of the environment.")
app.add_typer(blocks_app, name="blocks")
app.add_typer(automations_app, name="automations")


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

    from onboarding.settings import load_settings

    settings = load_settings()
    versori = settings.versori
    key = versori.api_key.get_secret_value() if versori.api_key else _ask("VERSORI_API_KEY")
    Secret(value=key).save(api_key_block, overwrite=True)
    out.print(f"Saved the Versori API key in Secret block {api_key_block!r}.")
    names = [f"VERSORI_API_KEY_BLOCK={api_key_block}"]
    if not skip_smtp:
        from flows.inputs.blocks import smtp_block_of

        smtp = settings.smtp
        host = smtp.host or _ask("ONBOARD_SMTP_HOST", hide=False)
        smtp_block_of(smtp, host).save(smtp_block, overwrite=True)
        out.print(f"Saved SMTP settings for {host} in EmailServerCredentials block {smtp_block!r}.")
        names.append(f"ONBOARD_SMTP_BLOCK={smtp_block}")
    out.print("Runs find them with: " + " ".join(names), highlight=False, soft_wrap=True)


def _ask(variable: str, hide: bool = True) -> str:
    if not sys.stdin.isatty():
        raise InputError(f"{variable} is not set; set it, or run this in a terminal")
    return str(typer.prompt(variable, hide_input=hide))


@app.command()
def status(
    connector: Annotated[
        list[str] | None,
        typer.Option(help="Only this connector (or system) id; repeatable."),
    ] = None,
    profile: Annotated[
        list[str] | None,
        typer.Option(help="Only this profile's connector; repeatable (a campaign's)."),
    ] = None,
) -> None:
    """Count tenants by status in the ledger (ONBOARD_DB_URL), for each connector; with
    several, also how many tenants are connected to all of them, to some, to none."""
    from onboarding.ledger import Ledger
    from onboarding.settings import load_settings

    names: dict[str, str] = {}
    if profile:  # imported only then: profiles need pydantic's models and YAML
        from onboarding.inputs.profile import load_profile

        names = {
            p.target_id: connector_label(p.name, p.display_name) for p in map(load_profile, profile)
        }
    with Ledger(_ledger_url_to_read(load_settings().ledger)) as ledger:
        print_status(ledger, connector or [], names)


@app.command()
def export(
    format: Annotated[ExportFormat, typer.Option("--format", help="csv or jsonl.")],
    output: Annotated[Path | None, typer.Option(help="File to write; stdout if absent.")] = None,
    connector: Annotated[
        list[str] | None, typer.Option(help="Only this connector id; repeatable.")
    ] = None,
) -> None:
    """Write every onboarding record, one per (tenant, connector), links included: handle the
    output as a secret."""
    from onboarding.export import private_file, write_records
    from onboarding.ledger import Ledger
    from onboarding.settings import load_settings

    with (
        Ledger(_ledger_url_to_read(load_settings().ledger)) as ledger,
        private_file(output) if output else nullcontext(sys.stdout) as stream,
    ):
        n = write_records(ledger, stream, format, connector)
    if output:
        err.print(f"{n} record(s) written to {output}", highlight=False)


app.command("connect-server")(connect_cli.connect_server)
app.command()(connect_cli.revoke)
app.command("sync")(sync_cli.sync)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
