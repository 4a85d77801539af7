"""A durable connect link as an admin uses it, in Chromium (Debian's, driven by Playwright):
from the email in the SMTP sink, through the link page's button, the emulated provider's
consent page and the callback, to the "connected" page; then the ledger and the event on the
session's Prefect server. Also the deny path, a revoked link and a replayed callback.

Real parts throughout: `onboard connect-server` and `onboard emulator` as processes, the demo's
SMTP server, a SQLite ledger file, the session's `prefect server`. One of each serves every
test of this module."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.connect_click import deliver_connect_link, write_connect_profile
from demo.emulator import DEFAULT_API_KEY
from demo.processes import base_env, child, free_port, wait_for_http
from demo.smtp import LocalSmtpServer
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Status
from onboarding.mail import MailSender, MailTemplates
from onboarding.settings.brand import BrandValues
from onboarding.versori.client import VersoriClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CHROMIUM = os.environ.get("ONBOARD_TEST_CHROMIUM") or shutil.which("chromium")
ONBOARD = str(Path(sys.executable).parent / "onboard")
# Set to a folder to keep the three pages' screenshots (docs/'s come from demo/screenshots.py).
SCREENSHOTS = os.environ.get("ONBOARD_CONNECT_SCREENSHOTS")
# Who asks, in the emails and on the service's pages (ONBOARD_BRAND_NAME).
BRAND = "Acme Analytics"


@dataclass
class Stack:
    base: str
    emulator: str
    ledger: Ledger
    env: dict[str, str]
    links: dict[str, str]
    mail: Path
    prefect_api: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[Stack]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("connect-browser")
    emulator_port, connect_port = free_port(), free_port()
    emulator = f"http://127.0.0.1:{emulator_port}"
    base = f"http://127.0.0.1:{connect_port}"
    profile_path = write_connect_profile(tmp / "acme.yaml", emulator, f"{base}/callback")
    env = base_env(tmp)
    ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
    env.update(
        VERSORI_BASE_URL=emulator,
        VERSORI_API_KEY=DEFAULT_API_KEY,
        ONBOARD_DB_URL=ledger_url,
        ONBOARD_CONNECT_BASE_URL=base,
        PREFECT_API_URL=prefect_api,
        ONBOARD_BRAND_NAME=BRAND,
    )
    emulator_cmd = [ONBOARD, "emulator", "--port", str(emulator_port)]
    server_cmd = [ONBOARD, "connect-server", "--port", str(connect_port)]
    ledger = Ledger(ledger_url)  # made before the server opens it
    with (
        child(emulator_cmd, env, tmp / "emulator.log") as emu,
        LocalSmtpServer(tmp / "mail") as smtp,
    ):
        wait_for_http(f"{emulator}/healthz", proc=emu)
        with child(server_cmd, env, tmp / "connect-server.log") as server:
            wait_for_http(f"{base}/healthz", proc=server, found=True)
            profile = load_profile(profile_path)
            mailer = MailSender(
                host=smtp.host, port=smtp.port, security="none", email_from="on@example.com"
            )
            client = VersoriClient(api="platform-v2", api_key=DEFAULT_API_KEY, base_url=emulator)
            for n in (1, 2, 3, 4):
                tenant = Tenant(
                    tenant_id=f"t{n}", name=f"Tenant {n}", admin_email=f"admin{n}@example.com"
                )
                deliver_connect_link(
                    ledger, profile, profile_path, tenant, client, base,
                    mailer=mailer, templates=MailTemplates(None, brand=BrandValues(name=BRAND)),
                )  # fmt: skip
            mailer.close()
            client.close()
            links = {_tenant_of(p): _link_in(p) for p in sorted((tmp / "mail").glob("*.eml"))}
            yield Stack(base, emulator, ledger, env, links, tmp / "mail", prefect_api)
            ledger.close()
            log = (tmp / "connect-server.log").read_text()
            assert "Traceback" not in log, log
            for link in links.values():
                assert link.rsplit("/", 1)[1] not in log, "a token reached the service's log"
            assert DEFAULT_API_KEY not in log


def _message(path: Path) -> Any:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def _tenant_of(path: Path) -> str:
    return str(_message(path)["X-Onboarding-Tenant"])


def _link_in(path: Path) -> str:
    text = _message(path).get_body(preferencelist=("plain",)).get_content()
    found = re.search(r"http://127\.0\.0\.1:\d+/c/[A-Za-z0-9_-]+", text)
    assert found, "the email carries the durable link"
    return found.group(0)


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"connect-{name}.png"))


def _events(stack: Stack, tenant: str, wanted: str) -> list[str]:
    """The tenant's events on the Prefect server, waiting (bounded) for `wanted`."""
    names: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = httpx.post(
            f"{stack.prefect_api}/events/filter",
            json={"filter": {"resource": {"id": [f"onboarding.tenant.{tenant}"]}}, "limit": 50},
            timeout=10,
        )
        answer.raise_for_status()
        names = sorted(e["event"] for e in answer.json()["events"])
        if wanted in names:
            return names
        time.sleep(0.5)
    return names


