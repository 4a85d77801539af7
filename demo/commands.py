"""The `onboard` commands of the demo and its stand-ins: `onboard demo`, `onboard emulator`,
`onboard smtp-sink`. deployments/cli.py registers them when demo/ is there (the wheel leaves it
out). Bad input is an InputError, which the CLI prints and exits 2 on, as for its own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from onboarding.batch.delivery import Delivery
from onboarding.errors import InputError
from onboarding.net import is_loopback

if TYPE_CHECKING:
    from demo.emulator import EmulatorConfig
    from onboarding.batch.run_summary import RunSummary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
out = Console()
err = Console(stderr=True)


def demo_command(
    run_flow: Callable[..., RunSummary | None],
    print_outcomes: Callable[[RunSummary, bool], None],
) -> Callable[..., None]:
    """`onboard demo`, which runs its flows and prints their outcomes as `onboard run` does,
    with the CLI's own `run_flow` and `print_outcomes` (demo/ imports nothing of deployments/)."""

    def demo(
        output: Annotated[Path, typer.Option(help="Folder for the demo's ledger and mail.")] = (
            Path("demo-output")
        ),
    ) -> None:
        """Onboard the example roster against a local emulator and a local SMTP server: no
        account, no set-up."""
        from demo import connect_demo
        from demo.local import demo_stage

        roster, profile = str(EXAMPLES / "tenants.csv"), str(EXAMPLES / "profile.yaml")
        second = str(EXAMPLES / "profile-slack.yaml")
        out.print(
            "[bold]Demo:[/] onboarding the 25 tenants of examples/tenants.csv through a local "
            "Versori emulator, emailing each admin through a local SMTP server.\nFour tenants "
            "meet injected faults: two recover after retries, two fail (a 503 that never "
            "clears, a returned URL without a state).",
            highlight=False,
        )
        with demo_stage(output) as stage:
            summary = run_flow(roster, profile, Delivery.BOTH, 8, False, None)
            if summary is None:
                raise typer.Exit(1)
            print_outcomes(summary, True)
            emails = len(list(stage.mail_dir.glob("*.eml")))
            out.print(
                "\n[bold]Then a campaign:[/] the same roster to Zendesk and Slack (a Platform "
                "API v2 system) in one run. Each admin gets one email with the links it still "
                "needs: Slack's for those who have Zendesk's, both for t024 (its Zendesk link "
                "failed before), Slack's alone for t023 (Zendesk is still down for it).",
                highlight=False,
            )
            campaign = run_flow(roster, [profile, second], Delivery.BOTH, 8, False, None)
            if campaign is None:
                raise typer.Exit(1)
            print_outcomes(campaign, False)
            campaign_emails = len(list(stage.mail_dir.glob("*.eml"))) - emails
            out.print(
                "\n[bold]Last, a durable connect link[/] (onboard connect-server):",
                highlight=False,
            )
            emulator_url = os.environ["VERSORI_BASE_URL"]
            acts = connect_demo.connect_one(stage, Path(roster), emulator_url, "t001", "t002")
            for line in acts:
                out.print(line, highlight=False, soft_wrap=True)
        out.print(
            f"\nWhere to look next:\n"
            f"  emails     {stage.mail_dir}/ ({emails} .eml file(s) from the first run, one per "
            f"delivered tenant; {campaign_emails} from the campaign, one per tenant)\n"
            f"  ledger     {stage.ledger}\n"
            f"  counts     ONBOARD_DB_URL={stage.ledger_url} uv run onboard status\n"
            f"  links      ONBOARD_DB_URL={stage.ledger_url} uv run onboard export --format csv\n"
            "  your data  uv run onboard emulator and uv run onboard smtp-sink, then `onboard "
            "run` in a third shell (docs/your-roster.md)",
            highlight=False,
            soft_wrap=True,
        )

    return demo


