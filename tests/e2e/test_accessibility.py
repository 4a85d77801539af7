"""Every connect page and every default email, checked by axe-core in Chromium (Debian's,
driven by Playwright, as tests/e2e/test_connect_browser.py does): WCAG 2.0/2.1 A and AA and
axe's best practices (one main landmark, one h1, all content in landmarks), no violation.

The pages are served with the headers the service sends (connect_service.app.respond), so
the real CSP applies: the logo, served by a second local server, must load under it, and an
image from any other origin must not. The emails must not scroll sideways on a 360 px phone.

One Chromium, and one pair of local servers, for the whole module."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connect_service import pages
from connect_service.app import respond
from demo.processes import free_port
from onboarding.inputs.brand import Brand
from onboarding.inputs.roster import Tenant
from onboarding.mail import MailLink, MailTemplates
from onboarding.settings.brand import BrandValues

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = os.environ.get("ONBOARD_TEST_CHROMIUM") or shutil.which("chromium")
# What axe checks: every WCAG 2.0 and 2.1 A and AA rule, and its best practices (landmarks,
# one h1, content in landmarks: what the old emails failed besides html-has-lang).
AXE_OPTIONS = {
    "runOnly": {
        "type": "tag",
        "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"],
    },
    "resultTypes": ["violations"],
}
LOGO_SIZE = (160, 40)
PHONE = {"width": 360, "height": 740}


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid PNG, made here (nothing is fetched)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


LOGO = _png(*LOGO_SIZE, (107, 33, 168))


def _brand(logo_origin: str) -> Brand:
    return Brand.of(_values(logo_origin))


def _values(logo_origin: str) -> BrandValues:
    return BrandValues(
        name="Acme Analytics",
        logo_url=f"{logo_origin}/logo.png",
        color="#6b21a8",
        support="help@acme.example",
        privacy_url="https://acme.example/privacy",
        terms_url="https://acme.example/terms",
        reason="so that your tickets sync to Acme Analytics",
    )


# Every page the service shows, by the `kind` its log calls it.
PAGES: dict[str, Callable[[Brand], pages.Page]] = {
    "link": lambda b: pages.link_page(
        "Globex Corp", "Zendesk", "csrf-value", "https://z.example", access=["read"], brand=b
    ),
    "invalid": pages.invalid_link,
    "expired": pages.expired_link,
    "withdrawn": pages.link_withdrawn,
    "wrong_browser": pages.wrong_browser,
    "connected": lambda b: pages.connected("Globex Corp", "Zendesk", b),
    "already_connected": lambda b: pages.already_connected("Globex Corp", "Zendesk", b),
    "declined": lambda b: pages.declined("Zendesk", True, b),
    "rate_limited": lambda b: pages.too_many_tries(12, b),
    "unavailable": pages.try_again_later,
    "csrf": pages.forbidden_form,
    "create_failed": lambda b: pages.connection_failed(True, b),
    "connecting": pages.connecting_now,
    "not_confirmed": pages.not_confirmed,
    "callback_missing": lambda b: pages.callback_refused("missing", b),
    "callback_unknown": lambda b: pages.callback_refused("unknown", b),
    "callback_superseded": lambda b: pages.callback_refused("superseded", b),
    "callback_expired": lambda b: pages.callback_refused("expired", b),
    "callback_used": lambda b: pages.callback_refused("used", b),
    "not_found": pages.not_found,
    "internal_error": pages.internal_error,
}


@dataclass
class Servers:
    pages: str  # the connect pages, with the service's headers
    logo: str  # the logo's origin
    other: str  # the same logo from another origin (localhost, not 127.0.0.1)


def _app(logo_origin: str) -> Starlette:
    async def page(request: Request) -> Response:
        kind = request.path_params["kind"]
        branded = request.query_params.get("brand") != "none"
        brand = _brand(logo_origin) if branded else Brand.of(BrandValues(), email_from="on@x.io")
        return respond(PAGES[kind](brand))

    async def logo(request: Request) -> Response:
        return Response(LOGO, media_type="image/png")

    async def plain(request: Request) -> Response:  # no CSP at all
        return Response(
            '<!doctype html><html lang="en"><title>plain</title>', media_type="text/html"
        )

    return Starlette(
        routes=[Route("/page/{kind}", page), Route("/logo.png", logo), Route("/plain", plain)]
    )


def _serve(app: Starlette, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name=f"a11y-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    page_port, logo_port = free_port(), free_port()
    logo = f"http://127.0.0.1:{logo_port}"
    running = [_serve(_app(logo), page_port), _serve(_app(logo), logo_port)]
    try:
        yield Servers(f"http://127.0.0.1:{page_port}", logo, f"http://localhost:{logo_port}")
    finally:
        for server, thread in running:
            server.should_exit = True
            thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def _violations(page: Any) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options=AXE_OPTIONS)
    return [
        f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]} {v['help']}"
        for v in results.response["violations"]
    ]


def _images_loaded(page: Any) -> None:
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=5000)


# --- the pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAGES))
def test_every_page_passes_axe(servers: Servers, page: Any, kind: str) -> None:
    answer = page.goto(f"{servers.pages}/page/{kind}")
    assert answer is not None and "img-src " in answer.headers["content-security-policy"]
    _images_loaded(page)
    assert page.evaluate("document.querySelector('header img').naturalWidth") == LOGO_SIZE[0]
    assert _violations(page) == []


@pytest.mark.parametrize("kind", ["link", "invalid", "declined"])
def test_a_page_without_a_brand_passes_axe(servers: Servers, page: Any, kind: str) -> None:
    answer = page.goto(f"{servers.pages}/page/{kind}?brand=none")
    assert answer is not None and "img-src" not in answer.headers["content-security-policy"]
    assert page.locator("header").inner_text() == "x.io"
    assert _violations(page) == []


def test_the_logo_loads_under_the_csp_and_no_other_origins_image_does(
    servers: Servers, page: Any
) -> None:
    answer = page.goto(f"{servers.pages}/page/link")
    assert answer is not None
    assert f"img-src {servers.logo};" in answer.headers["content-security-policy"]
    _images_loaded(page)
    assert page.evaluate("document.querySelector('header img').naturalWidth") == LOGO_SIZE[0]
    load = """src => new Promise(done => {
        const img = new Image();
        img.onload = () => done(img.naturalWidth);
        img.onerror = () => done(-1);
        img.src = src;
    })"""
    violations: list[str] = []
    page.on(
        "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
    )
    # The same image from another origin (localhost), and from the page's own: both refused.
    assert page.evaluate(load, f"{servers.other}/logo.png") == -1
    assert page.evaluate(load, f"{servers.pages}/logo.png") == -1
    assert len(violations) == 2, violations
    # The images themselves are fine: without the CSP they load.
    page.goto(f"{servers.pages}/plain")
    assert page.evaluate(load, f"{servers.pages}/logo.png") == LOGO_SIZE[0]
    assert page.evaluate(load, f"{servers.other}/logo.png") == LOGO_SIZE[0]


def test_the_link_page_fits_a_phone(servers: Servers, browser: Any) -> None:
    context = browser.new_context(viewport=PHONE)
    try:
        phone = context.new_page()
        phone.goto(f"{servers.pages}/page/link")
        _images_loaded(phone)
        assert phone.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    finally:
        context.close()


# --- the emails ------------------------------------------------------------------------------

NOW = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
TENANT = Tenant(tenant_id="t1", name="Globex Corp", admin_email="admin@globex.example")
# A link as long as Versori's (the "300-character URL"), unbreakable but for its
# characters.
LONG = "https://login.example.com/oauth2/authorize?state=" + "Zk3v9Q" * 45


def _links(count: int, reminder: int) -> list[MailLink]:
    names = [("zendesk", "Zendesk", ("read", "write")), ("slack", "Slack", ("Read channels",))]
    return [
        MailLink(
            name,
            f"c-{name}",
            f"{LONG}{i}",
            f"s{i}",
            NOW + timedelta(days=30),
            display_name=display,
            access=access,
            opened_at=NOW - timedelta(days=2) if reminder else None,
            declined=reminder == 2,
        )
        for i, (name, display, access) in enumerate(names[:count])
    ]


EMAILS = {
    "link": (1, 0),
    "reminder": (1, 1),
    "declined": (1, 2),
    "campaign": (2, 0),
    "campaign-reminder": (2, 1),
}


def _email(servers: Servers, which: str, branded: bool) -> str:
    count, reminder = EMAILS[which]
    templates = MailTemplates(brand=_values(servers.logo) if branded else BrandValues())
    rendered = templates.render(
        tenant=TENANT,
        links=_links(count, reminder),
        now=NOW,
        reminder=reminder,
        email_from="onboarding@acme.example",
    )
    return rendered.html


@pytest.mark.parametrize("branded", [True, False], ids=["brand", "no-brand"])
@pytest.mark.parametrize("which", sorted(EMAILS))
def test_every_email_passes_axe_and_fits_a_phone(
    servers: Servers, browser: Any, which: str, branded: bool
) -> None:
    context = browser.new_context(viewport=PHONE)
    try:
        mail = context.new_page()
        mail.set_content(_email(servers, which, branded), wait_until="load")
        _images_loaded(mail)
        if branded:
            assert mail.evaluate("document.images[0].naturalWidth") == LOGO_SIZE[0]
            assert mail.evaluate("document.images[0].getBoundingClientRect().width") <= 320
        assert mail.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        assert _violations(mail) == []
    finally:
        context.close()


def test_axe_finds_what_the_old_email_failed(page: Any) -> None:
    """The check is no formality: an email as the old template wrote it (no lang, no main
    landmark, no h1, a grey under 4.5:1) fails it, rule by rule."""
    page.set_content(
        "<!DOCTYPE html><html><head><title>Connect</title></head><body>"
        "<p>Hello,</p><p><strong>Acme Corp</strong> is ready to be connected to acme-crm.</p>"
        '<p style="color: #999999">Please do not forward it.</p></body></html>'
    )
    found = {v.split(" ", 1)[0] for v in _violations(page)}
    assert {
        "html-has-lang",
        "landmark-one-main",
        "page-has-heading-one",
        "region",
        "color-contrast",
    } <= found
