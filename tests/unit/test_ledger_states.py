"""Issue 10, defects 3 and 6: `connected` is final (every other write is conditional), and a
callback's state is accepted once, only while its link is current and unexpired, looked up by
its hash (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from onboarding.batch.delivery import Delivery
from onboarding.connections.record_connection import record_connection
from onboarding.errors import SupersededStateError
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Status, records
from tests.support import campaign_of, onboard
from tests.unit.test_ledger import CONNECTOR, HOUR, NOW, fail, get, link

pytestmark = pytest.mark.timeout(120)
PROFILE = Path(__file__).resolve().parents[2] / "examples" / "profile.yaml"


# --- defect 3: connected is final -------------------------------------------------------------


def test_a_callback_during_a_send_leaves_the_tenant_connected(ledger: Ledger) -> None:
    link(ledger, "t1", created_at=NOW)
    ledger.mark_sending("t1", CONNECTOR, message_id="<m1@x>")
    record_connection(ledger, "state-t1", "conn-1", now=NOW + HOUR)  # the callback, mid-send
    ledger.mark_delivered("t1", CONNECTOR, channel="email", at=NOW + HOUR)  # the send ends
    ledger.mark_reminded("t1", CONNECTOR, channel="email", at=NOW + 2 * HOUR)
    ledger.mark_sending("t1", CONNECTOR, message_id="<m2@x>")
    fail(ledger, "t1")
    record = get(ledger, "t1")
    assert (record.status, record.connection_id, record.reminders) == (
        Status.CONNECTED,
        "conn-1",
        0,
    )
    assert record.message_id == "<m1@x>"
    assert ledger.ids_needing_nothing(CONNECTOR, now=NOW + 1000 * HOUR) == {"t1"}
    due = ledger.due_for_reminder(CONNECTOR, sent_before=NOW + 1000 * HOUR, max_reminders=9)
    assert due == []


def test_a_link_issued_for_a_connected_tenant_goes_to_the_history(ledger: Ledger) -> None:
    link(ledger, "t1")
    assert ledger.mark_connected("t1", CONNECTOR, connection_id="conn-1", at=NOW)
    link(ledger, "t1", state="late-state", url="https://a.example/?state=late-state")
    record = get(ledger, "t1")
    assert (record.status, record.state, record.connection_id, record.attempts) == (
        Status.CONNECTED,
        "state-t1",
        "conn-1",
        1,
    )
    late = ledger.find_superseded("late-state")
    assert late is not None and late.tenant_id == "t1", "no state Versori returned is lost"
    with pytest.raises(SupersededStateError):
        record_connection(ledger, "late-state", "conn-2", now=NOW)
    assert not ledger.mark_connected("t1", CONNECTOR, connection_id="conn-3", at=NOW)
    assert get(ledger, "t1").connection_id == "conn-1"


def test_writes_about_a_replaced_link_do_not_land_on_the_new_one(ledger: Ledger) -> None:
    link(ledger, "t1", state="s-old")
    link(ledger, "t1", state="s-new")
    assert not ledger.mark_sending("t1", CONNECTOR, message_id="<m@x>", state="s-old")
    assert not ledger.mark_delivered("t1", CONNECTOR, channel="email", state="s-old")
    assert get(ledger, "t1").status is Status.LINK_CREATED
    assert ledger.mark_delivered("t1", CONNECTOR, channel="email", state="s-new")
    assert get(ledger, "t1").status is Status.DELIVERED


def test_an_operator_reset_reopens_a_connected_tenant(ledger: Ledger) -> None:
    link(ledger, "t1")
    record_connection(ledger, "state-t1", "conn-1", now=NOW)
    assert ledger.reset("t1", CONNECTOR)
    record = get(ledger, "t1")
    assert (record.status, record.state, record.url, record.connection_id) == (
        Status.PENDING,
        None,
        None,
        None,
    )
    assert ledger.find_superseded("state-t1") is not None
    assert "t1" not in ledger.ids_needing_nothing(CONNECTOR, now=NOW)
    link(ledger, "t1", state="state-t1-b")
    assert get(ledger, "t1").status is Status.LINK_CREATED
    assert not ledger.reset("nobody", CONNECTOR)


class _CallbackDuringSend:
    """An SMTP sender whose send is overtaken by the tenant's OAuth callback."""

    email_from = "Onboarding <onboarding@example.com>"

    def __init__(self, ledger: Ledger, state: str) -> None:
        self.ledger, self.state, self.sent = ledger, state, 0

    def send(self, message: Any) -> None:
        record_connection(self.ledger, self.state, "conn-during-send")
        self.sent += 1