def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Delay added to every request.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of requests answered 503.")] = 0.0,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests/s accepted; beyond, 429 + Retry-After.")
    ] = None,
    rate_limit_window: Annotated[
        str,
        typer.Option(
            help="How --rate-limit counts: sliding (at most N in any trailing second), fixed "
            "(N per clock second) or bucket (a token bucket, forgives bursts)."
        ),
    ] = "sliding",
    script: Annotated[
        Path | None,
        typer.Option(
            help="YAML or JSON file mapping a substring of authorizeUrl?additionalParams to a "
            "list of actions (ok, 400, 401, 403, 404, 429, 500, 502, 503, bad_url, stall; "
            "a trailing * repeats it).",
        ),
    ] = None,
    stall_seconds: Annotated[
        float, typer.Option(help="How long a `stall` action holds the body back.")
    ] = 60.0,
    api_key: Annotated[str, typer.Option(help="The Bearer key it accepts.")] = "",
) -> None:
    """Serve a local emulator of Versori's initialise endpoint (knows examples/profile.yaml)."""
    from demo.emulator import DEFAULT_API_KEY, run_emulator

    config = _emulator_config(
        api_key or DEFAULT_API_KEY,
        script,
        latency_ms=latency_ms,
        error_rate=error_rate,
        rate_limit=rate_limit,
        rate_limit_window=rate_limit_window,
        stall_seconds=stall_seconds,
    )
    url = f"http://{host}:{port}"
    # One line to copy; a key given on the command line is not echoed.
    key = f" VERSORI_API_KEY={DEFAULT_API_KEY}" if not api_key else "  # and your --api-key"
    err.print(
        f"Versori emulator on {url}\n  export VERSORI_BASE_URL={url}{key}",
        highlight=False,
        soft_wrap=True,
    )
    run_emulator(config, host=host, port=port)


# The emulator's settings as the operator typed them (rate_limit_window before rate_limit).
_EMULATOR_OPTIONS = {
    "latency_ms": "--latency-ms",
    "error_rate": "--error-rate",
    "rate_limit_window": "--rate-limit-window",
    "rate_limit": "--rate-limit",
    "stall_seconds": "--stall-seconds",
    "script": "--script",
    "api_keys": "--api-key",
}


def _emulator_config(key: str, script: Path | None, **options: Any) -> EmulatorConfig:
    from demo.emulator import EmulatorConfig, load_script

    try:
        scripted = load_script(script) if script is not None else {}
    except ValueError as error:
        raise InputError(f"--script: {error}") from None
    try:
        return EmulatorConfig(api_keys=frozenset({key}), script=scripted, **options)
    except ValueError as error:
        message = str(error)
        # The config names its field; the operator typed an option: name that too.
        option = next((o for f, o in _EMULATOR_OPTIONS.items() if message.startswith(f)), None)
        if option == "--script" and script is not None:
            option = f"--script {script}"
        raise InputError(f"{option}: {message}" if option else message) from None


def smtp_sink(
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8025,
    output: Annotated[
        Path, typer.Option(help="Folder for the messages, one .eml file each (0600).")
    ] = Path("smtp-sink"),
) -> None:
    """Take every email sent to this local SMTP server and write it to an .eml file, until
    Ctrl-C: `onboard run --deliver email` and `onboard remind` without a mail relay."""
    from demo.smtp import LocalSmtpServer

    if not is_loopback(host):  # the product sends without TLS only to a loopback host
        raise InputError(f"--host {host}: not a loopback address; use 127.0.0.1 or localhost")
    try:
        sink = LocalSmtpServer(output, host=host, port=port).start()
    except OSError as error:
        raise InputError(f"--port {port}: cannot listen there ({error}); pick another") from None
    err.print(
        f"SMTP sink on {host}:{port}, writing each message to {output}/ until Ctrl-C\n"
        f"  export ONBOARD_SMTP_HOST={host} ONBOARD_SMTP_PORT={port} ONBOARD_SMTP_SECURITY=none "
        "ONBOARD_EMAIL_FROM=onboarding@example.com",
        highlight=False,
        soft_wrap=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    err.print(f"Stopped: {sink.messages} message(s) written to {output}/.", highlight=False)
