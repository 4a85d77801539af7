"""The sync-connections flow on the session's Prefect server, against the emulator on a real
socket and a SQLite ledger: a connection made elsewhere recorded and activated, a broken
credential found, an event per status change, the artifacts under their keys (the funnel
drawn, no link in them); a second sync that changes nothing; bad input before any call."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from flows.sync_connections import sync_connections
from onboarding.clock import utcnow
from onboarding.ledger import Ledger, Status
from tests.flows.helpers import error_of, summary_of

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(60)]

PROFILE = str(Path(__file__).resolve().parents[2] / "examples" / "profile-connect.yaml")
CRM = "01M8F12B95S4BX0QFB3TPDWZ0W"  # the profile's system, the emulator's DEMO_CRM
KEYS = {"sync-acme-crm", "sync-summary-acme-crm", "funnel-acme-crm"}


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        monkeypatch.setenv("VERSORI_BASE_URL", server.base_url)
        yield server


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """This process's runs pointed at a new SQLite ledger (yielded) with the emulator's key."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    monkeypatch.delenv("ONBOARD_FILES_ROOT", raising=False)
    with Ledger(db) as opened:
        yield opened


def linked(ledger: Ledger, *tenants: str) -> None:
    now = utcnow()
    for tenant in tenants:
        ledger.record_link(
            tenant_id=tenant,
            connector_id=CRM,
            profile="acme-crm",
            tenant_name=f"Tenant {tenant}",
            admin_email=f"admin@{tenant}.example.com",
            url=f"https://provider.example.com/authorize?state=s-{tenant}",
            state=f"s-{tenant}",
            created_at=now,
            expires_at=now + timedelta(days=3),
            delivered_by="store",
        )


def elsewhere(emulator: EmulatorServer, tenant: str) -> str:
    """A connection made in Versori's own UI, outside our links."""
    made = httpx.post(
        f"{emulator.base_url}/_emulator/connections", json={"externalId": tenant, "systemId": CRM}
    )
    assert made.status_code == 201, made.text
    connection_id: str = made.json()["connection"]["id"]
    return connection_id


def status(ledger: Ledger, tenant: str) -> tuple[Status, str | None]:
    record = ledger.get(tenant, CRM)
    assert record is not None
    return record.status, record.connection_id


def events_of(flow_run_id: str, expected: int, timeout: float = 15.0) -> list[Any]:
    query = EventFilter(
        event=EventNameFilter(prefix=["onboarding.tenant."]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = list(client.read_events(filter=query, limit=50).events)
            if len(events) >= expected or time.monotonic() > deadline:
                return events
            time.sleep(0.2)


def artifacts_of(flow_run_id: str) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            artifact_filter=ArtifactFilter(),
        )
    return {a.key: a for a in found if a.key}


def test_a_connection_made_elsewhere_is_recorded_activated_and_reported(
    ledger: Ledger, emulator: EmulatorServer
) -> None:
    linked(ledger, "t1", "t2", "t3")
    connection = elsewhere(emulator, "t1")
    broken = elsewhere(emulator, "t2")
    health = f"{emulator.base_url}/_emulator/connections/{broken}/credential"
    httpx.post(health, json={"errors": ["invalid_grant: see https://x.example/y?code=z"]})

    state = sync_connections(profile=PROFILE, tenant_events="all", return_state=True)
    assert state.is_completed(), state.message
    summary = summary_of(state)
    assert summary["changes"] == {"connected": 1, "broken": 1}
    assert summary["activated"] == 1 and summary["refused"] == {}
    [row] = summary["profiles"]
    assert (row["profile"], row["tenants"], row["activated"]) == ("acme-crm", 3, 1)
    assert row["from"] == {"connected": {"delivered": 1}, "broken": {"delivered": 1}}
    assert summary["funnel"]["acme-crm"]["activated"] == 1
    assert summary["funnel"]["acme-crm"]["broken"] == 1
    assert status(ledger, "t1") == (Status.ACTIVATED, connection)
    assert status(ledger, "t2") == (Status.BROKEN, broken)
    assert status(ledger, "t3") == (Status.DELIVERED, None), "nothing in Versori: left be"

    run_id = str(state.state_details.flow_run_id)
    events = events_of(run_id, 3)
    assert sorted((e.resource.id, e.event, dict(e.payload)) for e in events) == [
        ("onboarding.tenant.t1", "onboarding.tenant.activated", {}),
        ("onboarding.tenant.t1", "onboarding.tenant.connected", {}),
        ("onboarding.tenant.t2", "onboarding.tenant.broken", {"error_code": "credential_errors"}),
    ]
    connected = next(e for e in events if e.event == "onboarding.tenant.connected")
    assert connected.resource["onboarding.connection-id"] == connection

    artifacts = artifacts_of(run_id)
    assert artifacts.keys() >= KEYS
    data = artifacts["sync-acme-crm"].data
    table = json.dumps(json.loads(data) if isinstance(data, str) else data, ensure_ascii=False)
    assert "delivered → connected" in table and "delivered → broken" in table
    assert "connected → activated" in table and "invalid_grant" in table
    assert "://" not in table and "s-t1" not in table, "no URL, no state"
    markdown = str(artifacts["sync-summary-acme-crm"].data)
    assert "![acme-crm (Acme CRM): linked 3 → " in markdown
    assert "(data:image/svg+xml;base64," in markdown and "| activated | 1 | 33% |" in markdown
    assert "data:image/svg+xml;base64," in str(artifacts["funnel-acme-crm"].data)

    again = sync_connections(profile=PROFILE, return_state=True)
    repeat = summary_of(again)
    assert repeat["changes"] == {} and repeat["activated"] == 0
    # Users (one page) and the environment's activations; t2 and t3 hold no activation: t2's
    # end user is asked for its connections (t3 has no end user).
    assert repeat["versori_calls"] == 3, repeat


def test_a_refused_activation_fails_the_run_saying_versoris_code(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from demo.emulator import EmulatorConfig

    with EmulatorServer(EmulatorConfig(activate_script={"t1": ["422"]})) as server:
        monkeypatch.setenv("VERSORI_BASE_URL", server.base_url)
        linked(ledger, "t1")
        elsewhere(server, "t1")
        state = sync_connections(profile=PROFILE, return_state=True)
    assert state.is_failed()
    assert "1 activation(s) refused by Versori (unprocessable 1)" in str(state.message)
    summary = summary_of(state, raise_on_failure=False)
    assert summary["refusals"][0]["tenant_id"] == "t1"
    assert status(ledger, "t1")[0] is Status.CONNECTED


def test_a_bad_profile_fails_the_run_before_any_call(
    ledger: Ledger, emulator: EmulatorServer, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nowhere.yaml")
    state = sync_connections(profile=[PROFILE, missing], return_state=True)
    assert state.is_failed()
    assert "nowhere.yaml" in str(error_of(state))
    assert emulator.calls() == {}
