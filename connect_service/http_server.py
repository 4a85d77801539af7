"""Running the service on uvicorn: checked settings first (the ledger, the base URL, plain
http only where it cannot cross a network), then one or more worker processes."""

from __future__ import annotations

import contextlib
import logging
import logging.config
import signal
from types import FrameType
from typing import TYPE_CHECKING

from connect_service.logs import LogFormat, LogLevel, log_config
from onboarding.errors import InputError
from onboarding.net import is_loopback

if TYPE_CHECKING:
    from onboarding.settings import Settings

log = logging.getLogger(__name__)

APP_FACTORY = "connect_service.app:app_from_env"
# How long SIGTERM waits for requests in flight (--grace-seconds).
GRACE_SECONDS = 25
# How long a connection may take to send a request's headers (--header-timeout).
HEADER_TIMEOUT_SECONDS = 10.0
# A request line and headers larger than this are refused (431): a browser's are ~1-2 KiB.
MAX_HEADER_BYTES = 16 * 1024


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


def check_settings(settings: Settings) -> None:
    """Every setting the workers read, checked once in the parent so that bad input exits 2
    before any worker starts (a worker would only log it and die)."""
    from onboarding.ledger import Ledger

    _ = settings.connect  # and the brand with it
    versori = settings.versori
    if versori.api_key is None or not versori.api_key.get_secret_value().strip():
        which = "is not set" if versori.api_key is None else "is empty"
        raise InputError(
            f"VERSORI_API_KEY {which}: the service calls Versori for each link's button and "
            "each callback; set it as for onboard run"
        )
    Ledger(settings.ledger.db_url).close()


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8800,
    workers: int = 1,
    forwarded_allow_ips: str | None = None,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    grace_seconds: int = GRACE_SECONDS,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
) -> None:
    """Serve until stopped. `settings`: the command's, checked here before any worker starts;
    each worker reads its own when it starts (`app_from_env`)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # First: the checks' own lines (a ledger's migration, say) come out formatted too.
    logging_config = log_config(log_level, log_format)
    logging.config.dictConfig(logging_config)
    check_serving(host, forwarded_allow_ips)
    check_settings(settings)
    from connect_service.listener import HeaderTimeoutH11Protocol, TcpConfig

    config = TcpConfig(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # Only a named proxy's X-Forwarded-Proto/For are believed.
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=forwarded_allow_ips or "127.0.0.1",
        # Applied by uvicorn in each worker process too (they are spawned: nothing set here
        # reaches them otherwise).
        log_config=logging_config,
        log_level=log_level,
        # uvicorn's access line would print each request's path and query: tokens, states and
        # codes. The app's own (logs.RequestLog) masks them.
        access_log=False,
        server_header=False,
        # SIGTERM: stop accepting, then wait this long for requests in flight (a callback may
        # take ~20 s: CreateConnection's 10 s and a lookup's 8 s) before cancelling them.
        timeout_graceful_shutdown=grace_seconds,
        # h11, not httptools (which uvicorn picks when it is installed), with the header size
        # limit and the header timeout of listener.py, which httptools would not apply.
        http=HeaderTimeoutH11Protocol,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        header_timeout=header_timeout,
    )
    # What uvicorn.run does, with TcpConfig's listener.
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found:
    # this one makes that a clean exit 0 rather than death by signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own exit code when it could not start


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