def test_a_callback_during_a_real_send_leaves_the_tenant_connected(ledger: Ledger) -> None:
    """onboard_tenant, by email, reusing a stored link: the callback lands while the message is
    being sent; the tenant ends connected, not delivered (and so is never reminded)."""
    from onboarding.mail import MailTemplates

    tenant = Tenant(tenant_id="t1", name="Acme", admin_email="admin@acme.example.com", fields={})
    ledger.record_link(
        tenant_id="t1",
        connector_id=load_profile(PROFILE).target_id,
        profile="zendesk-demo",
        tenant_name="Acme",
        admin_email="admin@acme.example.com",
        url="https://acme.zendesk.com/oauth/authorizations/new?state=st-1",
        state="st-1",
        created_at=NOW.replace(year=2020) + timedelta(days=0),
        expires_at=NOW + 1000 * HOUR,
    )
    mailer = _CallbackDuringSend(ledger, "st-1")
    profile = load_profile(PROFILE)
    campaign = campaign_of(
        profile, ledger, deliver=Delivery.EMAIL, mailer=mailer, templates=MailTemplates()
    )
    onboard(campaign, tenant)
    assert mailer.sent == 1
    record = ledger.get("t1", profile.target_id)
    assert record is not None
    assert (record.status, record.connection_id) == (Status.CONNECTED, "conn-during-send")


def test_a_tenant_that_connected_before_the_send_is_not_mailed(ledger: Ledger) -> None:
    """The callback lands between the link being read and the message being marked sending:
    nothing is sent, and the outcome says connected."""
    from onboarding.mail import MailTemplates

    tenant = Tenant(tenant_id="t1", name="Acme", admin_email="admin@acme.example.com", fields={})
    connector_id = load_profile(PROFILE).target_id
    ledger.record_link(
        tenant_id="t1",
        connector_id=connector_id,
        profile="zendesk-demo",
        tenant_name="Acme",
        admin_email="admin@acme.example.com",
        url="https://acme.zendesk.com/oauth/authorizations/new?state=st-1",
        state="st-1",
        created_at=NOW.replace(year=2020),
        expires_at=NOW + 1000 * HOUR,
    )
    mailer = _CallbackDuringSend(ledger, "st-1")
    original = ledger.mark_sending

    def connect_first(*args: Any, **kwargs: Any) -> bool:
        record_connection(ledger, "st-1", "conn-first", now=NOW)
        return original(*args, **kwargs)

    ledger.mark_sending = connect_first  # type: ignore[method-assign]
    profile = load_profile(PROFILE)
    campaign = campaign_of(
        profile, ledger, deliver=Delivery.EMAIL, mailer=mailer, templates=MailTemplates()
    )
    outcome = onboard(campaign, tenant)
    assert mailer.sent == 0
    assert outcome.status == "connected"
    assert get(ledger, "t1").connection_id == "conn-first"


# --- defect 6: a state is accepted once ---------------------------------------------------------


def test_a_state_is_accepted_once(ledger: Ledger) -> None:
    link(ledger, "t1")
    record = record_connection(ledger, "state-t1", "conn-victim", now=NOW)
    assert (record.status, record.connection_id) == (Status.CONNECTED, "conn-victim")
    with pytest.raises(Exception) as info:
        record_connection(ledger, "state-t1", "conn-attacker", now=NOW + HOUR)
    assert getattr(info.value, "code", "") == "state_used"
    assert "state-t1" not in str(info.value)
    assert get(ledger, "t1").connection_id == "conn-victim"


