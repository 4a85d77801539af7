"""The connect service to the end of a tenant's life (in-process, the real emulator, a real
ledger on SQLite and PostgreSQL): connected then activated on the profile's environment; a
broken credential found by sync, reconnected through a new link by updating the SAME
connection in place, and activated again; a deleted connection found by sync, reconnected with
a new connection, and the stale activation made again with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from demo.emulator_config import DEMO_ENVIRONMENT
from onboarding.ledger import Ledger, Status
from onboarding.sync.versori_sync import sync
from onboarding.versori.client import VersoriClient
from tests.unit.test_connect_service import Stage, _events, _stage

pytestmark = pytest.mark.timeout(120)
ENV = DEMO_ENVIRONMENT.environment_id
ORG = DEMO_ENVIRONMENT.organisation_id
AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def stage(ledger: Ledger, emulator: EmulatorServer, tmp_path: Path) -> Stage:
    return _stage(ledger, emulator, tmp_path, environment_id=ENV)


def connect(stage: Stage, token: str) -> httpx.Response:
    pressed = stage.press(token)
    assert pressed.status_code == 303, pressed.text
    done = stage.callback(stage.consent(pressed.headers["location"]))
    assert done.status_code == 200 and "is connected" in done.text, done.text
    return done


def versori(stage: Stage, path: str) -> Any:
    answer = httpx.get(f"{stage.emulator.base_url}/o/{ORG}{path}", headers=AUTH)
    answer.raise_for_status()
    return answer.json()


def activations(stage: Stage) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = versori(stage, f"/environments/{ENV}/activations")
    return found


def run_sync(stage: Stage) -> None:
    with VersoriClient(
        api="platform-v2", api_key=DEFAULT_API_KEY, base_url=stage.emulator.base_url
    ) as client:
        sync(stage.ledger, [stage.profile], lambda _p: client)


def test_connected_then_activated_broken_reconnected_in_place(stage: Stage) -> None:
    connect(stage, stage.tenant("t1"))
    record = stage.record("t1")
    assert record.status is Status.ACTIVATED, "the environment's one system: activated at once"
    first = record.connection_id
    [activation] = activations(stage)
    assert activation["id"] == record.activation_id
    assert [c["id"] for c in activation["connections"]] == [first]
    assert ("onboarding.tenant.activated", "t1") in _events(stage)

    hook = f"{stage.emulator.base_url}/_emulator/connections/{first}/credential"
    httpx.post(hook, json={"errors": ["invalid_grant: revoked"]}).raise_for_status()
    run_sync(stage)
    assert stage.record("t1").status is Status.BROKEN

    connect(stage, stage.token("t1"))
    again = stage.record("t1")
    assert again.connection_id == first, "the same connection, updated in place"
    assert again.status is Status.ACTIVATED and again.reconnect_of is None
    connection = versori(stage, f"/connections/{first}")
    assert connection["credentials"][0]["credential"]["errors"] == []
    mine = [c for c in versori(stage, "/connections")["items"] if c["id"] == first]
    assert len(mine) == 1
    assert len(activations(stage)) == 1, "the activation that held it holds it still"


def test_a_deleted_connection_is_made_anew_and_activated_again(stage: Stage) -> None:
    connect(stage, stage.tenant("t2"))
    first = stage.record("t2").connection_id
    gone = httpx.delete(f"{stage.emulator.base_url}/_emulator/connections/{first}")
    assert gone.status_code == 204
    run_sync(stage)
    assert stage.record("t2").status is Status.DISCONNECTED

    connect(stage, stage.token("t2"))
    record = stage.record("t2")
    assert record.connection_id not in (None, first), "a new connection"
    assert record.status is Status.ACTIVATED
    [activation] = [a for a in activations(stage) if a["user"]["externalId"] == "t2"]
    assert [c["id"] for c in activation["connections"]] == [record.connection_id]
