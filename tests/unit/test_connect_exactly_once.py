"""Every connection exactly once, in-process (Starlette's TestClient, the real emulator, a real
ledger on SQLite and PostgreSQL): the callback bound to its browser, revoke mid-flow, every
CreateConnection answer that may hide a connection settled by asking Versori, a claim left
unfinished resolved on the tenant's next request and by the sweep, and the ledger down after
Versori made the connection."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

from connect_service.app import create_app
from demo.emulator import EmulatorConfig, EmulatorServer
from onboarding.clock import utcnow
from onboarding.errors import LedgerUnavailableError
from onboarding.ledger import Ledger, Status
from onboarding.versori.client import VersoriClient
from tests.unit.test_connect_service import Stage, _stage

pytestmark = pytest.mark.timeout(120)

# CreateConnection faults by tenant (matched in the externalId or the connection's name).
CREATE_SCRIPT = {
    "slow": ["slow_after"],
    "drop": ["drop_after"],
    "late5xx": ["500_after"],
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(create_script=CREATE_SCRIPT, stall_seconds=2.0)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def stage(ledger: Ledger, emulator: EmulatorServer, tmp_path: Path) -> Stage:
    made = _stage(ledger, emulator, tmp_path)
    made.service.create_deadline = 1.0
    return made


def _connections(stage: Stage, tenant: str) -> list[dict[str, Any]]:
    made = httpx.get(f"{stage.emulator.base_url}/_emulator/connections").json()["connections"]
    return [c for c in made if c.get("external_id") == tenant]


def _to_provider(stage: Stage, tenant: str) -> httpx.URL:
    """A delivered tenant's link, its button pressed and consent given: the callback's URL."""
    token = stage.tenant(tenant)
    pressed = stage.press(token)
    assert pressed.status_code == 303, pressed.text
    return stage.consent(pressed.headers["location"])


# --- bound to the browser ----------------------------------------------------------------------


def test_a_callback_from_another_browser_is_refused_and_records_nothing(stage: Stage) -> None:
    """RFC 6749 10.12: the admin of one tenant hands a victim the provider URL minted from
    their link; the victim's browser comes back without the binding cookie."""
    back = _to_provider(stage, "t1")
    victim = TestClient(create_app(stage.service), follow_redirects=False)
    refused = victim.get(f"/callback?{back.query.decode()}")
    assert refused.status_code == 403 and "start again from your email" in refused.text
    assert _connections(stage, "t1") == [], "Versori was not called"
    record = stage.record("t1")
    assert record.status is not Status.CONNECTED and record.error_code is None
    assert stage.ledger.find_state(back.params["state"]).claimed_at is None  # type: ignore[union-attr]
    # A forged cookie is no better.
    victim.cookies.set("onboard_browser", "x" * 43)
    assert victim.get(f"/callback?{back.query.decode()}").status_code == 403
    # The browser that pressed the button still can.
    done = stage.callback(back)
    assert done.status_code == 200 and "is connected" in done.text
    assert [c["id"] for c in _connections(stage, "t1")] == [stage.record("t1").connection_id]


def test_one_browser_keeps_its_binding_across_tenants(stage: Stage) -> None:
    """An admin of two tenants presses both buttons in one browser: both callbacks work."""
    first = _to_provider(stage, "t1")
    second = _to_provider(stage, "t2")
    assert stage.callback(first).status_code == 200
    assert stage.callback(second).status_code == 200
    assert stage.record("t1").status is stage.record("t2").status is Status.CONNECTED


def test_cookies_are_secure_whenever_the_request_came_over_https(stage: Stage) -> None:
    token = stage.tenant("t1")
    plain = stage.press(token)
    assert all("Secure" not in c for c in plain.headers.get_list("set-cookie"))
    tls = TestClient(
        create_app(stage.service), base_url="https://connect.test", follow_redirects=False
    )
    page = tls.get(f"/c/{token}")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    pressed = tls.post(f"/c/{token}", data={"csrf": csrf})
    cookies = pressed.headers.get_list("set-cookie")
    assert pressed.status_code == 303 and len(cookies) == 2
    assert all("; Secure" in c and "HttpOnly" in c for c in cookies)


# --- revoke means revoked ----------------------------------------------------------------------


def test_a_revoke_between_the_button_and_the_callback_withdraws_the_state(stage: Stage) -> None:
    back = _to_provider(stage, "t1")
    assert stage.ledger.revoke_connect_links("t1", stage.profile.target_id) == 1
    page = stage.callback(back)
    assert page.status_code == 410 and "withdrawn" in page.text
    assert _connections(stage, "t1") == []
    assert stage.record("t1").status is not Status.CONNECTED


# --- CreateConnection's answer lost: asked, never sent twice -----------------------------------


@pytest.mark.parametrize("tenant", ["slow", "drop", "late5xx"])
def test_a_lost_answer_is_settled_by_asking_versori(stage: Stage, tenant: str) -> None:
    """Versori made the connection, then answered late, dropped the socket, or answered 5xx:
    the code is not sent again; the lookup finds the connection; the ledger records its id."""
    back = _to_provider(stage, tenant)
    page = stage.callback(back)
    assert page.status_code == 200 and "is connected" in page.text, page.text
    made = _connections(stage, tenant)
    assert len(made) == 1
    record = stage.record(tenant)
    assert (record.status, record.connection_id) == (Status.CONNECTED, made[0]["id"])
    state = stage.ledger.find_state(back.params["state"])
    assert state is not None and (state.outcome, state.connection_id) == (
        "connected",
        made[0]["id"],
    )


