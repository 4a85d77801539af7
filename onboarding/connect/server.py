"""Running the service on uvicorn: checked settings first (the ledger, the base URL, plain
http only where it cannot cross a network), then one or more worker processes."""

from __future__ import annotations

import contextlib
import logging

from onboarding.errors import InputError
from onboarding.net import is_loopback

log = logging.getLogger(__name__)

APP_FACTORY = "onboarding.connect.app:app_from_env"


def check_serving(host: str, forwarded_allow_ips: str | None) -> None:
    """Refuse plain http on an address other machines reach, unless a TLS proxy in front is
    named (--forwarded-allow-ips): links, states and codes would cross the network in clear."""
    if not is_loopback(host) and not forwarded_allow_ips:
        raise InputError(
            f"--host {host} is not a loopback address, and the service speaks plain http: "
            "links, states and codes would cross the network in clear. Run it behind a TLS "
            "proxy and name the proxy's address with --forwarded-allow-ips (e.g. "
            "--forwarded-allow-ips 10.0.0.5), or bind 127.0.0.1 with the proxy on this machine"
        )


def check_settings() -> None:
    """Every setting the workers read, checked once in the parent so that bad input exits 2
    before any worker starts (a worker would only log it and die)."""
    from onboarding.connect.settings import ConnectSettings
    from onboarding.ledger import Ledger
    from onboarding.settings import LedgerSettings, VersoriSettings

    ConnectSettings()
    versori = VersoriSettings()
    if versori.api_key is None:
        raise InputError(
            "VERSORI_API_KEY is not set: the service calls Versori for each link's button and "
            "each callback; set it as for onboard run"
        )
    Ledger(LedgerSettings().db_url).close()


def serve(
    host: str = "127.0.0.1",
    port: int = 8800,
    workers: int = 1,
    forwarded_allow_ips: str | None = None,
) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    check_serving(host, forwarded_allow_ips)
    check_settings()
    from onboarding.connect.listener import TcpConfig

    config = TcpConfig(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # Only a named proxy's X-Forwarded-Proto/For are believed.
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=forwarded_allow_ips or "127.0.0.1",
        # The access log would print each request's path and query: tokens, states and codes.
        access_log=False,
        log_level="info",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    # What uvicorn.run does, with TcpConfig's listener.
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own exit code when it could not start
