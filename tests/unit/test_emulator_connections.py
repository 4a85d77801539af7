"""The emulator's CreateConnection and its reads over real HTTP, with the real client: one
connection per end user and template (v2) or name (v1), the paged lists, and the scripted
faults, after which find_connection says what Versori holds."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from demo.emulator import DEFAULT_API_KEY, DEMO_CONNECTOR, EmulatorConfig, EmulatorServer
from demo.emulator_config import DEMO_CRM, EmulatedConnector, load_script
from demo.emulator_oauth import CONSENT_PATH
from onboarding.errors import (
    APIConnectionError,
    APITimeoutError,
    ConflictError,
    InputError,
    ServerError,
)
from onboarding.versori.client import VersoriClient
from onboarding.versori.wire import ConnectionResponse

pytestmark = pytest.mark.timeout(60)

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
ORG = DEMO_CRM.organisation_id
SYSTEM = DEMO_CRM.connector_id  # a Platform API v2 system
CONNECTOR = DEMO_CONNECTOR.connector_id  # a Connect API v1 connector
TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ0V"
OTHER_TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ0Y"
CALLBACK = "https://app.example.com/callback"


class Stage:
    """One emulator, a plain HTTP client to it, and a way to get a code for a new state."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base_url, timeout=5.0)

    def code(self, v2: bool = True) -> tuple[str, str]:
        """A fresh (code, state): initialise, then Allow on the consent page."""
        connector: EmulatedConnector = DEMO_CRM if v2 else DEMO_CONNECTOR
        body: dict[str, Any] = {
            "credential": {
                "id": connector.credential_id,
                "organisationId": connector.credential_organisation_id,
            },
            "authorizeUrl": f"{self.server.base_url}{CONSENT_PATH}",
            "clientId": connector.client_id,
        }
        if v2:
            body["redirectUrl"] = CALLBACK
        kind = "systems" if v2 else "connectors"
        path = f"/o/{connector.organisation_id}/{kind}/{connector.connector_id}/oauth2/initialise"
        given = self.http.post(path, json=body, headers=AUTH)
        assert given.status_code == 200, given.text
        state = parse_qs(urlsplit(given.json()["url"]).query)["state"][0]
        back = self.http.post(CONSENT_PATH, data={"state": state, "decision": "allow"})
        assert back.status_code == 303, back.text
        return parse_qs(urlsplit(back.headers["location"]).query)["code"][0], state

    def client(self, v2: bool = True, **kwargs: Any) -> VersoriClient:
        return VersoriClient(
            api="platform-v2" if v2 else "connect-v1",
            api_key=DEFAULT_API_KEY,
            base_url=self.server.base_url,
            **kwargs,
        )

    def create(
        self,
        tenant: str,
        *,
        name: str | None = None,
        template: str = TEMPLATE,
        v2: bool = True,
        code: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> ConnectionResponse:
        code_, state = code or self.code(v2)
        deadline = kwargs.pop("deadline", None)
        with self.client(v2, **kwargs) as client:
            return client.create_connection(
                ORG,
                SYSTEM if v2 else CONNECTOR,
                code=code_,
                state=state,
                name=name or f"Tenant {tenant}",
                external_id=tenant,
                template_id=template,
                redirect_url=CALLBACK if v2 else None,
                deadline=deadline,
            )

    def find(
        self, tenant: str, *, name: str | None = None, template: str | None = None, v2: bool = True
    ) -> ConnectionResponse | None:
        with self.client(v2) as client:
            return client.find_connection(
                ORG,
                SYSTEM if v2 else CONNECTOR,
                external_id=tenant,
                name=name or f"Tenant {tenant}",
                template_id=template,
            )

    def made(self) -> list[dict[str, Any]]:
        connections: list[dict[str, Any]] = self.http.get("/_emulator/connections").json()[
            "connections"
        ]
        return connections

    def faults(self) -> dict[str, int]:
        faults: dict[str, int] = self.http.get("/_emulator/connections").json()["faults"]
        return faults

    def users(self, **params: str) -> httpx.Response:
        return self.http.get(f"/o/{ORG}/users", params=params, headers=AUTH)

    def connections(self, **params: str) -> httpx.Response:
        return self.http.get(f"/o/{ORG}/connections", params=params, headers=AUTH)

    def v1_connections(self, **params: str) -> httpx.Response:
        return self.http.get(
            f"/o/{ORG}/connectors/{CONNECTOR}/connections", params=params, headers=AUTH
        )


@pytest.fixture(scope="module")
def shared() -> Iterator[EmulatorServer]:
    with EmulatorServer() as running:
        yield running


@pytest.fixture
def stage(shared: EmulatorServer) -> Iterator[Stage]:
    made = Stage(shared)
    made.http.post("/_emulator/reset").raise_for_status()
    yield made
    made.http.close()


@pytest.fixture
def start() -> Iterator[Callable[[EmulatorConfig], Stage]]:
    stages: list[Stage] = []

    def _start(config: EmulatorConfig) -> Stage:
        made = Stage(EmulatorServer(config).start())
        stages.append(made)
        return made

    yield _start
    for made in stages:
        made.http.close()
        made.server.stop()


# --- CreateConnection: one per end user and template (v2), per name (v1) ------------------------


def test_v2_makes_the_end_user_and_a_connection_that_says_where_it_belongs(stage: Stage) -> None:
    made = stage.create("acme")
    [user] = stage.http.get("/_emulator/users").json()["users"]
    assert user["externalId"] == "acme" and user["displayName"] == ""
    assert user["organisationId"] == ORG and user["id"] != "acme" and len(user["id"]) == 26
    [record] = stage.made()
    assert record["id"] == made.id and record["endUserId"] == user["id"]
    [listed] = stage.connections(end_user_id=user["id"]).json()["items"]
    assert listed["systemId"] == SYSTEM and listed["connectionTemplateId"] == TEMPLATE
    assert listed["credentials"] == [
        {
            "id": listed["credentials"][0]["id"],
            "credential": {
                "id": listed["credentials"][0]["credential"]["id"],
                "organisationId": ORG,
                "name": "Tenant acme",
                "type": "oauth2-code",
                "errors": [],
            },
        }
    ]
    assert "code" not in json.dumps(listed["credentials"]).replace("oauth2-code", "")
    assert made.system_id == SYSTEM and made.connection_template_id == TEMPLATE


def test_v2_second_connection_of_an_end_user_and_template_is_409_and_keeps_the_code(
    stage: Stage,
) -> None:
    first = stage.create("acme")
    code = stage.code()
    with pytest.raises(ConflictError) as info:
        stage.create("acme", name="Tenant acme again", code=code)
    assert info.value.status == 409 and info.value.code == "conflict"
    assert "acme" in info.value.message
    with pytest.raises(ConflictError):  # the same template, in lower case
        stage.create("acme", name="Tenant acme again", template=TEMPLATE.lower(), code=code)
    assert [c["id"] for c in stage.made()] == [first.id]
    # The refused request did not spend the code: another template takes it.
    other = stage.create("acme", name="Tenant acme other", template=OTHER_TEMPLATE, code=code)
    assert other.id != first.id
    assert len(stage.http.get("/_emulator/users").json()["users"]) == 1


def test_v2_name_is_unique_within_the_system(stage: Stage) -> None:
    stage.create("acme", name="Shared name")
    with pytest.raises(ConflictError):
        stage.create("beta", name="Shared name")
    assert [c["external_id"] for c in stage.made()] == ["acme"]


def test_v1_same_name_in_a_connector_is_409(stage: Stage) -> None:
    first = stage.create("acme", v2=False)
    code = stage.code(v2=False)
    with pytest.raises(ConflictError) as info:
        stage.create("acme", v2=False, code=code)
    assert info.value.code == "conflict" and "Tenant acme" in info.value.message
    other = stage.create("beta", v2=False, code=code)
    assert [c["id"] for c in stage.made()] == [first.id, other.id]
    assert stage.made()[0]["systemId"] == CONNECTOR and stage.made()[0]["endUserId"] is None


def test_a_code_is_refused_elsewhere_and_once_spent(stage: Stage) -> None:
    code, state = stage.code(v2=False)
    payload = {
        "name": "x",
        "credentials": {
            "action": [
                {"credential": {"type": "oauth2-code", "data": {"code": code, "state": state}}}
            ]
        },
    }
    elsewhere = stage.http.post(
        f"/o/{ORG}/connectors/{DEMO_CONNECTOR.credential_id}/connections",
        json=payload,
        headers=AUTH,
    )
    assert elsewhere.status_code == 400 and elsewhere.json()["code"] == "invalid_grant"
    path = f"/o/{ORG}/connectors/{CONNECTOR}/connections"
    assert stage.http.post(path, json=payload, headers=AUTH).status_code == 200
    payload["name"] = "y"
    again = stage.http.post(path, json=payload, headers=AUTH)
    assert again.status_code == 400 and again.json()["code"] == "invalid_grant"


def test_reset_forgets_end_users_and_connections(stage: Stage) -> None:
    stage.create("acme")
    stage.http.post("/_emulator/reset").raise_for_status()
    assert stage.made() == [] and stage.http.get("/_emulator/users").json()["users"] == []
    stage.create("acme")  # no 409: the old one is gone


# --- the reads ---------------------------------------------------------------------------------


def test_users_search_matches_substrings_and_pages(stage: Stage) -> None:
    for tenant in ("acme", "acme-2", "xacme", "beta"):
        stage.create(tenant)
    page = stage.users(search="ACME", first="2").json()
    assert page["totalCount"] == 3 and page["next"] and page["prev"] == ""
    assert [u["externalId"] for u in page["users"]] == ["acme", "acme-2"]
    rest = stage.users(search="ACME", first="2", after=page["next"]).json()
    assert [u["externalId"] for u in rest["users"]] == ["xacme"]
    assert rest["next"] == "" and rest["totalCount"] == 3
    assert stage.users().json()["totalCount"] == 4
    beta = next(u for u in stage.users().json()["users"] if u["externalId"] == "beta")
    by_id = stage.users(search=beta["id"][-8:].lower()).json()["users"]
    assert [u["externalId"] for u in by_id] == ["beta"]
    assert "seq" not in beta
    # Twenty by default.
    assert len(stage.users(search="").json()["users"]) == 4


def test_find_connection_filters_the_substring_matches_exactly(stage: Stage) -> None:
    wanted = {tenant: stage.create(tenant).id for tenant in ("acme-2", "xacme", "acme")}
    found = stage.find("acme")
    assert found is not None and found.id == wanted["acme"]
    assert stage.find("acm") is None
    assert stage.find("acme", template=OTHER_TEMPLATE) is None
    assert stage.find("acme", template=TEMPLATE.lower()) == found


def test_connections_take_the_end_users_versori_id_never_its_external_id(stage: Stage) -> None:
    made = stage.create("acme")
    stage.create("beta")
    [user] = stage.users(search="acme").json()["users"]
    by_id = stage.connections(end_user_id=user["id"]).json()
    assert [c["id"] for c in by_id["items"]] == [made.id] and by_id["totalCount"] == 1
    by_external = stage.connections(end_user_id="acme").json()
    assert by_external["items"] == [] and by_external["totalCount"] == 0
    assert stage.connections(end_user_id=user["id"], system_id=CONNECTOR).json()["items"] == []
    assert stage.connections().json()["totalCount"] == 2


def test_v1_list_is_newest_first_and_pages(stage: Stage) -> None:
    ids = [stage.create(t, v2=False).id for t in ("a", "b", "c")]
    seen: list[str] = []
    after = ""
    while True:
        params = {"first": "1", **({"after": after} if after else {})}
        page = stage.v1_connections(**params).json()
        assert page["totalCount"] == 3 and set(page["items"][0]) == {
            "id",
            "name",
            "createdAt",
            "updatedAt",
        }
        seen += [c["id"] for c in page["items"]]
        after = page["next"]
        if not after:
            break
    assert seen == ids[::-1]
    found = stage.find("x", name="Tenant b", v2=False)
    assert found is not None and found.id == ids[1]
    assert stage.find("x", name="Tenant", v2=False) is None
    assert stage.connections().json()["items"] == [], "v1 connections are not v2's"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"first": "0"}, "first"),
        ({"first": "101"}, "first"),
        ({"first": "-1"}, "first"),
        ({"first": "ten"}, "first"),
        ({"after": "not-a-cursor"}, "after"),
    ],
)
def test_bad_paging_is_400(stage: Stage, params: dict[str, str], field: str) -> None:
    stage.create("acme")
    for response in (
        stage.users(**params),
        stage.connections(**params),
        stage.v1_connections(**params),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "validation_failed"
        assert [f["field"] for f in response.json()["fields"]] == [field]
    assert stage.users(first="100").status_code == 200


def test_a_cursor_of_one_list_is_not_one_of_another(stage: Stage) -> None:
    stage.create("acme")
    stage.create("acme-2")
    cursor = stage.users(first="1").json()["next"]
    assert cursor
    assert stage.connections(after=cursor).status_code == 400


def test_the_reads_need_the_api_key(stage: Stage) -> None:
    for path in (
        f"/o/{ORG}/users",
        f"/o/{ORG}/connections",
        f"/o/{ORG}/connectors/{CONNECTOR}/connections",
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = stage.http.get(path, headers=headers)
            assert response.status_code == 401 and response.json()["code"] == "unauthenticated"


# --- scripted faults ---------------------------------------------------------------------------


def test_409_refuses_without_making_or_spending_the_code(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["409", "ok"]}))
    code = stage.code()
    with pytest.raises(ConflictError) as info:
        stage.create("acme", code=code)
    assert info.value.details == "injected by the emulator script"
    assert stage.made() == [] and stage.find("acme") is None
    made = stage.create("acme", code=code)
    assert stage.find("acme") == made
    assert stage.faults() == {"409": 1, "ok": 1}


