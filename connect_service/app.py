"""The ASGI app of `onboard connect-server`: routes, each answered from `ConnectService` on a
worker thread (the ledger and the Versori client are synchronous), with the security headers
on every answer and a plain page, never a stack trace, for anything that goes wrong."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from connect_service import pages
from connect_service.logs import log_requests
from connect_service.pages import Page, security_headers
from connect_service.service import (
    BIND_COOKIE,
    RETRY_COOKIE,
    CallbackAnswer,
    ConnectService,
    versori_clients,
)

log = logging.getLogger(__name__)

# A form post is a few hundred bytes; anything much larger is not ours.
MAX_FORM_BYTES = 4096
# A pooled ledger connection is tested (a round trip) before use only once it waited this
# long; one lost while in steady use is retried on a new connection by the ledger's
# `reconnecting` (onboarding/ledger/engine.py). A ping before every use cost each request
# a round trip: about 0.2 ms of CPU and 4 round trips a click.
LEDGER_PING_IDLE_SECONDS = 10.0


def respond(page: Page) -> Response:
    headers = security_headers(page.form_targets, beacon=page.beacon, brand=page.brand)
    if page.location:
        headers["Location"] = page.location
        response: Response = Response(status_code=page.status, headers=headers)
    elif page.status == 204:
        response = Response(status_code=204, headers=headers)
    else:
        response = HTMLResponse(page.html(), status_code=page.status, headers=headers)
    for cookie in page.cookies:
        response.headers.append("Set-Cookie", cookie)
    return response


def create_app(
    service: ConnectService, own_origin: str | None = None, sweep_seconds: float | None = None
) -> Starlette:
    """`own_origin`: the service's public origin (ONBOARD_CONNECT_BASE_URL's), which a form
    post's Origin may name besides the request's own Host. `sweep_seconds`: resolve claims
    left unfinished (`ConnectService.sweep`) on start, then this often. The app's own answers
    (a 404, a form it cannot read, an error) show the service's brand."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()
        if sweep_seconds:
            threading.Thread(
                target=_sweep_loop,
                args=(service, sweep_seconds, stop),
                name="connect-sweep",
                daemon=True,
            ).start()
        try:
            yield
        finally:
            stop.set()

    async def run(work: Callable[[], Page]) -> Response:
        try:
            page = await run_in_threadpool(work)
        except Exception as err:  # a page, never a traceback; the type only (no secrets)
            log.error("request failed: %s", type(err).__name__)
            page = pages.internal_error(service.brand)
        return respond(page)

    async def link(request: Request) -> Response:
        token = request.path_params["token"]
        if request.method in ("GET", "HEAD"):
            return await run(lambda: service.show_link(token))
        form = await _small_form(request)
        if form is None:
            return respond(pages.forbidden_form(service.brand))
        csrf = form.get("csrf", "")
        cross = _cross_site(request, own_origin)
        browser = request.cookies.get(BIND_COOKIE)
        https = request.url.scheme == "https"
        return await run(
            lambda: service.press_button(
                token, csrf, cross_site=cross, browser=browser, https=https
            )
        )

    async def seen(request: Request) -> Response:
        token = request.path_params["token"]
        form = await _small_form(request)
        if form is None:
            return respond(replace(pages.no_content(), brand=service.brand))
        csrf = form.get("csrf", "")
        cross = _cross_site(request, own_origin)
        return await run(lambda: service.note_seen(token, csrf, cross_site=cross))

    async def callback(request: Request) -> Response:
        query = request.query_params
        answer = CallbackAnswer(
            state=query.get("state", ""), code=query.get("code", ""), error=query.get("error", "")
        )
        cookie = request.cookies.get(RETRY_COOKIE)
        browser = request.cookies.get(BIND_COOKIE)
        return await run(lambda: service.callback(answer, cookie, browser))

    async def retry(request: Request) -> Response:
        cookie = request.cookies.get(RETRY_COOKIE)
        return await run(lambda: service.retry(cookie))

    async def healthz(request: Request) -> Response:
        ok = await run_in_threadpool(_ledger_answers, service)
        headers = security_headers(brand=service.brand)
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503, headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        brand = service.brand
        page = pages.not_found(brand) if status in (404, 405) else pages.internal_error(brand)
        return respond(Page(status, page.title, page.paragraphs, kind=page.kind, brand=brand))

    app = Starlette(
        routes=[
            Route("/c/{token}", link, methods=["GET", "HEAD", "POST"]),
            Route("/c/{token}/seen", seen, methods=["POST"]),
            Route("/callback", callback, methods=["GET"]),
            Route("/retry", retry, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )
    # No redirect built from the Host header (`/c/<token>/` would get a 307 to it): a path
    # that is not ours is a 404 page.
    app.router.redirect_slashes = False
    app.state.service = service
    # The request id and the access line around everything; a page, not uvicorn's plain 500,
    # for a request cut off at shutdown (logs.py).
    return log_requests(app, fallback=lambda: respond(pages.internal_error(service.brand)))


async def _small_form(request: Request) -> dict[str, str] | None:
    """A url-encoded form of at most MAX_FORM_BYTES (the button's), first value of each
    field; None for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def _cross_site(request: Request, own_origin: str | None) -> bool:
    """A form post that a browser says came from another site. Sec-Fetch-Site is sent by every
    current browser; Origin is `null` under Referrer-Policy no-referrer, so only another
    site's origin counts against the post."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    return origin not in (f"{request.url.scheme}://{request.url.netloc}", own_origin)


def _sweep_loop(service: ConnectService, every: float, stop: threading.Event) -> None:
    """The sweep on start, then every `every` seconds until the app stops."""
    while True:
        try:
            service.sweep()
        except Exception as err:  # the ledger or Versori down: the next round tries again
            log.warning("sweep failed: %s", type(err).__name__)
        if stop.wait(every):
            return


def _ledger_answers(service: ConnectService) -> bool:
    from sqlalchemy import text

    try:
        with service.ledger.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


def app_from_env() -> Starlette:
    """The app as `onboard connect-server` runs it in each uvicorn worker (its entry point: the
    settings read once, here): the ledger at ONBOARD_DB_URL, Versori from VERSORI_*, the brand
    from ONBOARD_BRAND_*, events to PREFECT_API_URL when set."""
    from onboarding.inputs.brand import brand_from_settings
    from onboarding.ledger import Database, Ledger
    from onboarding.settings import load_settings

    settings = load_settings()
    connect = settings.connect
    service = ConnectService(
        Ledger(Database(settings.ledger.db_url, ping_idle=LEDGER_PING_IDLE_SECONDS)),
        client_for=versori_clients(settings.versori),
        brand=brand_from_settings(settings.brand, settings.sender),
        mints_per_hour=connect.mints_per_hour,
        secure_cookies=bool(connect.base_url and connect.base_url.startswith("https:")),
        create_deadline=connect.create_timeout_seconds,
        lookup_deadline=connect.lookup_timeout_seconds,
        connecting_grace=timedelta(seconds=connect.connecting_grace_seconds),
    )
    own = pages.origin_of(connect.base_url) if connect.base_url else None
    return create_app(service, own_origin=own, sweep_seconds=connect.sweep_seconds)
