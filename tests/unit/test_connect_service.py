"""The connect service's app (Starlette's TestClient) against the real emulator (a uvicorn
thread) and a real ledger (SQLite and PostgreSQL): the link page, its button, the consent
page's answer and the callback, and every refusal the service makes."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient will move to another httpx package: not ours.
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

from connect_service.app import create_app
from connect_service.event_sender import EventSender
from connect_service.service import ConnectService
from demo.connect_click import write_connect_profile
from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from onboarding.clock import utcnow
from onboarding.connections.durable_links import issue_connect_link
from onboarding.inputs.brand import Brand
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.ledger import Ledger, Status
from onboarding.versori.client import VersoriClient

pytestmark = pytest.mark.timeout(120)

CALLBACK = "http://127.0.0.1:8800/callback"
# Matched in authorizeUrl?additionalParams, where the login_hint's @ is URL-encoded.
SCRIPT = {"flaky%40": ["503"], "down%40": ["503*"], "badlink%40": ["bad_url"]}
HEADERS = ("Referrer-Policy", "Cache-Control", "Content-Security-Policy", "X-Frame-Options")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(script=SCRIPT)) as server:
        yield server


@dataclass
class Stage:
    ledger: Ledger
    profile: ConnectorProfile
    path: Path
    app: TestClient
    service: ConnectService
    emulator: EmulatorServer
    events: list[dict[str, Any]] = field(default_factory=list)

    def tenant(self, tenant_id: str, email: str | None = None, **link: Any) -> str:
        """A tenant delivered by a batch (a raw link), and a connect link's token for it."""
        self.ledger.record_link(
            tenant_id=tenant_id,
            connector_id=self.profile.target_id,
            profile=self.profile.name,
            tenant_name=f"Tenant {tenant_id}",
            admin_email=email or f"{tenant_id}@example.com",
            url="https://batch.example/authorize?state=batch-" + tenant_id,
            state="batch-" + tenant_id,
            created_at=utcnow(),
            expires_at=utcnow() + timedelta(hours=72),
            tenant_fields={},
        )
        self.ledger.mark_delivered(tenant_id, self.profile.target_id, channel="email")
        return self.token(tenant_id, **link)

    def token(self, tenant_id: str, days: float | None = None) -> str:
        if days is None:
            return issue_connect_link(self.ledger, tenant_id, self.profile, self.path)
        return self.ledger.issue_connect_link(
            tenant_id, self.profile.target_id, str(self.path), utcnow() + timedelta(days=days)
        )

    def press(self, token: str, **headers: str) -> httpx.Response:
        page = self.app.get(f"/c/{token}")
        found = _CSRF.search(page.text)
        assert found, page.text
        answer: httpx.Response = self.app.post(
            f"/c/{token}", data={"csrf": found.group(1)}, headers=headers
        )
        return answer

    def consent(self, authorize_url: str, allow: bool = True) -> httpx.URL:
        """The emulated provider's page, answered: where it sends the browser back."""
        url = httpx.URL(authorize_url)
        assert httpx.get(url).status_code == 200
        answer = httpx.post(
            url.copy_with(query=None),
            data={
                "state": url.params["state"],
                "client_id": url.params["client_id"],
                "decision": "allow" if allow else "deny",
            },
        )
        assert answer.status_code == 303
        return httpx.URL(answer.headers["location"])

    def callback(self, back: httpx.URL) -> httpx.Response:
        answer: httpx.Response = self.app.get(f"/callback?{back.query.decode()}")
        return answer

    def record(self, tenant_id: str) -> Any:
        record = self.ledger.get(tenant_id, self.profile.target_id)
        assert record is not None
        return record