def test_500_fails_without_making(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["500*"]}))
    for _ in range(2):
        with pytest.raises(ServerError):
            stage.create("acme")
    assert stage.made() == [] and stage.find("acme") is None
    stage.create("beta")  # not matched


def test_500_after_makes_the_connection(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["500_after"]}))
    with pytest.raises(ServerError) as info:
        stage.create("acme")
    assert info.value.status == 500
    [record] = stage.made()
    found = stage.find("acme", template=TEMPLATE)
    assert found is not None and found.id == record["id"]
    with pytest.raises(ConflictError):  # the next attempt: it exists
        stage.create("acme")


def test_slow_after_makes_the_connection_then_outlasts_the_client(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["slow_after*"]}, stall_seconds=5))
    began = time.monotonic()
    with pytest.raises(APITimeoutError):
        stage.create("acme", read_timeout=0.3)
    assert time.monotonic() - began < 2.5
    found = stage.find("acme")
    assert found is not None and [c["id"] for c in stage.made()] == [found.id]
    # The emulator saw the client go, and dropped the answer.
    deadline = time.monotonic() + 3
    while stage.faults().get("slow_after_abandoned") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stage.faults()["slow_after_abandoned"] == 1


def test_slow_after_answers_a_patient_client(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["slow_after"]}, stall_seconds=0.3))
    began = time.monotonic()
    made = stage.create("acme")
    assert time.monotonic() - began >= 0.3
    assert stage.find("acme") == made
    assert stage.faults()["slow_after_delivered"] == 1


