"""The emulator's Platform API v2 reads and writes beyond CreateConnection, over real HTTP:
GetEndUser and ListEndUsers' activation filter, GetConnection, UpdateConnection (a new code in
place), DeleteConnection, and ActivateUser with its reads, each as strict as the spec allows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from demo.emulator import EmulatorConfig, EmulatorServer
from demo.emulator_config import DEMO_CONNECTOR, DEMO_SYSTEM
from tests.platform_stage import (
    AUTH,
    CALLBACK,
    ENV,
    ORG,
    OTHER_TEMPLATE,
    SLACK_TEMPLATE,
    TEMPLATE,
    TWO_ENV,
    UNKNOWN,
    Stage,
    fields,
    two_systems,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def shared() -> Iterator[EmulatorServer]:
    with EmulatorServer() as running:
        yield running


@pytest.fixture
def stage(shared: EmulatorServer) -> Iterator[Stage]:
    made = Stage(shared)
    made.http.post("/_emulator/reset").raise_for_status()
    yield made
    made.close()


@pytest.fixture
def start() -> Iterator[Callable[[EmulatorConfig], Stage]]:
    stages: list[Stage] = []

    def _start(config: EmulatorConfig) -> Stage:
        made = Stage(EmulatorServer(config).start())
        stages.append(made)
        return made

    yield _start
    for made in stages:
        made.close()
        made.server.stop()


def update_body(stage: Stage, **overrides: Any) -> dict[str, Any]:
    body = {"name": "Renamed", "credentials": stage.credentials(stage.code()), "baseUrl": ""}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not None}


# --- end users ---------------------------------------------------------------------------------


def test_get_end_user_by_its_versori_id_only(stage: Stage) -> None:
    stage.create("acme")
    user = stage.user("acme")
    assert stage.get(f"/users/{user['id']}").json() == user
    assert stage.get(f"/users/{user['id'].lower()}").json() == user
    assert set(user) == {
        "id",
        "externalId",
        "displayName",
        "organisationId",
        "createdAt",
        "updatedAt",
    }
    by_external = stage.get("/users/acme")
    assert by_external.status_code == 400 and fields(by_external) == ["user_id"]
    missing = stage.get(f"/users/{UNKNOWN}")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    elsewhere = stage.http.get(f"/o/{UNKNOWN}/users/{user['id']}", headers=AUTH)
    assert elsewhere.status_code == 404, "an end user of another organisation"


def test_list_end_users_by_activation_on_an_environment(stage: Stage) -> None:
    for tenant in ("acme", "beta", "gamma"):
        made = stage.create(tenant)
        if tenant != "beta":
            assert stage.activate(tenant, {TEMPLATE: made["id"]}).status_code == 200
    live = stage.get("/users", activated="true", environment_id=ENV).json()
    assert [u["externalId"] for u in live["users"]] == ["acme", "gamma"]
    assert live["totalCount"] == 2
    idle = stage.get("/users", activated="false", environment_id=ENV.lower()).json()
    assert [u["externalId"] for u in idle["users"]] == ["beta"]
    page = stage.get("/users", activated="true", environment_id=ENV, first="1").json()
    rest = stage.get(
        "/users", activated="true", environment_id=ENV, first="1", after=page["next"]
    ).json()
    assert [u["externalId"] for u in page["users"] + rest["users"]] == ["acme", "gamma"]
    assert rest["next"] == ""
    both = stage.get("/users", activated="true", environment_id=ENV, search="gam").json()
    assert [u["externalId"] for u in both["users"]] == ["gamma"]


@pytest.mark.parametrize(
    ("params", "field", "status"),
    [
        ({"activated": "true"}, "environment_id", 400),
        ({"environment_id": ENV}, "activated", 400),
        ({"activated": "yes", "environment_id": ENV}, "activated", 400),
        ({"activated": "True", "environment_id": ENV}, "activated", 400),
        ({"activated": "true", "environment_id": "prod"}, "environment_id", 400),
        ({"activated": "true", "environment_id": UNKNOWN}, None, 404),
    ],
)
def test_list_end_users_activation_filter_is_strict(
    stage: Stage, params: dict[str, str], field: str | None, status: int
) -> None:
    answer = stage.get("/users", **params)
    assert answer.status_code == status, answer.text
    assert fields(answer) == ([field] if field else [])


# --- a connection: read, update in place, delete -----------------------------------------------


def test_get_connection_is_the_listed_one(stage: Stage) -> None:
    made = stage.create("acme")
    [listed] = stage.get("/connections").json()["items"]
    assert stage.get(f"/connections/{made['id']}").json() == listed == made
    assert stage.get(f"/connections/{made['id'].lower()}").json() == made
    credential = made["credentials"][0]["credential"]
    assert credential["errors"] == [] and "expiresAt" not in credential
    assert stage.get(f"/connections/{UNKNOWN}").status_code == 404
    bad = stage.get("/connections/acme")
    assert bad.status_code == 400 and fields(bad) == ["connection_id"]


def test_a_v1_connection_is_not_found_on_the_v2_paths(stage: Stage) -> None:
    code, state = stage.code(DEMO_CONNECTOR)
    credential = {"type": "oauth2-code", "data": {"code": code, "state": state}}
    made = stage.http.post(
        f"/o/{ORG}/connectors/{DEMO_CONNECTOR.connector_id}/connections",
        json={"name": "v1", "credentials": {"action": [{"credential": credential}]}},
        headers=AUTH,
    ).json()
    assert stage.get(f"/connections/{made['id']}").status_code == 404
    assert stage.delete(f"/connections/{made['id']}").status_code == 404


def test_update_connection_gives_a_new_credential_in_place(stage: Stage) -> None:
    made = stage.create("acme", name="Acme")
    broken = stage.break_credential(
        made["id"], errors=["invalid_grant"], expiresAt="2020-01-01T00:00:00Z"
    )
    assert broken.status_code == 200
    body = update_body(stage, baseUrl="https://acme.example.com")
    updated = stage.put(f"/connections/{made['id']}", body)
    assert updated.status_code == 200, updated.text
    answer = updated.json()
    assert answer["id"] == made["id"] and answer["name"] == "Renamed"
    assert answer["baseUrl"] == "https://acme.example.com"
    assert answer["createdAt"] == made["createdAt"] and answer["updatedAt"] >= made["updatedAt"]
    assert answer["connectionTemplateId"] == TEMPLATE and answer["systemId"] == made["systemId"]
    [old], [new] = made["credentials"], answer["credentials"]
    assert new["id"] != old["id"] and new["credential"]["id"] != old["credential"]["id"]
    assert new["credential"]["errors"] == [] and "expiresAt" not in new["credential"]
    assert new["credential"]["name"] == "Renamed"
    assert stage.get(f"/connections/{made['id']}").json() == answer
    # The code is spent: the same body again is refused.
    again = stage.put(f"/connections/{made['id']}", body)
    assert again.status_code == 400 and again.json()["code"] == "invalid_grant"
    # The old name is free again, the new one taken.
    stage.create("beta", name="Acme")
    clash = stage.put(f"/connections/{made['id']}", update_body(stage, name="Acme"))
    assert clash.status_code == 409 and clash.json()["code"] == "conflict"


@pytest.mark.parametrize("missing", ["name", "credentials", "baseUrl"])
def test_update_connection_needs_name_credentials_and_base_url(stage: Stage, missing: str) -> None:
    made = stage.create("acme")
    body = update_body(stage)
    del body[missing]
    answer = stage.put(f"/connections/{made['id']}", body)
    assert answer.status_code == 400 and answer.json()["code"] == "validation_failed"
    assert [f for f in answer.json()["fields"] if f["message"] == "required"] == [
        {"field": missing, "message": "required"}
    ]
    assert stage.put(f"/connections/{made['id']}", {}).json()["fields"] == [
        {"field": "name", "message": "required"},
        {"field": "baseUrl", "message": "required"},
        {"field": "credentials", "message": "required"},
    ]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "name"),
        ({"baseUrl": "not a url"}, "baseUrl"),
        ({"baseUrl": 3}, "baseUrl"),
        ({"credentials": []}, "credentials"),
        ({"credentials": ["x"]}, "credentials[0]"),
        ({"credentials": [{"id": "x", "credential": {}}]}, "credentials[0].id"),
        ({"credentials": [{"credential": {"type": "oauth2-token"}}]}, None),
    ],
)
def test_update_connection_body_is_checked(
    stage: Stage, overrides: dict[str, Any], field: str | None
) -> None:
    made = stage.create("acme")
    answer = stage.put(f"/connections/{made['id']}", update_body(stage, **overrides))
    assert answer.status_code == 400, answer.text
    if field is not None:
        assert field in fields(answer)
    else:
        assert "credentials[0].credential.type" in fields(answer)
    two = update_body(stage)
    two["credentials"] *= 2
    assert fields(stage.put(f"/connections/{made['id']}", two)) == ["credentials"]


def test_update_connection_checks_the_code_as_create_connection_does(stage: Stage) -> None:
    made = stage.create("acme")
    path = f"/connections/{made['id']}"
    code = stage.code()
    # A refused request does not spend the code: unknown connection, wrong redirectUrl.
    assert stage.put(f"/connections/{UNKNOWN}", update_body(stage)).status_code == 404
    wrong = {**update_body(stage), "credentials": stage.credentials(code, "https://x.example")}
    answer = stage.put(path, wrong)
    assert fields(answer) == ["credentials[0].credential.data.redirectUrl"]
    other_state = stage.credentials((code[0], "another-state"))
    for credentials in (
        other_state,
        stage.credentials(stage.code(DEMO_SYSTEM)),  # a code of another system
        stage.credentials(("unknown-code", code[1])),
    ):
        answer = stage.put(path, update_body(stage, credentials=credentials))
        assert answer.status_code == 400 and answer.json()["code"] == "invalid_grant"
    assert stage.put(path, update_body(stage, credentials=stage.credentials(code))).is_success


def test_delete_connection_frees_its_template_and_name(stage: Stage) -> None:
    made = stage.create("acme", name="Acme")
    assert stage.delete(f"/connections/{made['id']}").status_code == 204
    assert stage.get(f"/connections/{made['id']}").status_code == 404
    assert stage.delete(f"/connections/{made['id']}").status_code == 404
    assert stage.get("/connections").json()["items"] == []
    again = stage.create("acme", name="Acme")  # no 409: the end user may connect again
    assert again["id"] != made["id"]
    assert stage.delete("/connections/acme").status_code == 400


def test_a_cursor_goes_on_past_a_deleted_connection(stage: Stage) -> None:
    ids = [stage.create(t)["id"] for t in ("a", "b", "c")]
    page = stage.get("/connections", first="2").json()
    assert [c["id"] for c in page["items"]] == ids[:2]
    stage.delete(f"/connections/{ids[1]}")
    rest = stage.get("/connections", first="2", after=page["next"]).json()
    assert [c["id"] for c in rest["items"]] == [ids[2]] and rest["totalCount"] == 2


# --- activations -------------------------------------------------------------------------------


def test_activate_an_end_user_and_read_it_back(stage: Stage) -> None:
    made = stage.create("acme")
    user = stage.user("acme")
    answer = stage.activate("acme", {TEMPLATE: made["id"]}, dynamicVariables={"region": "eu"})
    assert answer.status_code == 200, answer.text
    activation = answer.json()
    assert set(activation) == {
        "id",
        "user",
        "environmentId",
        "environment",
        "connections",
        "dynamicVariables",
        "createdAt",
        "updatedAt",
    }
    assert activation["user"] == user and activation["environmentId"] == ENV
    assert activation["environment"] == {"id": ENV, "name": "production"}
    assert activation["connections"] == [made]
    assert activation["dynamicVariables"] == {"region": "eu"}
    assert stage.get(f"/environments/{ENV}/activations").json() == [activation]
    assert stage.get(f"/environment/{ENV}/users/acme/activations").json() == [activation]
    one = stage.get(f"/environments/{ENV}/activations/{activation['id']}")
    assert one.json() == activation


def test_activate_takes_the_versori_id_too_and_a_second_is_409(stage: Stage) -> None:
    made = stage.create("acme")
    user = stage.user("acme")
    assert stage.activate(user["id"].lower(), {TEMPLATE: made["id"]}).status_code == 200
    again = stage.activate("acme", {TEMPLATE: made["id"]})
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    assert "acme" in again.json()["message"]
    assert len(stage.get(f"/environments/{ENV}/activations").json()) == 1


def test_activate_refuses_unknown_environments_and_end_users(stage: Stage) -> None:
    made = stage.create("acme")
    unknown_env = stage.activate("acme", {TEMPLATE: made["id"]}, environment=UNKNOWN)
    assert unknown_env.status_code == 404 and unknown_env.json()["code"] == "not_found"
    unknown_user = stage.activate("nobody", {TEMPLATE: made["id"]})
    assert unknown_user.status_code == 404 and "nobody" in unknown_user.json()["message"]
    for path in (
        f"/environments/{UNKNOWN}/activations",
        f"/environment/{UNKNOWN}/users/acme/activations",
    ):
        assert stage.get(path).status_code == 404
    assert stage.get("/environments/prod/activations").status_code == 400
    assert stage.get(f"/environment/{ENV}/users/nobody/activations").status_code == 404
    assert stage.get(f"/environment/{ENV}/users/acme/activations").json() == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, ["userId", "environmentId", "connections"]),
        (
            {"userId": "", "environmentId": "prod", "connections": {}},
            ["userId", "environmentId", "connections"],
        ),
        (
            {"userId": "acme", "environmentId": ENV, "connections": [{}, "x"]},
            [
                "connections[0].connectionTemplateId",
                "connections[0].existingConnectionId",
                "connections[1]",
            ],
        ),
        (
            {
                "userId": "acme",
                "environmentId": ENV,
                "connections": [{"connectionTemplateId": TEMPLATE, "connection": {"name": "x"}}],
                "dynamicVariables": [],
            },
            ["dynamicVariables", "connections[0].connection"],
        ),
    ],
)
def test_activate_body_is_checked(stage: Stage, body: dict[str, Any], expected: list[str]) -> None:
    stage.create("acme")
    answer = stage.http.post(f"/o/{ORG}/activations", json=body, headers=AUTH)
    assert answer.status_code == 400 and answer.json()["code"] == "validation_failed"
    assert fields(answer) == expected


def test_activate_needs_a_connection_for_every_system(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(two_systems())
    both = {e["id"]: e for e in stage.http.get("/_emulator/environments").json()["environments"]}
    crm_template = both[TWO_ENV]["systems"][0]["connectionTemplateId"]
    crm = stage.create("acme", template=crm_template)
    answer = stage.activate("acme", {crm_template: crm["id"]}, environment=TWO_ENV)
    assert answer.status_code == 422 and answer.json()["code"] == "unprocessable"
    [problem] = answer.json()["fields"]
    assert problem["field"] == "connections" and SLACK_TEMPLATE in problem["message"]
    assert DEMO_SYSTEM.connector_id in problem["message"]
    slack = stage.create("acme", template=SLACK_TEMPLATE, connector=DEMO_SYSTEM)
    # Given in any order; answered in the order of the environment's systems.
    links = {SLACK_TEMPLATE: slack["id"], crm_template: crm["id"]}
    done = stage.activate("acme", links, environment=TWO_ENV)
    assert done.status_code == 200, done.text
    assert [c["id"] for c in done.json()["connections"]] == [crm["id"], slack["id"]]
    assert done.json()["environment"]["name"] == "staging"
    # The demo environment is another: activating there is no 409.
    demo = stage.create("acme")
    assert stage.activate("acme", {TEMPLATE: demo["id"]}).status_code == 200


def test_activate_refuses_connections_that_are_not_the_end_users_or_the_templates(
    stage: Stage,
) -> None:
    mine = stage.create("acme")
    theirs = stage.create("beta")
    other_template = stage.create("acme", template=OTHER_TEMPLATE)
    cases = [
        ({TEMPLATE: theirs["id"]}, "connections[0].existingConnectionId", "end user acme"),
        ({TEMPLATE: other_template["id"]}, "connections[0].existingConnectionId", "template"),
        ({TEMPLATE: UNKNOWN}, "connections[0].existingConnectionId", "no such connection"),
        ({OTHER_TEMPLATE: other_template["id"]}, "connections[0].connectionTemplateId", ENV),
    ]
    for links, field, says in cases:
        answer = stage.activate("acme", links)
        assert answer.status_code == 422, answer.text
        found = {f["field"]: f["message"] for f in answer.json()["fields"]}
        assert field in found and says in found[field], found
    twice = stage.http.post(
        f"/o/{ORG}/activations",
        json={
            "userId": "acme",
            "environmentId": ENV,
            "connections": [
                {"connectionTemplateId": TEMPLATE, "existingConnectionId": mine["id"]},
                {"connectionTemplateId": TEMPLATE, "existingConnectionId": mine["id"]},
            ],
        },
        headers=AUTH,
    )
    assert twice.status_code == 422
    assert fields(twice) == ["connections[1].connectionTemplateId"]
    assert stage.get(f"/environments/{ENV}/activations").json() == []


def test_activate_refuses_a_broken_or_expired_credential(stage: Stage) -> None:
    made = stage.create("acme")
    stage.break_credential(made["id"], errors=["token revoked"])
    broken = stage.activate("acme", {TEMPLATE: made["id"]})
    assert broken.status_code == 422 and "token revoked" in broken.text
    stage.break_credential(made["id"], errors=[], expiresAt="2001-01-01T00:00:00+00:00")
    expired = stage.activate("acme", {TEMPLATE: made["id"]})
    assert expired.status_code == 422 and "expired" in expired.text
    stage.break_credential(made["id"], expiresAt="2999-01-01T00:00:00Z")
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 200


def test_a_held_connection_is_not_deleted_until_its_activation_is(stage: Stage) -> None:
    made = stage.create("acme")
    activation = stage.activate("acme", {TEMPLATE: made["id"]}).json()
    refused = stage.delete(f"/connections/{made['id']}")
    assert refused.status_code == 409 and activation["id"] in refused.json()["message"]
    assert stage.get(f"/connections/{made['id']}").status_code == 200
    path = f"/environments/{ENV}/activations/{activation['id']}"
    assert stage.delete(path).status_code == 204
    assert stage.get(path).status_code == 404 and stage.delete(path).status_code == 404
    assert stage.delete(f"/connections/{made['id']}").status_code == 204
    again = stage.create("acme")
    assert stage.activate("acme", {TEMPLATE: again["id"]}).status_code == 200


def test_get_activation_checks_its_ids(stage: Stage) -> None:
    made = stage.create("acme")
    activation = stage.activate("acme", {TEMPLATE: made["id"]}).json()
    assert stage.get(f"/environments/{ENV}/activations/{UNKNOWN}").status_code == 404
    bad = stage.get(f"/environments/{ENV}/activations/x")
    assert bad.status_code == 400 and fields(bad) == ["activation_id"]
    wrong_env = stage.get(f"/environments/{UNKNOWN}/activations/{activation['id']}")
    assert wrong_env.status_code == 404


def test_every_new_endpoint_needs_the_api_key(stage: Stage) -> None:
    made = stage.create("acme")
    user = stage.user("acme")
    requests = [
        ("GET", f"/o/{ORG}/users/{user['id']}"),
        ("GET", f"/o/{ORG}/connections/{made['id']}"),
        ("PUT", f"/o/{ORG}/connections/{made['id']}"),
        ("DELETE", f"/o/{ORG}/connections/{made['id']}"),
        ("POST", f"/o/{ORG}/activations"),
        ("GET", f"/o/{ORG}/environments/{ENV}/activations"),
        ("GET", f"/o/{ORG}/environments/{ENV}/activations/{UNKNOWN}"),
        ("DELETE", f"/o/{ORG}/environments/{ENV}/activations/{UNKNOWN}"),
        ("GET", f"/o/{ORG}/environment/{ENV}/users/acme/activations"),
    ]
    for method, path in requests:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = stage.http.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path)
            assert answer.json()["code"] == "unauthenticated"
    assert stage.get(f"/connections/{made['id']}").status_code == 200


def test_update_connection_redirect_url_must_be_the_states(stage: Stage) -> None:
    made = stage.create("acme")
    code = stage.code()
    body = update_body(stage, credentials=stage.credentials(code, CALLBACK + "/"))
    assert stage.put(f"/connections/{made['id']}", body).status_code == 400
    body = update_body(stage, credentials=stage.credentials(code))
    assert stage.put(f"/connections/{made['id']}", body).status_code == 200
