"""`onboard connect-server` and `onboard revoke`: the durable connect links' service and their
revocation, registered on the main `onboard` app by deployments/cli.py."""

from __future__ import annotations

from contextlib import closing
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console

from onboarding.errors import InputError

if TYPE_CHECKING:
    from onboarding.ledger import Ledger
    from onboarding.settings import Settings

out = Console()
err = Console(stderr=True)


def connect_server(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8800,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes.")] = 1,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            help="The TLS proxy in front (its addresses, comma-separated): its "
            "X-Forwarded-Proto/For are believed, and a non-loopback --host is allowed."
        ),
    ] = None,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        typer.Option(help="The least severe log lines written (stderr)."),
    ] = "info",
    log_format: Annotated[
        Literal["text", "json"],
        typer.Option(
            help="text: time, level, logger, [request id], message; json: one object a line "
            "(time, level, logger, message, request_id)."
        ),
    ] = "text",
    grace_seconds: Annotated[
        int,
        typer.Option(
            min=0,
            max=600,
            help="On SIGTERM, how long requests in flight may take to finish (a callback "
            "takes up to ~20 s) before they are cut off.",
        ),
    ] = 25,
    header_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            max=300,
            help="Seconds a connection may take to send a request's headers; slower "
            "ones are closed (slowloris).",
        ),
    ] = 10.0,
) -> None:
    """Serve the connect links (GET/POST /c/<token>), the OAuth callback (GET /callback) and
    GET /healthz, on the ledger at ONBOARD_DB_URL and Versori from VERSORI_*, as onboard run
    reads them. Stateless: run several, behind one TLS proxy, on a PostgreSQL ledger."""
    from connect_service.http_server import check_serving, serve
    from onboarding.settings import load_settings

    settings = load_settings()
    check_serving(host, forwarded_allow_ips)
    check_link_profiles(settings)
    serve(
        settings=settings,
        host=host,
        port=port,
        workers=workers,
        forwarded_allow_ips=forwarded_allow_ips,
        log_level=log_level,
        log_format=log_format,
        grace_seconds=grace_seconds,
        header_timeout=header_timeout,
    )


def check_link_profiles(settings: Settings) -> None:
    """Refuse to serve (InputError: exit 2, naming each profile file, line and key) while a
    live link (not revoked, not expired) in the ledger at ONBOARD_DB_URL names a profile whose
    links could never finish through this service (ConnectorProfile.finish_problems, with
    ONBOARD_CONNECT_BASE_URL's callback). A profile that cannot be read now is only warned of:
    the service answers its links "try again later" until it can."""
    from onboarding.clock import utcnow
    from onboarding.inputs.profile import FINISH_HINT, load_profile
    from onboarding.ledger import Ledger

    base_url = settings.connect.base_url
    with closing(Ledger(settings.ledger.db_url)) as ledger:
        live = live_profile_paths(ledger, utcnow())
    problems, using = [], []
    for path, n in live.items():
        try:
            profile = load_profile(path)
        except InputError as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            err.print(
                f"Warning: {n} live connect link(s) name the profile {path}, which cannot be "
                f'read now ({first}); they answer "try again later" until it can.',
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            continue
        found = profile.finish_problems(base_url, through_service=True)
        if found:
            problems += found
            using.append(f"{path}: {n} live link(s)")
    if problems:
        raise InputError(
            problems,
            hint=(
                "onboard connect-server serves every live link in the ledger, each with the "
                f"profile its run recorded ({'; '.join(using)}). Fix the profile (the service "
                "reads it again when it changes), or revoke its links (onboard revoke "
                "--tenant ...). " + FINISH_HINT
            ),
        )


def live_profile_paths(ledger: Ledger, now: datetime) -> dict[str, int]:
    """Each profile path the ledger's live connect links (not revoked, not expired at `now`)
    name, with how many name it: a read of onboarding_connect_links, nothing written."""
    from sqlalchemy import func, select

    from onboarding.ledger.connect_links import connect_links
    from onboarding.ledger.records import utc

    table = connect_links.c
    query = (
        select(table.profile_path, func.count())
        .where(table.revoked_at.is_(None), table.expires_at > utc(now))
        .group_by(table.profile_path)
        .order_by(table.profile_path)
    )
    with ledger.engine.connect() as conn:
        return {str(path): int(n) for path, n in conn.execute(query)}


def revoke(
    tenant: Annotated[str, typer.Option(help="The tenant_id whose links to revoke.")],
    connector: Annotated[
        str | None, typer.Option(help="Only this connector (or system) id's links.")
    ] = None,
) -> None:
    """Revoke every live connect link of a tenant (for one connector, or all): each then
    answers "this link is not valid". Exit 1 when there was none to revoke."""
    from onboarding.ledger import Ledger
    from onboarding.settings import load_settings

    if not tenant.strip():
        raise InputError("--tenant is empty: give the tenant_id whose links to revoke")
    with closing(Ledger(load_settings().ledger.db_url)) as ledger:
        n = ledger.revoke_connect_links(tenant, connector)
    which = f" for connector {connector}" if connector else ""
    if not n:
        out.print(f"Tenant {tenant} has no live connect link{which}.", highlight=False)
        raise typer.Exit(1)
    out.print(f"Revoked {n} connect link(s) of tenant {tenant}{which}.", highlight=False)
