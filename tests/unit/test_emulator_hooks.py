"""The emulator's test and demo hooks on the Platform API v2 over real HTTP: a connection made
"elsewhere", a credential broken or expired, a connection deleted out of band, ActivateUser's
scripted faults, the per-endpoint call counts, and the environments of the config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from demo.emulator import EmulatorConfig, EmulatorServer, load_script
from demo.emulator_config import (
    DEMO_CONNECTOR,
    DEMO_CRM,
    DEMO_ENVIRONMENT,
    DEMO_SYSTEM,
    EmulatedEnvironment,
)
from tests.platform_stage import (
    AUTH,
    CRM,
    ENV,
    ORG,
    SLACK,
    TEMPLATE,
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


def elsewhere(stage: Stage, **body: Any) -> Any:
    return stage.http.post("/_emulator/connections", json={"systemId": CRM, **body})


# --- (a) a connection made elsewhere -----------------------------------------------------------


def test_a_connection_made_elsewhere_is_the_end_users_without_a_code(stage: Stage) -> None:
    answer = elsewhere(stage, externalId="acme")
    assert answer.status_code == 201, answer.text
    made, user = answer.json()["connection"], answer.json()["user"]
    assert user["externalId"] == "acme" and stage.user("acme") == user
    assert made["connectionTemplateId"] == TEMPLATE, "the system's template in the demo env"
    assert made["systemId"] == CRM and made["name"] == "acme (made in Versori)"
    assert made["credentials"][0]["credential"]["errors"] == []
    assert stage.get(f"/connections/{made['id']}").json() == made
    assert stage.get("/connections", end_user_id=user["id"]).json()["items"] == [made]
    [record] = stage.http.get("/_emulator/connections").json()["connections"]
    assert record["elsewhere"] is True
    assert stage.http.get("/_emulator/stats").json()["states_issued"] == 0
    # Our callback's CreateConnection for the same end user and template is now a 409.
    code = stage.code()
    body = {
        "connectionTemplateId": TEMPLATE,
        "externalId": "acme",
        "connection": {"name": "Acme", "credentials": stage.credentials(code)},
    }
    clash = stage.http.post(f"/o/{ORG}/connections", json=body, headers=AUTH)
    assert clash.status_code == 409 and clash.json()["code"] == "conflict"
    # And it activates like any other.
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 200


def test_a_connection_made_elsewhere_takes_its_ids_and_name(
    start: Callable[[EmulatorConfig], Stage],
) -> None:
    stage = start(two_systems())
    answer = stage.http.post(
        "/_emulator/connections",
        json={
            "externalId": "acme",
            "systemId": SLACK,
            "organisationId": ORG,
            "connectionTemplateId": UNKNOWN.lower(),
            "name": "Acme in Slack",
        },
    )
    assert answer.status_code == 201, answer.text
    made = answer.json()["connection"]
    assert made["connectionTemplateId"] == UNKNOWN and made["name"] == "Acme in Slack"
    again = stage.http.post(
        "/_emulator/connections",
        json={"externalId": "beta", "systemId": SLACK, "name": "Acme in Slack"},
    )
    assert again.status_code == 409, "the name is taken in the system"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"systemId": CRM}, "externalId"),
        ({"externalId": "acme"}, "systemId"),
        ({"externalId": "acme", "systemId": UNKNOWN}, "systemId"),
        ({"externalId": "acme", "systemId": CRM, "organisationId": UNKNOWN}, "systemId"),
        (
            {"externalId": "acme", "systemId": CRM, "connectionTemplateId": "x"},
            "connectionTemplateId",
        ),
        ({"externalId": "acme", "systemId": CRM, "name": ""}, "name"),
        ({"externalId": "acme", "systemId": CRM, "colour": "red"}, "colour"),
        # A system of no environment: its template must be given.
        ({"externalId": "acme", "systemId": DEMO_SYSTEM.connector_id}, "connectionTemplateId"),
    ],
)
def test_a_connection_made_elsewhere_is_checked(
    stage: Stage, body: dict[str, Any], field: str
) -> None:
    answer = stage.http.post("/_emulator/connections", json=body)
    assert answer.status_code == 400, answer.text
    assert field in fields(answer)
    assert stage.http.get("/_emulator/connections").json()["connections"] == []


def test_a_second_connection_elsewhere_of_the_same_template_is_409(stage: Stage) -> None:
    assert elsewhere(stage, externalId="acme").status_code == 201
    clash = elsewhere(stage, externalId="acme", name="another")
    assert clash.status_code == 409 and "acme" in clash.json()["message"]


# --- (b) a credential broken or expired --------------------------------------------------------


def test_a_credential_broken_expired_and_unknown(stage: Stage) -> None:
    made = stage.create("acme")
    path = f"/connections/{made['id']}"
    broken = stage.break_credential(made["id"], errors=["refresh failed: invalid_grant"])
    assert broken.status_code == 200
    credential = stage.get(path).json()["credentials"][0]["credential"]
    assert credential["errors"] == ["refresh failed: invalid_grant"]
    assert broken.json() == stage.get(path).json()
    stage.break_credential(made["id"], expiresAt="2020-01-01T00:00:00Z")
    credential = stage.get(path).json()["credentials"][0]["credential"]
    assert credential["expiresAt"] == "2020-01-01T00:00:00+00:00"
    assert credential["errors"] == ["refresh failed: invalid_grant"], "left as it was"
    stage.break_credential(made["id"], errors=None, expiresAt=None)
    credential = stage.get(path).json()["credentials"][0]["credential"]
    assert "errors" not in credential and "expiresAt" not in credential, "never validated"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, ""),
        ({"errors": "broken"}, "errors"),
        ({"errors": [1]}, "errors"),
        ({"expiresAt": "yesterday"}, "expiresAt"),
        ({"expiresAt": "2020-01-01T00:00:00"}, "expiresAt"),  # no zone
        ({"errors": [], "status": "broken"}, "status"),
    ],
)
def test_a_credential_hook_is_checked(stage: Stage, body: dict[str, Any], field: str) -> None:
    made = stage.create("acme")
    answer = stage.break_credential(made["id"], **body)
    assert answer.status_code == 400 and fields(answer) == [field]
    assert stage.break_credential(UNKNOWN, errors=[]).status_code == 404
    assert stage.break_credential("acme", errors=[]).status_code == 404


# --- (c) a connection deleted out of band ------------------------------------------------------


def test_a_held_connection_deleted_out_of_band_leaves_its_activation_without_it(
    stage: Stage,
) -> None:
    made = stage.create("acme")
    activation = stage.activate("acme", {TEMPLATE: made["id"]}).json()
    gone = stage.http.delete(f"/_emulator/connections/{made['id']}")
    assert gone.status_code == 204
    assert stage.http.delete(f"/_emulator/connections/{made['id']}").status_code == 404
    assert stage.get(f"/connections/{made['id']}").status_code == 404
    [listed] = stage.get(f"/environments/{ENV}/activations").json()
    assert listed["id"] == activation["id"] and listed["connections"] == []
    assert stage.get(f"/environment/{ENV}/users/acme/activations").json() == [listed]
    [kept] = stage.http.get("/_emulator/activations").json()["activations"]
    assert kept["links"] == [{"connectionTemplateId": TEMPLATE, "connectionId": made["id"]}]
    # Still activated (409), until the activation is deleted; a new connection may be made.
    again = stage.create("acme")
    assert stage.activate("acme", {TEMPLATE: again["id"]}).status_code == 409
    assert stage.delete(f"/environments/{ENV}/activations/{activation['id']}").status_code == 204
    fresh = stage.activate("acme", {TEMPLATE: again["id"]})
    assert fresh.status_code == 200 and fresh.json()["connections"][0]["id"] == again["id"]


# --- (d) ActivateUser's scripted faults --------------------------------------------------------


def test_an_activation_refused_once_then_made(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(activate_script={"acme": ["409", "ok"]}))
    made = stage.create("acme")
    refused = stage.activate("acme", {TEMPLATE: made["id"]})
    assert refused.status_code == 409 and refused.json()["code"] == "conflict"
    assert refused.json()["details"] == "injected by the emulator script"
    assert stage.get(f"/environments/{ENV}/activations").json() == []
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 200
    assert stage.http.get("/_emulator/activations").json()["faults"] == {"409": 1, "ok": 1}
    other = stage.create("beta")
    assert stage.activate("beta", {TEMPLATE: other["id"]}).status_code == 200, "not matched"


@pytest.mark.parametrize(
    ("action", "status", "code"),
    [
        ("400", 400, "validation_failed"),
        ("403", 403, "forbidden"),
        ("404", 404, "not_found"),
        ("422", 422, "unprocessable"),
        ("429", 429, "rate_limited"),
        ("500", 500, "internal"),
        ("503", 503, "unavailable"),
    ],
)
def test_each_scripted_refusal(
    start: Callable[[EmulatorConfig], Stage], action: str, status: int, code: str
) -> None:
    stage = start(EmulatorConfig(activate_script={"acm": [action]}))
    made = stage.create("acme")
    user = stage.user("acme")
    # Matched on the end user's externalId even when the request names its Versori id.
    refused = stage.activate(user["id"], {TEMPLATE: made["id"]})
    assert refused.status_code == status and refused.json()["code"] == code
    assert ("Retry-After" in refused.headers) == (status == 429)
    assert stage.get(f"/environments/{ENV}/activations").json() == []
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 200


def test_500_after_makes_the_activation(start: Callable[[EmulatorConfig], Stage]) -> None:
    stage = start(EmulatorConfig(script={"activate:acme": ["500_after"]}))
    made = stage.create("acme")
    failed = stage.activate("acme", {TEMPLATE: made["id"]})
    assert failed.status_code == 500
    [activation] = stage.get(f"/environments/{ENV}/activations").json()
    assert activation["connections"] == [made]
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 409


def test_the_activate_script_in_the_config_and_a_script_file(tmp_path: Path) -> None:
    config = EmulatorConfig(
        script={"tenant=a": ["503"], "create:acme": ["409"], "activate:acme": ["422", "ok"]},
        activate_script={"beta": ["500*"]},
    )
    assert config.script == {"tenant=a": ["503"]}
    assert config.create_script == {"acme": ["409"]}
    assert config.activate_script == {"beta": ["500*"], "acme": ["422", "ok"]}
    path = tmp_path / "faults.yaml"
    path.write_text('"activate:acme": [409, ok]\n')
    assert EmulatorConfig(script=load_script(path)).activate_script == {"acme": ["409", "ok"]}


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"activate_script": {"acme": ["stall"]}}, "activate_script"),
        ({"activate_script": {"acme": ["slow_after"]}}, "activate_script"),
        ({"activate_script": ["409"]}, "activate_script"),
        ({"script": {"activate:acme": ["bad_url"]}}, "script"),
        ({"script": {"activate:": ["409"]}}, "script"),
        ({"script": {"acme": ["422"]}}, "script"),
    ],
)
def test_activate_script_validation(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=f"^{says}"):
        EmulatorConfig(**kwargs)


def test_the_cli_reads_activate_entries_from_the_script_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.cli import app

    served: list[EmulatorConfig] = []
    monkeypatch.setattr(
        "demo.emulator.run_emulator", lambda config, host, port: served.append(config)
    )
    path = tmp_path / "faults.yaml"
    path.write_text('"activate:acme": [409, ok]\n')
    result = CliRunner().invoke(app, ["emulator", "--script", str(path)])
    assert result.exit_code == 0, result.output
    assert served[0].activate_script == {"acme": ["409", "ok"]}
    assert served[0].environments == (DEMO_ENVIRONMENT,)


# --- calls counted per endpoint ----------------------------------------------------------------


def test_every_versori_call_is_counted_per_endpoint(stage: Stage) -> None:
    made = stage.create("acme")  # an initialise and a CreateConnection
    user = stage.user("acme")
    stage.get(f"/users/{user['id']}")
    stage.get(f"/connections/{made['id']}")
    stage.http.get(f"/o/{ORG}/connections/{made['id']}")  # 401: counted too
    stage.put(f"/connections/{made['id']}", {})
    stage.activate("acme", {TEMPLATE: made["id"]})
    stage.get(f"/environments/{ENV}/activations")
    stage.get(f"/environments/{ENV}/activations/{UNKNOWN}")
    stage.get(f"/environment/{ENV}/users/a%2Fb/activations")
    stage.delete(f"/environments/{ENV}/activations/{UNKNOWN}")
    stage.delete(f"/connections/{made['id']}")
    stage.break_credential(made["id"], errors=[])  # a hook: not a Versori call
    org = "/o/{organisation_id}"
    expected = {
        f"POST {org}/systems/{{system_id}}/oauth2/initialise": 1,
        f"POST {org}/connections": 1,
        f"GET {org}/users": 1,
        f"GET {org}/users/{{user_id}}": 1,
        f"GET {org}/connections/{{connection_id}}": 2,
        f"PUT {org}/connections/{{connection_id}}": 1,
        f"POST {org}/activations": 1,
        f"GET {org}/environments/{{environment_id}}/activations": 1,
        f"GET {org}/environments/{{environment_id}}/activations/{{activation_id}}": 1,
        f"DELETE {org}/environments/{{environment_id}}/activations/{{activation_id}}": 1,
        f"GET {org}/environment/{{environment_id}}/users/{{external_user_id}}/activations": 1,
        f"DELETE {org}/connections/{{connection_id}}": 1,
    }
    assert stage.calls() == expected
    assert stage.http.get("/_emulator/calls").json()["total"] == sum(expected.values())
    assert stage.server.calls() == expected
    stage.http.post("/_emulator/reset").raise_for_status()
    assert stage.calls() == {}
    assert stage.http.get("/_emulator/activations").json() == {"activations": [], "faults": {}}


def test_v1_calls_are_counted_too(stage: Stage) -> None:
    stage.code(DEMO_CONNECTOR)
    stage.http.get(f"/o/{ORG}/connectors/{DEMO_CONNECTOR.connector_id}/connections", headers=AUTH)
    assert stage.calls() == {
        "POST /o/{organisation_id}/connectors/{connector_id}/oauth2/initialise": 1,
        "GET /o/{organisation_id}/connectors/{connector_id}/connections": 1,
    }


# --- environments in the config ----------------------------------------------------------------


def test_the_default_environment_is_the_connect_services_system(stage: Stage) -> None:
    [environment] = stage.http.get("/_emulator/environments").json()["environments"]
    assert environment == {
        "id": ENV,
        "organisationId": ORG,
        "name": "production",
        "systems": [{"systemId": DEMO_CRM.connector_id, "connectionTemplateId": TEMPLATE}],
    }


def test_environments_of_the_config_are_checked() -> None:
    assert EmulatorConfig(connectors=(DEMO_CONNECTOR,)).environments == ()
    assert EmulatorConfig(environments=()).environments == ()
    lower = EmulatedEnvironment(ORG, ENV.lower(), {CRM.lower(): TEMPLATE.lower()})  # type: ignore[arg-type]
    assert lower.environment_id == ENV and lower.systems == ((CRM, TEMPLATE),)
    with pytest.raises(ValueError, match="not a connector"):
        EmulatorConfig(connectors=(DEMO_CONNECTOR,), environments=(DEMO_ENVIRONMENT,))
    twin = EmulatedEnvironment(ORG, UNKNOWN, ((SLACK, TEMPLATE),))
    with pytest.raises(ValueError, match="more than one environment"):
        EmulatorConfig(environments=(DEMO_ENVIRONMENT, twin))
    with pytest.raises(ValueError, match="more than once"):
        EmulatorConfig(environments=(DEMO_ENVIRONMENT, DEMO_ENVIRONMENT))
    for systems in ((), ((CRM, "x"),), ((CRM, TEMPLATE), (CRM, UNKNOWN))):
        with pytest.raises(ValueError, match="environment"):
            EmulatedEnvironment(ORG, UNKNOWN, systems)
    with pytest.raises(ValueError, match="environment_id"):
        EmulatedEnvironment(ORG, "prod", ((CRM, TEMPLATE),))


def test_reset_forgets_activations(stage: Stage) -> None:
    made = stage.create("acme")
    assert stage.activate("acme", {TEMPLATE: made["id"]}).status_code == 200
    stage.http.post("/_emulator/reset").raise_for_status()
    assert stage.get(f"/environments/{ENV}/activations").json() == []
    again = stage.create("acme")
    assert stage.activate("acme", {TEMPLATE: again["id"]}).status_code == 200
