"""`onboard sync`'s core against the emulator on a real socket and a real ledger (SQLite and
PostgreSQL): a connection made elsewhere found and recorded, a broken credential, a deleted
connection, activation once every system of the environment is connected, and a second sync
that changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Ledger, Status
from onboarding.sync.versori_sync import SyncReport, sync
from onboarding.versori.client import VersoriClient
from tests.platform_stage import (
    CRM,
    ENV,
    ORG,
    SLACK,
    SLACK_TEMPLATE,
    TEMPLATE,
    TWO_ENV,
    Stage,
    two_systems,
)

pytestmark = pytest.mark.timeout(90)
NOW = datetime.now(UTC)
TWO_ENV_CRM_TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ1J"


def profile(
    name: str = "acme-crm",
    system: str = CRM,
    template: str = TEMPLATE,
    environment: str | None = ENV,
) -> ConnectorProfile:
    return ConnectorProfile.model_validate(
        {
            "name": name,
            "api": "platform-v2",
            "organisation_id": ORG,
            "system_id": system,
            "credential_id": "01M8F12B95S4BX0QFB3TPDWZ0X",
            "client_id": "demo-crm-client-id",
            "authorize_url": "https://provider.example.com/authorize",
            "connection_template_id": template,
            "environment_id": environment,
        }
    )


@pytest.fixture
def stage() -> Iterator[Stage]:
    with EmulatorServer() as running:
        made = Stage(running)
        yield made
        made.close()


def client(stage: Stage) -> VersoriClient:
    return VersoriClient(api_key=DEFAULT_API_KEY, base_url=stage.server.base_url, api="platform-v2")


def linked(ledger: Ledger, tenant: str, connector: str = CRM, name: str = "acme-crm") -> None:
    ledger.record_link(
        tenant_id=tenant,
        connector_id=connector,
        profile=name,
        tenant_name=f"Tenant {tenant}",
        admin_email=f"admin@{tenant}.example.com",
        url=f"https://provider.example.com/authorize?state=s-{tenant}-{connector}",
        state=f"s-{tenant}-{connector}",
        created_at=NOW,
        expires_at=NOW + timedelta(days=3),
        delivered_by="store",
    )


def status(ledger: Ledger, tenant: str, connector: str = CRM) -> tuple[Status, str | None]:
    record = ledger.get(tenant, connector)
    assert record is not None
    return record.status, record.connection_id


def elsewhere(stage: Stage, tenant: str, system: str = CRM, template: str = TEMPLATE) -> str:
    made = stage.http.post(
        "/_emulator/connections",
        json={"externalId": tenant, "systemId": system, "connectionTemplateId": template},
    )
    assert made.status_code == 201, made.text
    connection_id: str = made.json()["connection"]["id"]
    return connection_id


def run(ledger: Ledger, stage: Stage, *profiles: ConnectorProfile, dry: bool = False) -> SyncReport:
    with client(stage) as versori:
        return sync(ledger, list(profiles) or [profile()], lambda _p: versori, dry_run=dry)


def test_sync_finds_records_and_activates(ledger_url: str, stage: Stage) -> None:
    with Ledger(ledger_url) as ledger:
        for tenant in ("t1", "t2", "t3", "t4"):
            linked(ledger, tenant)
        made_elsewhere = elsewhere(stage, "t1")
        broken = elsewhere(stage, "t3")
        stage.break_credential(broken, errors=["invalid_grant: token revoked"]).raise_for_status()

        dry = run(ledger, stage, dry=True)
        assert {c.tenant_id: c.after for c in dry.changes} == {
            "t1": Status.CONNECTED,
            "t3": Status.BROKEN,
        }
        assert status(ledger, "t1") == (Status.DELIVERED, None), "a dry run writes nothing"

        report = run(ledger, stage)
        assert status(ledger, "t1") == (Status.ACTIVATED, made_elsewhere), "recorded with its id"
        assert status(ledger, "t3") == (Status.BROKEN, broken)
        t3 = ledger.get("t3", CRM)
        assert t3 is not None and t3.reconnect_of == "broken"
        assert "token revoked" in (t3.error_message or "")
        assert status(ledger, "t4") == (Status.DELIVERED, None), "nothing there: left be"
        [(tenant, activated)] = report.activations
        assert tenant == "t1" and activated.activation_id is not None
        record = ledger.get("t1", CRM)
        assert record is not None and record.activation_id == activated.activation_id
        listed = stage.get(f"/environments/{ENV}/activations").json()
        assert [a["id"] for a in listed] == [activated.activation_id], "activated once"

        again = run(ledger, stage)
        assert again.changes == [] and again.activations == [], "a second sync changes nothing"
        # Everyone activated or without an end user: users (one page) + activations, no more.
        assert again.versori_calls <= 2 + 1, again.versori_calls


def test_a_deleted_connection_is_disconnected(ledger_url: str, stage: Stage) -> None:
    with Ledger(ledger_url) as ledger:
        linked(ledger, "t1")
        connection = elsewhere(stage, "t1")
        run(ledger, stage, profile(environment=None))
        assert status(ledger, "t1") == (Status.CONNECTED, connection)
        assert stage.http.delete(f"/_emulator/connections/{connection}").status_code == 204
        report = run(ledger, stage, profile(environment=None))
        assert status(ledger, "t1") == (Status.DISCONNECTED, None)
        record = ledger.get("t1", CRM)
        assert record is not None and record.reconnect_of == "disconnected"
        assert connection in (record.error_message or "")
        assert [c.after for c in report.changes] == [Status.DISCONNECTED]


def test_an_expired_credential_is_broken(ledger_url: str, stage: Stage) -> None:
    with Ledger(ledger_url) as ledger:
        linked(ledger, "t1")
        connection = elsewhere(stage, "t1")
        past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        stage.break_credential(connection, errors=[], expiresAt=past).raise_for_status()
        run(ledger, stage, profile(environment=None))
        record = ledger.get("t1", CRM)
        assert record is not None and record.status is Status.BROKEN
        assert record.error_code == "credential_expired"


def test_activation_waits_for_the_last_system_of_a_two_system_environment(
    ledger_url: str,
) -> None:
    crm = profile(template=TWO_ENV_CRM_TEMPLATE, environment=TWO_ENV)
    slack = profile("acme-slack", SLACK, SLACK_TEMPLATE, TWO_ENV)
    with EmulatorServer(two_systems()) as server, Ledger(ledger_url) as ledger:
        stage = Stage(server)
        linked(ledger, "t1")
        linked(ledger, "t1", SLACK, "acme-slack")
        elsewhere(stage, "t1", CRM, TWO_ENV_CRM_TEMPLATE)
        first = run(ledger, stage, crm, slack)
        assert status(ledger, "t1")[0] is Status.CONNECTED
        assert first.activations == [], "Slack is not connected yet: no activation asked"
        elsewhere(stage, "t1", SLACK, SLACK_TEMPLATE)
        second = run(ledger, stage, crm, slack)
        assert [t for t, a in second.activations if a.activation_id] == ["t1"]
        assert status(ledger, "t1")[0] is Status.ACTIVATED
        assert status(ledger, "t1", SLACK)[0] is Status.ACTIVATED
        third = run(ledger, stage, crm, slack)
        assert third.activations == [] and third.changes == []
        stage.close()


def test_a_refused_activation_is_noted_and_tried_again(ledger_url: str) -> None:
    config = EmulatorConfig(activate_script={"t1": ["422", "ok"]})
    with EmulatorServer(config) as server, Ledger(ledger_url) as ledger:
        stage = Stage(server)
        linked(ledger, "t1")
        elsewhere(stage, "t1")
        first = run(ledger, stage)
        [(_, refused)] = first.activations
        assert refused.refused is not None and refused.refused[0]
        record = ledger.get("t1", CRM)
        assert record is not None and record.status is Status.CONNECTED
        assert (record.error_code or "").startswith("activation_refused:")
        second = run(ledger, stage)
        [(_, activated)] = second.activations
        assert activated.activation_id is not None
        assert status(ledger, "t1")[0] is Status.ACTIVATED
        stage.close()



def test_a_profile_syncs_only_the_tenants_it_wrote(ledger_url: str, stage: Stage) -> None:
    """Two profiles of one system (say staging and production templates): a sync of one never
    touches the other's tenants, whose connection it would not find."""
    with Ledger(ledger_url) as ledger:
        linked(ledger, "theirs", name="crm-staging")
        ledger.mark_connected("theirs", CRM, connection_id="01M8F12B95S4BX0QFB3TPDWZ9Z", at=NOW)
        report = run(ledger, stage)
        assert report.changes == [] and report.profiles[0].tenants == 0
        assert status(ledger, "theirs") == (Status.CONNECTED, "01M8F12B95S4BX0QFB3TPDWZ9Z")