def _stage(
    ledger: Ledger, emulator: EmulatorServer, tmp_path: Path, *, mints: int = 10, **profile: Any
) -> Stage:
    httpx.post(f"{emulator.base_url}/_emulator/reset").raise_for_status()  # scripts start over
    path = write_connect_profile(tmp_path / "connect.yaml", emulator.base_url, CALLBACK, **profile)
    events: list[dict[str, Any]] = []

    def prefect(request: httpx.Request) -> httpx.Response:
        events.extend(json.loads(request.content))
        return httpx.Response(200)

    sender = EventSender("http://prefect.test/api", transport=httpx.MockTransport(prefect))

    def client_for(api: str) -> VersoriClient:
        return VersoriClient(api=api, api_key=DEFAULT_API_KEY, base_url=emulator.base_url)  # type: ignore[arg-type]

    service = ConnectService(
        ledger,
        client_for=client_for,
        events=sender,
        mints_per_hour=mints,
        sleep=lambda s: None,
        secure_cookies=False,  # the TestClient speaks http
    )
    app = TestClient(create_app(service), follow_redirects=False)
    stage = Stage(ledger, load_profile(path), path, app, service, emulator, events)
    return stage


@pytest.fixture
def stage(ledger: Ledger, emulator: EmulatorServer, tmp_path: Path) -> Stage:
    return _stage(ledger, emulator, tmp_path)


def _events(stage: Stage) -> list[tuple[str, str]]:
    stage.service.events.flush()
    return [(e["event"], e["resource"]["prefect.resource.name"]) for e in stage.events]


# --- the path a person takes -------------------------------------------------------------------


def test_a_profiles_brand_wins_for_its_connector(stage: Stage) -> None:
    """The service's brand (ONBOARD_BRAND_*) where no connector is known; the profile's own
    `brand:` and access_summary on its connector's pages, its logo's origin the CSP's only
    img-src."""
    stage.service.brand = Brand(
        name="Acme Analytics",
        logo_url="https://cdn.acme.example/logo.png",
        support="help@acme.example",
    )
    with stage.path.open("a", encoding="utf-8") as profile:
        profile.write(
            "access_summary: Read your CRM contacts\n"
            "brand:\n  name: Acme for CRM\n  logo_url: https://crm-cdn.acme.example/l.png\n"
        )
    token = stage.tenant("t1")
    page = stage.app.get(f"/c/{token}")
    assert "<h1>Acme for CRM would like to connect to your Acme Crm</h1>" in page.text
    assert '<img src="https://crm-cdn.acme.example/l.png" alt="Acme for CRM"' in page.text
    assert "<li>Read your CRM contacts</li>" in page.text and "help@acme.example" in page.text
    images = re.findall(r"img-src [^;]*;", page.headers["Content-Security-Policy"])
    assert images == ["img-src https://crm-cdn.acme.example;"]
    unknown = stage.app.get("/c/" + "x" * 43)
    assert unknown.status_code == 404 and "ask Acme Analytics for a new one" in unknown.text
    images = re.findall(r"img-src [^;]*;", unknown.headers["Content-Security-Policy"])
    assert images == ["img-src https://cdn.acme.example;"]
    csrf = _CSRF.search(page.text)
    assert csrf is not None and page.text.count(csrf.group(1)) == 1  # the form's, only
    for body in (page.text, unknown.text):
        assert token not in body and "batch-t1" not in body


def test_link_button_consent_callback_connects_the_tenant(stage: Stage) -> None:
    token = stage.tenant("t1")
    page = stage.app.get(f"/c/{token}")
    assert page.status_code == 200
    # Who asks (no ONBOARD_BRAND_NAME here: a default, see onboarding/inputs/brand.py), the
    # connector by its display name (never its slug), the tenant.
    assert "would like to connect to your Acme Crm</h1>" in page.text
    assert "This connection is for Tenant t1." in page.text and "acme-crm" not in page.text
    for name in HEADERS:
        assert name in page.headers
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert stage.record("t1").status is Status.DELIVERED, "a GET is no person"
    link = stage.ledger.find_connect_link(token)
    assert link is not None and link.fetched_count == 1 and link.opened_count == 0
    assert link.mint_count == 0

    pressed = stage.press(token)
    assert pressed.status_code == 303
    authorize = pressed.headers["location"]
    assert authorize.startswith(f"{stage.emulator.base_url}/provider/authorize?")
    record = stage.record("t1")
    assert record.state == httpx.URL(authorize).params["state"]
    assert record.delivered_at is not None, "what the tenant was sent stays"
    old = stage.ledger.find_superseded("batch-t1")
    assert old is not None and old.tenant_id == "t1", "the batch's state went to the history"

    done = stage.callback(stage.consent(authorize))
    assert done.status_code == 200, done.text
    assert "Tenant t1 is connected to Acme Crm" in done.text
    record = stage.record("t1")
    made = httpx.get(f"{stage.emulator.base_url}/_emulator/connections").json()["connections"]
    assert record.status is Status.CONNECTED and record.connection_id == made[-1]["id"]
    assert made[-1]["external_id"] == "t1" and made[-1]["name"] == "Tenant t1 (t1)"
    assert _events(stage) == [
        ("onboarding.tenant.opened", "t1"),
        ("onboarding.tenant.connected", "t1"),
    ]
    for body in (page.text, done.text, json.dumps(stage.events)):
        assert token not in body and record.state not in body
    again = stage.app.get(f"/c/{token}")
    assert again.status_code == 200 and "already connected" in again.text