def test_a_409_for_a_connection_made_earlier_is_that_connection(stage: Stage) -> None:
    """Versori holds the tenant's connection but the ledger lost it (an operator's reset): the
    next click's CreateConnection gets 409, and the lookup records the one that exists."""
    assert stage.callback(_to_provider(stage, "t1")).status_code == 200
    first = stage.record("t1").connection_id
    assert stage.ledger.reset("t1", stage.profile.target_id)
    token = stage.tenant("t1")  # sent a new link
    back = stage.consent(stage.press(token).headers["location"])
    page = stage.callback(back)
    assert page.status_code == 200 and "is connected" in page.text
    assert [c["id"] for c in _connections(stage, "t1")] == [first], "no second connection"
    assert stage.record("t1").connection_id == first


def test_a_refused_code_is_final_for_its_state_and_a_new_state_may_try(stage: Stage) -> None:
    back = _to_provider(stage, "t1")
    page = stage.callback(back.copy_set_param("code", "forged"))
    assert page.status_code == 502 and 'action="/retry"' in page.text
    assert _connections(stage, "t1") == []
    token = stage.token("t1")
    again = stage.callback(stage.consent(stage.press(token).headers["location"]))
    assert again.status_code == 200 and len(_connections(stage, "t1")) == 1


def test_versori_unreachable_for_the_lookup_leaves_it_for_the_sweep(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    back = _to_provider(stage, "slow")

    def down(*args: Any, **kwargs: Any) -> None:
        raise LedgerUnavailableError("Versori down")  # any transient OnboardingError

    monkeypatch.setattr(VersoriClient, "find_connection", down)
    page = stage.callback(back)
    assert page.status_code == 503 and "reload this page" in page.text.lower()
    state = stage.ledger.find_state(back.params["state"])
    assert state is not None and state.connecting
    # A reload while Versori is still down: still not confirmed, nothing sent again.
    assert stage.callback(back).status_code == 409
    monkeypatch.undo()
    # The reload once Versori answers resolves it, without waiting for the sweep's grace.
    page = stage.callback(back)
    assert page.status_code == 200 and "is connected" in page.text
    made = _connections(stage, "slow")
    assert len(made) == 1 and stage.record("slow").connection_id == made[0]["id"]


def test_the_ledger_down_after_versori_made_it_logs_the_id_and_the_sweep_records_it(
    stage: Stage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    back = _to_provider(stage, "t1")
    real = stage.ledger.finish_state

    def outage(*args: Any, **kwargs: Any) -> None:
        raise LedgerUnavailableError("the ledger's database connection was lost")

    monkeypatch.setattr(stage.ledger, "finish_state", outage)
    with caplog.at_level(logging.INFO, logger="connect_service"):
        page = stage.callback(back)
    assert page.status_code == 200 and "is connected" in page.text, "Versori's word stands"
    made = _connections(stage, "t1")
    assert len(made) == 1 and made[0]["id"] in caplog.text
    assert stage.record("t1").status is not Status.CONNECTED
    monkeypatch.setattr(stage.ledger, "finish_state", real)
    assert stage.service.sweep() == 0, "a claim within its grace may still be in flight"
    later = utcnow() + timedelta(minutes=2)
    stage.service._clock = lambda: later
    assert stage.service.sweep() == 1
    record = stage.record("t1")
    assert (record.status, record.connection_id) == (Status.CONNECTED, made[0]["id"])
    assert stage.service.sweep() == 0, "finished once"


def test_a_claim_left_by_a_crash_is_resolved_on_the_tenants_next_request(stage: Stage) -> None:
    """A claim never finished and Versori holds no connection: the next press finds it lost
    and mints a new state; one that Versori does hold shows the tenant connected."""
    token = stage.tenant("t1")
    stale = utcnow() - timedelta(minutes=5)
    assert stage.ledger.claim_state(
        "crashed-state", tenant_id="t1", connector_id=stage.profile.target_id, by="h:1", at=stale
    )
    assert stage.press(token).status_code == 303
    crashed = stage.ledger.find_state("crashed-state")
    assert crashed is not None and crashed.outcome == "not_found"
    # Versori made it (the answer was lost), and a crash left the claim: the page says so.
    assert stage.callback(_to_provider(stage, "t2")).status_code == 200
    made = _connections(stage, "t2")
    stage.ledger.reset("t2", stage.profile.target_id)
    again = stage.tenant("t2")
    assert stage.ledger.claim_state(
        "crashed-2", tenant_id="t2", connector_id=stage.profile.target_id, by="h:1", at=stale
    )
    page = stage.app.get(f"/c/{again}")
    assert page.status_code == 200 and "already connected" in page.text
    assert stage.record("t2").connection_id == made[0]["id"]


def test_a_claim_in_flight_is_left_alone(stage: Stage) -> None:
    token = stage.tenant("t1")
    assert stage.ledger.claim_state(
        "in-flight", tenant_id="t1", connector_id=stage.profile.target_id, by="h:2"
    )
    page = stage.app.get(f"/c/{token}")
    assert page.status_code == 409 and "being completed" in page.text
    assert stage.service.sweep() == 0
    assert stage.ledger.connecting_of("t1", stage.profile.target_id)[0].connecting
