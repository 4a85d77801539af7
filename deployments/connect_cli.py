"""`onboard connect-server` and `onboard revoke`: the durable connect links' service and their
revocation, registered on the main `onboard` app by deployments/cli.py."""

from __future__ import annotations

from contextlib import closing
from typing import Annotated

import typer
from rich.console import Console

from onboarding.errors import InputError

out = Console()


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
) -> None:
    """Serve the connect links (GET/POST /c/<token>), the OAuth callback (GET /callback) and
    GET /healthz, on the ledger at ONBOARD_DB_URL and Versori from VERSORI_*, as onboard run
    reads them. Stateless: run several, behind one TLS proxy, on a PostgreSQL ledger."""
    from onboarding.connect.server import serve

    serve(host=host, port=port, workers=workers, forwarded_allow_ips=forwarded_allow_ips)


def revoke(
    tenant: Annotated[str, typer.Option(help="The tenant_id whose links to revoke.")],
    connector: Annotated[
        str | None, typer.Option(help="Only this connector (or system) id's links.")
    ] = None,
) -> None:
    """Revoke every live connect link of a tenant (for one connector, or all): each then
    answers "this link is not valid". Exit 1 when there was none to revoke."""
    from onboarding.ledger import Ledger
    from onboarding.settings import LedgerSettings

    if not tenant.strip():
        raise InputError("--tenant is empty: give the tenant_id whose links to revoke")
    with closing(Ledger(LedgerSettings().db_url)) as ledger:
        n = ledger.revoke_connect_links(tenant, connector)
    which = f" for connector {connector}" if connector else ""
    if not n:
        out.print(f"Tenant {tenant} has no live connect link{which}.", highlight=False)
        raise typer.Exit(1)
    out.print(f"Revoked {n} connect link(s) of tenant {tenant}{which}.", highlight=False)