def test_success_url_is_the_profiles_never_the_requests(
    ledger: Ledger, emulator: EmulatorServer, tmp_path: Path
) -> None:
    stage = _stage(ledger, emulator, tmp_path, success_url="https://app.example.com/done")
    token = stage.tenant("t1")
    back = stage.consent(stage.press(token).headers["location"])
    done = stage.app.get(f"/callback?{back.query.decode()}&next=https://evil.example/")
    assert done.status_code == 303
    assert done.headers["location"] == "https://app.example.com/done"


def test_a_get_mints_nothing_and_counts_a_fetch_not_an_open(stage: Stage) -> None:
    """A mail scanner's GET: counted as fetched, never opened (no status, no event, no
    reminder wording); the page's own beacon is what says a person opened it."""
    token = stage.tenant("t1")
    before = httpx.get(f"{stage.emulator.base_url}/_emulator/stats").json()["requests"]
    for _ in range(3):
        assert stage.app.get(f"/c/{token}").status_code == 200
    after = httpx.get(f"{stage.emulator.base_url}/_emulator/stats").json()["requests"]
    assert after == before, "a scanner's GET never calls Versori"
    link = stage.ledger.find_connect_link(token)
    assert link is not None and link.fetched_count == 3 and link.opened_count == 0
    assert link.fetched_first_at is not None and link.fetched_last_at is not None
    assert stage.record("t1").status is Status.DELIVERED
    assert _events(stage) == []
    assert stage.ledger.connect_opens(stage.profile.target_id) == {}
    assert stage.ledger.funnel()[stage.profile.target_id].fetched == 1

    page = stage.app.get(f"/c/{token}")
    assert (
        "<script>" in page.text and "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    )
    csrf = _CSRF.search(page.text)
    assert csrf
    # What the page's script sends, once shown: a person.
    assert stage.app.post(f"/c/{token}/seen", data={"csrf": "wrong"}).status_code == 204
    assert stage.record("t1").status is Status.DELIVERED, "a wrong CSRF value counts nothing"
    seen = stage.app.post(
        f"/c/{token}/seen", data={"csrf": csrf.group(1)}, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert seen.status_code == 204
    assert stage.record("t1").status is Status.OPENED
    assert _events(stage) == [("onboarding.tenant.opened", "t1")]
    assert stage.ledger.connect_opens(stage.profile.target_id)["t1"].count == 1
    funnel = stage.ledger.funnel()[stage.profile.target_id]
    assert (funnel.opened, funnel.fetched) == (1, 0)


def test_head_is_answered_as_get_and_a_trailing_slash_is_no_redirect(stage: Stage) -> None:
    token = stage.tenant("t1")
    head = stage.app.head(f"/c/{token}")
    assert head.status_code == 200 and "Content-Security-Policy" in head.headers
    slash = stage.app.get(f"/c/{token}/", headers={"Host": "evil.example"})
    assert slash.status_code == 404 and "location" not in slash.headers
    assert "Referrer-Policy" in slash.headers and "Page not found" in slash.text


def test_a_transient_versori_error_is_retried_inside_the_request(stage: Stage) -> None:
    token = stage.tenant("t1", email="flaky@example.com")
    assert stage.press(token).status_code == 303
    stats = httpx.get(f"{stage.emulator.base_url}/_emulator/stats").json()
    assert stats["by_status"] == {"503": 1, "200": 1}


# --- refusals ----------------------------------------------------------------------------------


def test_unknown_and_revoked_tokens_get_the_same_404(stage: Stage) -> None:
    token = stage.tenant("t1")
    assert stage.ledger.revoke_connect_links("t1", stage.profile.target_id) == 1
    same = {"X-Request-ID": "same-id-1234"}  # each page names its request: the same one here
    revoked = stage.app.get(f"/c/{token}", headers=same)
    unknown = stage.app.get(f"/c/{'x' * 43}", headers=same)
    malformed = stage.app.get("/c/not*a*token", headers=same)
    assert revoked.status_code == unknown.status_code == malformed.status_code == 404
    assert revoked.text == unknown.text == malformed.text
    assert "This link is not valid" in revoked.text
    assert dict(revoked.headers) == dict(unknown.headers)
    posted = stage.app.post(f"/c/{token}", data={"csrf": "x"}, headers=same)
    assert posted.status_code == 404 and posted.text == unknown.text
    assert stage.record("t1").status is Status.DELIVERED, "a revoked link records nothing"


def test_an_expired_link_says_so(stage: Stage) -> None:
    token = stage.tenant("t1", days=-1)
    page = stage.app.get(f"/c/{token}")
    assert page.status_code == 410 and "This link has expired" in page.text
    assert stage.app.post(f"/c/{token}", data={"csrf": "x"}).status_code == 410


def test_a_post_without_the_links_csrf_or_from_another_site_is_refused(stage: Stage) -> None:
    token = stage.tenant("t1")
    other = stage.tenant("t2")
    csrf_of_other = _CSRF.search(stage.app.get(f"/c/{other}").text)
    assert csrf_of_other
    assert stage.app.post(f"/c/{token}", data={}).status_code == 403
    wrong = stage.app.post(f"/c/{token}", data={"csrf": csrf_of_other.group(1)})
    assert wrong.status_code == 403, "a CSRF token is tied to its link"
    assert stage.press(token, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert stage.press(token, Origin="https://evil.example").status_code == 403
    assert stage.record("t1").state == "batch-t1", "nothing was minted"
    assert stage.press(token, Origin="null", **{"Sec-Fetch-Site": "same-origin"}).status_code == 303


def test_the_mint_limit_answers_429(
    ledger: Ledger, emulator: EmulatorServer, tmp_path: Path
) -> None:
    stage = _stage(ledger, emulator, tmp_path, mints=2)
    token = stage.tenant("t1")
    assert [stage.press(token).status_code for _ in range(3)] == [303, 303, 429]
    page = stage.press(token)
    assert page.status_code == 429 and "Too many tries with this link" in page.text
    # Another link of the same tenant has its own count.
    assert stage.press(stage.token("t1")).status_code == 303


def test_the_mint_limit_holds_across_replicas_racing(stage: Stage) -> None:
    from concurrent.futures import ThreadPoolExecutor

    token = stage.tenant("t1")
    link = stage.ledger.find_connect_link(token)
    assert link is not None
    others = [Ledger(stage.ledger.url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(8) as pool:
            taken = list(
                pool.map(lambda i: others[i % 4].take_mint(link, 10, timedelta(hours=1)), range(40))
            )
    finally:
        for other in others:
            other.close()
    assert taken.count(True) == 10


def test_versori_down_shows_try_again_later_and_is_recorded(stage: Stage) -> None:
    token = stage.tenant("t1", email="down@example.com")
    page = stage.press(token)
    assert page.status_code == 503 and "try again later" in page.text
    record = stage.record("t1")
    assert record.error_code == "connect_unavailable" and record.state == "batch-t1"
    assert record.status is Status.OPENED
    assert DEFAULT_API_KEY not in page.text


def test_a_url_failing_the_checks_is_never_sent(stage: Stage) -> None:
    token = stage.tenant("t1", email="badlink@example.com")
    page = stage.press(token)
    assert page.status_code == 503 and "location" not in page.headers
    assert stage.record("t1").error_code == "connect_link_check_failed"


def test_a_connected_tenants_link_mints_nothing(stage: Stage) -> None:
    token = stage.tenant("t1")
    csrf = _CSRF.search(stage.app.get(f"/c/{token}").text)
    assert csrf
    stage.ledger.mark_connected("t1", stage.profile.target_id, connection_id="c1", at=utcnow())
    page = stage.app.post(f"/c/{token}", data={"csrf": csrf.group(1)})
    assert page.status_code == 200 and "already connected" in page.text


def test_a_denied_consent_is_declined_with_a_way_back(stage: Stage) -> None:
    token = stage.tenant("t1")
    back = stage.consent(stage.press(token).headers["location"], allow=False)
    page = stage.callback(back)
    assert page.status_code == 200 and "was not made" in page.text
    assert 'action="/retry"' in page.text and token not in page.text
    record = stage.record("t1")
    assert (record.status, record.error_code) == (Status.DECLINED, "access_denied")
    assert ("onboarding.tenant.declined", "t1") in _events(stage)
    declined = [e for e in stage.events if e["event"].endswith("declined")]
    assert declined[0]["payload"] == {"error_code": "access_denied"}
    retry = stage.app.get("/retry")
    assert retry.status_code == 303 and retry.headers["location"] == f"/c/{token}"
    # Pressing the button again works after a decline.
    assert stage.press(token).status_code == 303
    stage.app.cookies.clear()
    assert stage.app.get("/retry").status_code == 404


def test_callback_refusals_record_nothing(stage: Stage) -> None:
    token = stage.tenant("t1")
    first = stage.press(token).headers["location"]
    first_back = stage.consent(first)
    second = stage.press(token).headers["location"]
    superseded = stage.callback(first_back)
    assert superseded.status_code == 410 and "replaced by a newer one" in superseded.text
    assert stage.app.get("/callback?state=nope&code=x").status_code == 400
    assert stage.app.get("/callback").status_code == 400
    assert stage.app.get("/callback?state=nope").status_code == 400
    assert stage.record("t1").status is Status.OPENED
    done = stage.callback(stage.consent(second))
    assert done.status_code == 200
    # The same browser back with the same state (a reload): connected, Versori not called.
    replay = stage.callback(stage.consent(second))
    assert replay.status_code == 200 and "is connected" in replay.text
    record = stage.record("t1")
    connections = httpx.get(f"{stage.emulator.base_url}/_emulator/connections").json()
    assert [c["id"] for c in connections["connections"]].count(record.connection_id) == 1


def test_an_expired_state_is_refused(stage: Stage) -> None:
    token = stage.tenant("t1")
    back = stage.consent(stage.press(token).headers["location"])
    later = utcnow() + timedelta(hours=73)
    stage.service._clock = lambda: later
    page = stage.callback(back)
    assert page.status_code == 410 and "expired" in page.text
    assert stage.record("t1").status is Status.OPENED


def test_a_code_versori_refuses_shows_try_again_later(stage: Stage) -> None:
    token = stage.tenant("t1")
    back = stage.consent(stage.press(token).headers["location"])
    forged = back.copy_set_param("code", "forged")
    page = stage.callback(forged)
    assert page.status_code == 502 and "try again later" in page.text
    record = stage.record("t1")
    assert record.status is Status.OPENED and record.error_code == "create_invalid_grant"
    # The state is spent: a second try with the real code is refused, not sent to Versori.
    assert stage.callback(back).status_code == 409


def test_errors_are_pages_never_tracebacks(stage: Stage, caplog: pytest.LogCaptureFixture) -> None:
    token = stage.tenant("t1")
    stage.ledger.engine.dispose()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"boom {DEFAULT_API_KEY}")

    stage.ledger.view_link = broken  # type: ignore[method-assign,assignment]  # its one read
    with caplog.at_level(logging.INFO):
        page = stage.app.get(f"/c/{token}")
    assert page.status_code == 500 and "Traceback" not in page.text
    assert DEFAULT_API_KEY not in page.text and DEFAULT_API_KEY not in caplog.text
    assert "Referrer-Policy" in page.headers
    assert stage.app.get("/nothing-here").status_code == 404
    assert stage.app.put("/callback").status_code == 405


def test_healthz(stage: Stage) -> None:
    answer = stage.app.get("/healthz")
    assert answer.status_code == 200 and answer.json() == {"ok": True}


def test_the_funnel_counts_each_stage(stage: Stage) -> None:
    for tenant in ("t1", "t2", "t3", "t4"):
        stage.tenant(tenant)
    token = stage.token("t1")
    stage.callback(stage.consent(stage.press(token).headers["location"]))
    stage.app.get(f"/c/{stage.token('t2')}")  # fetched only
    stage.press(stage.token("t3"))  # started, not finished
    funnel = stage.ledger.funnel()[stage.profile.target_id]
    assert funnel.as_dict() == {
        "linked": 4,
        "delivered": 4,
        "opened": 2,
        "started": 2,
        "connected": 1,
        "declined": 0,
        "failed": 0,
        "fetched": 1,
        "activated": 0,
        "broken": 0,
        "disconnected": 0,
    }
    assert funnel.share("connected") == 0.25


def test_no_api_key_nor_secret_in_the_services_log(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    token = stage.tenant("t1", email="down@example.com")
    other = stage.tenant("t2")
    with caplog.at_level(logging.DEBUG):
        stage.press(token)
        location = stage.press(other).headers["location"]
        back = stage.consent(location)
        stage.callback(back)
    state, code = back.params["state"], back.params["code"]
    # The service's own log lines (the test's httpx client logs the URLs it requests).
    service_log = "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    )
    for secret in (DEFAULT_API_KEY, token, other, state, code):
        assert secret not in service_log
    assert "t2" in service_log, "the log names the tenant"


def test_replicas_racing_on_one_callback_or_one_tenant_stay_consistent(stage: Stage) -> None:
    """Two replicas at once: one claim of a callback's state wins; mints of new states for one
    tenant leave every state either current or in the history."""
    from concurrent.futures import ThreadPoolExecutor

    stage.tenant("t1")
    cid = stage.profile.target_id
    others = [Ledger(stage.ledger.url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(8) as pool:
            claims = list(
                pool.map(
                    lambda i: others[i % 4].claim_state(
                        "s-race", tenant_id="t1", connector_id=cid, by=f"replica-{i}"
                    ),
                    range(16),
                )
            )
            now = utcnow()
            list(
                pool.map(
                    lambda i: others[i % 4].record_minted_link(
                        tenant_id="t1",
                        connector_id=cid,
                        url=f"https://p.example/?state=m{i}",
                        state=f"m{i}",
                        created_at=now,
                        expires_at=now + timedelta(hours=1),
                    ),
                    range(16),
                )
            )
    finally:
        for other in others:
            other.close()
    assert claims.count(True) == 1
    current = stage.record("t1").state
    history = {s for s in (f"m{i}" for i in range(16)) if stage.ledger.find_superseded(s)}
    assert current is not None and current not in history
    assert history | {current} == {f"m{i}" for i in range(16)}, "no state is lost"


def test_a_connection_lost_under_each_statement_of_a_click_is_tried_again(stage: Stage) -> None:
    """The click's statements go to the driver's cursor (connect_links.DriverStatement), with
    SQLAlchemy's events and error handling: a connection killed under each of them (page,
    beacon, button, the new state, the callback's claim and its record) is a lost connection
    `reconnecting` tries again on a new one; the click ends connected, exactly once."""
    if stage.ledger.engine.dialect.name != "postgresql":
        pytest.skip("the driver's cursor is PostgreSQL's path")
    from sqlalchemy import event

    sent: list[str] = []
    killed: set[str] = set()

    def kill_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)
        if statement not in killed:
            killed.add(statement)
            cursor.connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    token = stage.tenant("t1")
    event.listen(stage.ledger.engine, "before_cursor_execute", kill_once)
    try:
        page = stage.app.get(f"/c/{token}")
        assert page.status_code == 200, page.text
        csrf = _CSRF.search(page.text)
        assert csrf is not None
        seen = stage.app.post(f"/c/{token}/seen", data={"csrf": csrf.group(1)})
        assert seen.status_code == 204
        pressed = stage.app.post(f"/c/{token}", data={"csrf": csrf.group(1)})
        assert pressed.status_code == 303, pressed.text
        done = stage.callback(stage.consent(pressed.headers["location"]))
    finally:
        event.remove(stage.ledger.engine, "before_cursor_execute", kill_once)
    assert done.status_code == 200 and "is connected" in done.text, done.text
    assert len(killed) == 6, "each of the click's six statements was cut off once"
    assert len(sent) == 12, "and sent again once, nothing more"
    record = stage.record("t1")
    assert record.status is Status.CONNECTED and record.connection_id