def test_from_the_email_to_connected(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    opened = page.goto(stack.links["t1"])
    assert opened is not None and opened.status == 200
    assert opened.headers["referrer-policy"] == "no-referrer"
    expect(page.locator("h1")).to_have_text(f"{BRAND} would like to connect to your Acme Crm")
    expect(page.locator("main")).to_contain_text("This connection is for Tenant 1.")
    _shot(page, "link")
    # The page's own script told the service a person has it open (a scanner's GET does not).
    _wait_for(lambda: _status(stack, "t1") is Status.OPENED)
    page.click("button")
    expect(page).to_have_url(re.compile(re.escape(stack.emulator) + "/provider/authorize"))
    _shot(page, "consent")
    page.click("#allow")
    expect(page).to_have_url(re.compile(re.escape(stack.base) + r"/callback\?"))
    expect(page.locator("h1")).to_have_text("Tenant 1 is connected to Acme Crm")
    _shot(page, "connected")
    callback = page.url

    record = stack.ledger.get("t1", load_profile_id(stack))
    assert record is not None and record.status is Status.CONNECTED
    made = httpx.get(f"{stack.emulator}/_emulator/connections").json()["connections"]
    assert [c["id"] for c in made if c["external_id"] == "t1"] == [record.connection_id]
    assert "onboarding.tenant.connected" in _events(stack, "t1", "onboarding.tenant.connected")
    assert "onboarding.tenant.opened" in _events(stack, "t1", "onboarding.tenant.opened")

    # The same callback again in this browser (a reload): connected, Versori not called again.
    replay = page.goto(callback)
    assert replay is not None and replay.status == 200
    expect(page.locator("h1")).to_have_text("Tenant 1 is connected to Acme Crm")
    again = stack.ledger.get("t1", load_profile_id(stack))
    assert again is not None and again.connection_id == record.connection_id
    assert len(httpx.get(f"{stack.emulator}/_emulator/connections").json()["connections"]) == 1
    # The link itself now says the tenant is connected.
    page.goto(stack.links["t1"])
    expect(page.locator("h1")).to_have_text("Tenant 1 is already connected to Acme Crm")
    page.close()


def test_deny_then_try_again(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(stack.links["t2"])
    page.click("button")
    page.click("#deny")
    expect(page.locator("h1")).to_have_text("The connection to Acme Crm was not made")
    _shot(page, "declined")
    record = stack.ledger.get("t2", load_profile_id(stack))
    assert record is not None
    assert (record.status, record.error_code) == (Status.DECLINED, "access_denied")
    assert "onboarding.tenant.declined" in _events(stack, "t2", "onboarding.tenant.declined")
    page.click("button")  # Try again: back to the link page, through /retry
    expect(page).to_have_url(stack.links["t2"])
    expect(page.locator("h1")).to_have_text(f"{BRAND} would like to connect to your Acme Crm")
    page.close()


def test_a_revoked_link(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    done = subprocess.run(
        [ONBOARD, "revoke", "--tenant", "t3"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Revoked 1 connect link(s) of tenant t3" in done.stdout
    page = browser.new_page()
    answer = page.goto(stack.links["t3"])
    assert answer is not None and answer.status == 404
    expect(page.locator("h1")).to_have_text("This link is not valid")
    expect(page.locator("main")).to_contain_text(f"ask {BRAND} for a new one")
    assert page.locator("button").count() == 0
    page.close()
    again = subprocess.run(
        [ONBOARD, "revoke", "--tenant", "t3"], env=stack.env, capture_output=True, timeout=60
    )
    assert again.returncode == 1


def test_a_provider_url_handed_to_another_browser_connects_nothing(
    stack: Stack, browser: Any
) -> None:
    """RFC 6749 10.12: the admin of tenant 4 presses its button, then hands the provider's
    URL to a victim, whose own account would end up connected to tenant 4. The victim's
    browser (another context: no cookie of the first) is sent back to a page that says to
    start from the email; nothing is recorded and Versori is not called."""
    from playwright.sync_api import expect

    attacker = browser.new_context()
    victim = browser.new_context()
    try:
        page = attacker.new_page()
        page.goto(stack.links["t4"])
        page.click("button")
        expect(page).to_have_url(re.compile(re.escape(stack.emulator) + "/provider/authorize"))
        handed = page.url
        page.close()
        tricked = victim.new_page()
        tricked.goto(handed)
        tricked.click("#allow")
        expect(tricked).to_have_url(re.compile(re.escape(stack.base) + r"/callback\?"))
        expect(tricked.locator("h1")).to_have_text("Please start again from your email")
        _shot(tricked, "wrong-browser")
        made = httpx.get(f"{stack.emulator}/_emulator/connections").json()["connections"]
        assert [c for c in made if c["external_id"] == "t4"] == []
        record = stack.ledger.get("t4", load_profile_id(stack))
        assert record is not None and record.status is not Status.CONNECTED
    finally:
        attacker.close()
        victim.close()


def _status(stack: Stack, tenant: str) -> Status | None:
    record = stack.ledger.get(tenant, load_profile_id(stack))
    return record.status if record is not None else None


def _wait_for(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def load_profile_id(stack: Stack) -> str:
    from demo.emulator_config import DEMO_CRM

    return DEMO_CRM.connector_id