def test_a_per_call_deadline_cuts_create_connection_short(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["slow_after"]}, stall_seconds=5))
    began = time.monotonic()
    with pytest.raises(APITimeoutError):
        stage.create("acme", deadline=0.4)
    assert time.monotonic() - began < 2.0
    assert stage.find("acme") is not None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_drop_after_makes_the_connection_and_drops_the_socket(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(EmulatorConfig(create_script={"acme": ["drop_after"]}))
    uvicorn_log, records = logging.getLogger("uvicorn.error"), _Records()
    uvicorn_log.addHandler(records)
    try:
        with pytest.raises(APIConnectionError) as info:
            stage.create("acme")
    finally:
        uvicorn_log.removeHandler(records)
    assert type(info.value) is APIConnectionError, "a drop, not a timeout"
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    found = stage.find("acme")
    assert found is not None and [c["id"] for c in stage.made()] == [found.id]
    assert records.messages == [], "a drop on purpose is not logged as an error"
    # The emulator serves on.
    assert stage.create("beta").id != found.id


def test_v1_faults_match_on_the_connection_name(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(create_script={"Tenant ac": ["500_after"]}))
    with pytest.raises(ServerError):
        stage.create("x", name="Tenant acme", v2=False)
    found = stage.find("x", name="Tenant acme", v2=False)
    assert found is not None and stage.made()[0]["id"] == found.id


# --- the script's config ---------------------------------------------------------------------


def test_create_script_in_the_config_and_in_a_script_file(tmp_path: Path) -> None:
    config = EmulatorConfig(
        script={"tenant=a": ["503"], "create:acme": ["500_after", "ok"]},
        create_script={"beta": ("drop_after*",)},  # type: ignore[dict-item]
    )
    assert config.script == {"tenant=a": ["503"]}
    assert config.create_script == {"beta": ["drop_after*"], "acme": ["500_after", "ok"]}
    path = tmp_path / "faults.yaml"
    path.write_text('"create:acme": [409, slow_after]\n"tenant=b": [stall]\n')
    assert load_script(path) == {"create:acme": ["409", "slow_after"], "tenant=b": ["stall"]}


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"create_script": {"acme": ["stall"]}}, "create_script"),
        ({"create_script": {"acme": "409"}}, "create_script"),
        ({"create_script": {"": ["409"]}}, "create_script"),
        ({"create_script": ["409"]}, "create_script"),
        ({"script": {"create:acme": ["503"]}}, "script"),
        ({"script": {"create:": ["409"]}}, "script"),
        ({"script": {"acme": ["500_after"]}}, "script"),
    ],
)
def test_create_script_validation(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=f"^{says}"):
        EmulatorConfig(**kwargs)


def test_the_cli_reads_create_entries_from_the_script_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.cli import app

    served: list[EmulatorConfig] = []
    monkeypatch.setattr(
        "demo.emulator.run_emulator",
        lambda config, host, port: served.append(config),
    )
    path = tmp_path / "faults.yaml"
    path.write_text('"create:acme": [drop_after, ok]\n')
    result = CliRunner().invoke(app, ["emulator", "--script", str(path)])
    assert result.exit_code == 0, result.output
    assert served[0].create_script == {"acme": ["drop_after", "ok"]}
    path.write_text('"create:acme": [stall]\n')
    result = CliRunner().invoke(app, ["emulator", "--script", str(path)])
    assert result.exit_code == 2 and "--script" in result.output
    assert "unknown action 'stall'" in result.output


def test_find_connection_refuses_a_bad_deadline(stage: Stage) -> None:
    with stage.client() as client, pytest.raises(InputError):
        client.find_connection(ORG, SYSTEM, external_id="acme", name="n", deadline=0)