def test_a_state_past_its_links_expiry_is_refused(ledger: Ledger) -> None:
    link(ledger, "t1", created_at=NOW, ttl=72 * HOUR)
    with pytest.raises(Exception) as info:
        record_connection(ledger, "state-t1", "conn-1", now=NOW + 27 * 24 * HOUR)
    assert getattr(info.value, "code", "") == "expired_state"
    assert get(ledger, "t1").status is Status.LINK_CREATED
    # And a link marked expired, even before its time by another clock.
    link(ledger, "t2", created_at=NOW)
    ledger.expire_links(CONNECTOR, NOW + 100 * HOUR)
    with pytest.raises(Exception) as info:
        record_connection(ledger, "state-t2", "conn-2", now=NOW)
    assert getattr(info.value, "code", "") == "expired_state"


def test_two_callbacks_with_one_state_connect_once(ledger_url: str) -> None:
    seed = Ledger(ledger_url)
    link(seed, "t1")
    seed.close()
    ledgers = [Ledger(ledger_url) for _ in range(6)]
    go = threading.Barrier(6)
    outcomes: list[str] = []

    def callback(n: int) -> None:
        go.wait()
        outcomes.append(ledgers[n].connect_state("state-t1", connection_id=f"c{n}", at=NOW).outcome)

    threads = [threading.Thread(target=callback, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(outcomes) == ["connected"] + ["used"] * 5
        winner = get(ledgers[0], "t1").connection_id
        assert winner in {f"c{n}" for n in range(6)}
    finally:
        for ledger in ledgers:
            ledger.close()


def test_states_are_looked_up_by_their_hash(ledger: Ledger) -> None:
    link(ledger, "t1")
    with ledger.engine.connect() as conn:
        stored = conn.execute(select(records.c.state_hash)).scalar_one()
    assert stored == hashlib.sha256(b"state-t1").hexdigest()
    with ledger.engine.begin() as conn:  # the lookup reads the hash, not the clear state
        conn.execute(records.update().values(state="something-else"))
    found = ledger.find_by_state("state-t1")
    assert found is not None and found.tenant_id == "t1"


def test_the_flow_keeps_the_state_out_of_its_stored_parameters(
    prefect_harness: None, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """record-connection run in this process with the state as a SecretStr, as a Python caller
    would: the run's parameters in the Prefect API show the state masked, and its form marks
    it a password. (`onboard mark-connected` runs no flow: tests/unit/test_mark_connected.py.)"""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.utilities.callables import parameter_schema
    from pydantic import SecretStr

    from flows.record_connection import record_connection_flow
    from flows.running.in_process import run_here

    if "sqlite" not in ledger_url:
        pytest.skip("one backend is enough for the parameters")
    monkeypatch.setenv("ONBOARD_DB_URL", ledger_url)
    ledger = Ledger(ledger_url)
    secret = "st-" + hashlib.sha256(ledger_url.encode()).hexdigest()[:20]
    link(ledger, "t1", state=secret, created_at=NOW.replace(year=2020), ttl=100_000 * HOUR)
    ledger.close()
    done = run_here(record_connection_flow, state=SecretStr(secret), connection_id="c-1")
    assert done.is_completed(), done.message
    replay = run_here(record_connection_flow, state=SecretStr(secret))
    assert replay.is_failed() and secret not in str(replay.message)

    async def stored_parameters() -> list[dict[str, Any]]:
        # Filtered on the server: the session's server holds every test's flow runs, more
        # than one page of them.
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["record-connection"]))
            )
            return [r.parameters for r in runs if r.name == "record-connection"]

    parameters = asyncio.run(stored_parameters())
    assert parameters and all(secret not in str(p) for p in parameters)
    schema = parameter_schema(record_connection_flow.fn).model_dump()["properties"]["state"]
    assert schema.get("format") == "password" and schema.get("writeOnly") is True
