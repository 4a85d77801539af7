"""The emulator over real HTTP: the URL contract, every error class, and the fault injection."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from onboarding.demo.emulator import (
    DEFAULT_API_KEY,
    DEMO_CONNECTOR,
    EmulatedConnector,
    EmulatorConfig,
    EmulatorServer,
)

pytestmark = pytest.mark.timeout(60)

PATH = (
    f"/o/{DEMO_CONNECTOR.organisation_id}/connectors/{DEMO_CONNECTOR.connector_id}"
    "/oauth2/initialise"
)
AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
AUTHORIZE_URL = "https://login.example.com/oauth2/authorize"
URLSAFE = re.compile(r"^[A-Za-z0-9_-]{43,}$")
# The `start` fixture: a server of its own config, and a client to it.
StartServer = Callable[[EmulatorConfig], tuple[EmulatorServer, httpx.Client]]


def body(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "credential": {
            "id": DEMO_CONNECTOR.credential_id,
            "organisationId": DEMO_CONNECTOR.credential_organisation_id,
        },
        "authorizeUrl": AUTHORIZE_URL,
        "clientId": DEMO_CONNECTOR.client_id,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def field_names(response: httpx.Response) -> set[str]:
    return {f["field"] for f in response.json()["fields"]}


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer() as running:
        yield running


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5.0) as http:
        http.post("/_emulator/reset").raise_for_status()
        yield http


@pytest.fixture
def start() -> Iterator[StartServer]:
    """Start a server with its own config; stopped at teardown even if the test fails."""
    servers: list[EmulatorServer] = []

    def _start(config: EmulatorConfig) -> tuple[EmulatorServer, httpx.Client]:
        running = EmulatorServer(config).start()
        servers.append(running)
        return running, httpx.Client(base_url=running.base_url, timeout=5.0)

    yield _start
    for running in servers:
        running.stop()


# --- success -----------------------------------------------------------------------------------


def test_success_url_has_every_parameter_once(client: httpx.Client) -> None:
    response = client.post(PATH, json=body(scopes=["read", "write"]), headers=AUTH)
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == AUTHORIZE_URL
    pairs = query(url)
    counts = Counter(k for k, _ in pairs)
    assert set(counts) == {"response_type", "client_id", "redirect_uri", "state", "scope", "prompt"}
    assert all(n == 1 for n in counts.values()), counts
    params = dict(pairs)
    assert params["response_type"] == "code"
    assert params["client_id"] == DEMO_CONNECTOR.client_id
    assert params["redirect_uri"] == DEMO_CONNECTOR.redirect_uri
    assert params["scope"] == "read write offline_access"
    assert params["prompt"] == "login"
    assert URLSAFE.match(params["state"])
    # Spaces and slashes are percent-encoded, never '+' or raw.
    assert "scope=read%20write%20offline_access" in url
    assert "redirect_uri=https%3A%2F%2F" in url


def test_state_is_recorded_and_unique(client: httpx.Client) -> None:
    states = set()
    for _ in range(3):
        url = client.post(PATH, json=body(), headers=AUTH).json()["url"]
        states.add(dict(query(url))["state"])
    assert len(states) == 3
    state = states.pop()
    record = client.get(f"/_emulator/states/{state}").json()
    assert record["organisation_id"] == DEMO_CONNECTOR.organisation_id
    assert record["connector_id"] == DEMO_CONNECTOR.connector_id
    assert record["credential_id"] == DEMO_CONNECTOR.credential_id
    assert record["client_id"] == DEMO_CONNECTOR.client_id
    assert record["authorize_url"] == AUTHORIZE_URL
    assert record["issued_at"]
    missing = client.get("/_emulator/states/not-a-state")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"


@pytest.mark.parametrize(
    ("extra", "expected_scope"),
    [
        ({}, "offline_access"),
        ({"scopes": ["a"], "disableOfflineAccess": True}, "a"),
        ({"scopes": ["offline_access", "a"]}, "offline_access a"),
        ({"scopes": [], "disableOfflineAccess": True}, None),
    ],
)
def test_offline_access(
    client: httpx.Client, extra: dict[str, Any], expected_scope: str | None
) -> None:
    response = client.post(PATH, json=body(**extra), headers=AUTH)
    assert response.status_code == 200, response.text
    scopes = parse_qs(urlsplit(response.json()["url"]).query).get("scope")
    assert scopes == ([expected_scope] if expected_scope is not None else None)


def test_prompt_given_default_and_suppressed(client: httpx.Client) -> None:
    given = client.post(PATH, json=body(prompt="consent"), headers=AUTH).json()["url"]
    assert parse_qs(urlsplit(given).query)["prompt"] == ["consent"]
    default = client.post(PATH, json=body(), headers=AUTH).json()["url"]
    assert parse_qs(urlsplit(default).query)["prompt"] == ["login"]
    legacy = client.post(
        PATH, json=body(additionalParams="approval_prompt=force"), headers=AUTH
    ).json()["url"]
    params = parse_qs(urlsplit(legacy).query)
    assert "prompt" not in params
    assert params["approval_prompt"] == ["force"]


def test_endpoint_query_kept_and_additional_params_appended(client: httpx.Client) -> None:
    response = client.post(
        PATH,
        json=body(
            authorizeUrl="https://login.example.com/authorize?tenant=acme&x=1",
            additionalParams="access_type=offline&audience=https%3A%2F%2Fapi.example.com&e=",
        ),
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    assert url.startswith("https://login.example.com/authorize?tenant=acme&x=1&response_type=code")
    pairs = query(url)
    assert pairs[:2] == [("tenant", "acme"), ("x", "1")]
    assert pairs[-3:] == [
        ("access_type", "offline"),
        ("audience", "https://api.example.com"),
        ("e", ""),
    ]


def test_lowercase_ulids_are_accepted(client: httpx.Client) -> None:
    credential = {
        "id": DEMO_CONNECTOR.credential_id.lower(),
        "organisationId": DEMO_CONNECTOR.credential_organisation_id.lower(),
    }
    response = client.post(PATH, json=body(credential=credential), headers=AUTH)
    assert response.status_code == 200, response.text


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-secret-key-1234"},
        {"Authorization": f"Basic {DEFAULT_API_KEY}"},
        {"Authorization": "Bearer"},
    ],
)
def test_unauthenticated(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.post(PATH, json=body(), headers=headers)
    assert response.status_code == 401
    payload = response.json()
    assert payload["code"] == "unauthenticated"
    assert "Bearer" in payload["message"]
    assert "wrong-secret-key-1234" not in response.text
    assert DEFAULT_API_KEY not in response.text


def test_auth_is_checked_before_anything_else(client: httpx.Client) -> None:
    response = client.post("/o/x/connectors/y/oauth2/initialise", content=b"{")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "names"),
    [
        (f"/o/01M8F12B95S4BX0QFB3TPDWZ0Z/connectors/{DEMO_CONNECTOR.connector_id}", "organisation"),
        (f"/o/{DEMO_CONNECTOR.organisation_id}/connectors/01M8F12B95S4BX0QFB3TPDWZ0Z", "connector"),
    ],
)
def test_unknown_organisation_or_connector(client: httpx.Client, path: str, names: str) -> None:
    response = client.post(f"{path}/oauth2/initialise", json=body(), headers=AUTH)
    assert response.status_code == 404
    payload = response.json()
    assert payload["code"] == "not_found"
    assert payload["message"].startswith(names)


@pytest.mark.parametrize("key", ["id", "organisationId"])
def test_unknown_credential(client: httpx.Client, key: str) -> None:
    credential = {
        "id": DEMO_CONNECTOR.credential_id,
        "organisationId": DEMO_CONNECTOR.credential_organisation_id,
        key: "01M8F12B95S4BX0QFB3TPDWZ0Z",
    }
    response = client.post(PATH, json=body(credential=credential), headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"code": "not_found", "message": "credential not found"}


def test_client_id_mismatch(client: httpx.Client) -> None:
    response = client.post(PATH, json=body(clientId="someone-else"), headers=AUTH)
    assert response.status_code == 400
    assert response.json() == {
        "code": "validation_failed",
        "message": "request body is invalid",
        "fields": [
            {
                "field": "clientId",
                "message": "does not match the client id stored under the credential",
            }
        ],
    }


def test_every_field_error_reported_at_once(client: httpx.Client) -> None:
    bad = {
        "credential": {"id": "nope"},
        "authorizeUrl": "ftp://login.example.com/authorize",
        "clientId": "",
        "scopes": ["a", "b", 3],
        "disableOfflineAccess": "yes",
        "prompt": 5,
        "additionalParams": "a=1&&b",
        "surprise": True,
    }
    response = client.post(PATH, json=bad, headers=AUTH)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == "validation_failed"
    assert payload["message"] == "request body is invalid"
    assert field_names(response) == {
        "credential.id",
        "credential.organisationId",
        "authorizeUrl",
        "clientId",
        "scopes[2]",
        "disableOfflineAccess",
        "prompt",
        "additionalParams",
        "surprise",
    }
    assert {"field": "surprise", "message": "unknown field"} in payload["fields"]


def test_missing_required_fields(client: httpx.Client) -> None:
    response = client.post(PATH, json={}, headers=AUTH)
    assert response.status_code == 400
    assert field_names(response) == {"credential", "authorizeUrl", "clientId"}


@pytest.mark.parametrize(
    "authorize_url",
    [
        "login.example.com/authorize",
        "/authorize",
        "https:///authorize",
        "https://login.example.com/authorize#frag",
        "https://login.example.com/author ize",
        "javascript:alert(1)",
    ],
)
def test_bad_authorize_url(client: httpx.Client, authorize_url: str) -> None:
    response = client.post(PATH, json=body(authorizeUrl=authorize_url), headers=AUTH)
    assert response.status_code == 400
    assert field_names(response) == {"authorizeUrl"}


def test_additional_params_clash(client: httpx.Client) -> None:
    response = client.post(
        PATH, json=body(additionalParams="state=x&foo=1&client_id=y"), headers=AUTH
    )
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == "validation_failed"
    [error] = payload["fields"]
    assert error["field"] == "additionalParams"
    assert "client_id" in error["message"]
    assert "state" in error["message"]
    assert "foo" not in error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe"])
def test_invalid_body(client: httpx.Client, content: bytes) -> None:
    response = client.post(
        PATH, content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_body"


def test_unknown_route_answers_in_versori_shape(client: httpx.Client) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    wrong_method = client.get(PATH, headers=AUTH)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"ok": True}


# --- fault injection ---------------------------------------------------------------------------


def test_latency(start: Any) -> None:
    _, http = start(EmulatorConfig(latency_ms=200))
    with http:
        began = time.perf_counter()
        response = http.post(PATH, json=body(), headers=AUTH)
        elapsed = time.perf_counter() - began
    assert response.status_code == 200
    assert elapsed >= 0.15


def test_error_rate_one_always_fails(start: Any) -> None:
    running, http = start(EmulatorConfig(error_rate=1.0, seed=7))
    with http:
        responses = [http.post(PATH, json=body(), headers=AUTH) for _ in range(5)]
    assert [r.status_code for r in responses] == [503] * 5
    assert {r.json()["code"] for r in responses} == {"unavailable"}
    assert running.stats()["states_issued"] == 0


def test_error_rate_is_reproducible_with_a_seed(start: Any) -> None:
    outcomes = []
    for _ in range(2):
        _, http = start(EmulatorConfig(error_rate=0.5, seed=42))
        with http:
            outcomes.append(
                [http.post(PATH, json=body(), headers=AUTH).status_code for _ in range(20)]
            )
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 503}


def test_rate_limit(start: Any) -> None:
    running, http = start(EmulatorConfig(rate_limit=5))
    with http:
        responses = [http.post(PATH, json=body(), headers=AUTH) for _ in range(30)]
    statuses = Counter(r.status_code for r in responses)
    assert statuses[200] >= 5
    assert statuses[429] > 0
    assert set(statuses) == {200, 429}
    for response in responses:
        if response.status_code == 429:
            assert response.json()["code"] == "rate_limited"
            retry_after = response.headers["Retry-After"]
            assert retry_after.isdigit()
            assert int(retry_after) >= 1
    stats = running.stats()
    assert stats["requests"] == 30
    assert stats["by_status"] == {"200": statuses[200], "429": statuses[429]}


def test_rate_limit_under_concurrency(start: Any) -> None:
    import asyncio

    running, http = start(EmulatorConfig(rate_limit=10))
    http.close()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=5.0) as client:
            responses = await asyncio.gather(
                *(client.post(PATH, json=body(), headers=AUTH) for _ in range(40))
            )
        return [r.status_code for r in responses]

    statuses = Counter(asyncio.run(burst()))
    # A full bucket of 10 plus whatever refilled during the burst; never the whole burst.
    assert 10 <= statuses[200] < 40
    assert statuses[200] + statuses[429] == 40


def test_script_sequence_per_tenant(start: StartServer) -> None:
    running, http = start(
        EmulatorConfig(script={"tenant=acme": ["503", "503", "ok"], "tenant=doom": ["500*"]})
    )
    acme = body(additionalParams="tenant=acme")
    other_acme = body(authorizeUrl="https://other.example.com/auth", additionalParams="tenant=acme")
    doom = body(additionalParams="tenant=doom")
    plain = body()
    with http:

        def status(payload: dict[str, Any]) -> int:
            return http.post(PATH, json=payload, headers=AUTH).status_code

        assert status(acme) == 503
        assert status(other_acme) == 503  # its own cursor, not acme's
        assert status(plain) == 200  # unscripted tenants are untouched
        assert status(acme) == 503
        assert status(acme) == 200  # "ok"
        assert status(acme) == 200  # list exhausted: normal behaviour
        assert [status(doom) for _ in range(4)] == [500] * 4

        scripted = http.post(PATH, json=doom, headers=AUTH).json()
        assert scripted["code"] == "internal"
        assert "details" in scripted

        http.post("/_emulator/reset").raise_for_status()
        assert status(acme) == 503  # reset rewinds the script
    assert running.stats()["by_status"] == {"503": 1}


@pytest.mark.parametrize(
    ("action", "expected_status", "expected_code"),
    [
        ("500", 500, "internal"),
        ("502", 502, "bad_gateway"),
        ("503", 503, "unavailable"),
        ("429", 429, "rate_limited"),
        ("400", 400, "validation_failed"),
    ],
)
def test_script_error_actions(
    start: Any, action: str, expected_status: int, expected_code: str
) -> None:
    _, http = start(EmulatorConfig(script={"login.example.com": [action]}))
    with http:
        response = http.post(PATH, json=body(), headers=AUTH)
    assert response.status_code == expected_status
    assert response.json()["code"] == expected_code
    if expected_status == 429:
        assert response.headers["Retry-After"] == "1"


def test_script_bad_url(start: Any) -> None:
    running, http = start(EmulatorConfig(script={"tenant=bad": ["bad_url"]}))
    with http:
        response = http.post(PATH, json=body(additionalParams="tenant=bad"), headers=AUTH)
        follow_up = http.post(PATH, json=body(additionalParams="tenant=bad"), headers=AUTH)
    assert response.status_code == 200
    params = parse_qs(urlsplit(response.json()["url"]).query)
    assert "state" not in params
    assert params["client_id"] == [DEMO_CONNECTOR.client_id]
    assert "state" in parse_qs(urlsplit(follow_up.json()["url"]).query)
    assert running.stats()["states_issued"] == 1


def test_script_runs_after_validation(start: Any) -> None:
    _, http = start(EmulatorConfig(script={"tenant=acme": ["503*"]}))
    with http:
        response = http.post(
            PATH, json=body(additionalParams="tenant=acme", clientId="wrong"), headers=AUTH
        )
    assert response.status_code == 400


# --- stats, reset, server ----------------------------------------------------------------------


def test_stats_and_reset(start: Any) -> None:
    running, http = start(EmulatorConfig())
    with http:
        http.post(PATH, json=body(), headers=AUTH)
        http.post(PATH, json=body(), headers=AUTH)
        http.post(PATH, json=body())
        http.get("/healthz")
        stats = http.get("/_emulator/stats").json()
        assert stats == {"requests": 3, "by_status": {"200": 2, "401": 1}, "states_issued": 2}
        assert running.stats() == stats
        assert http.post("/_emulator/reset").status_code == 200
        assert http.get("/_emulator/stats").json() == {
            "requests": 0,
            "by_status": {},
            "states_issued": 0,
        }
    assert running.app.state.states == {}


def test_server_lifecycle_and_port_in_use() -> None:
    server = EmulatorServer()
    with pytest.raises(RuntimeError):
        _ = server.base_url
    with server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.base_url)
        port = int(server.base_url.rsplit(":", 1)[1])
        assert port > 0
        assert httpx.get(f"{server.base_url}/healthz").json() == {"ok": True}
        with pytest.raises(RuntimeError, match="failed to start"):
            EmulatorServer(port=port).start()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)


def test_multiple_connectors(start: Any) -> None:
    second = EmulatedConnector(
        organisation_id="org-two",
        connector_id="conn-two",
        credential_id="01M8F12B95S4BX0QFB3TPDWZ1A",
        credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ1B",
        client_id="second-client",
        redirect_uri="https://example.com/cb",
    )
    _, http = start(
        EmulatorConfig(connectors=(DEMO_CONNECTOR, second), api_keys=frozenset({"k1", "k2"}))
    )
    payload = body(
        credential={
            "id": second.credential_id,
            "organisationId": second.credential_organisation_id,
        },
        clientId=second.client_id,
    )
    with http:
        response = http.post(
            "/o/org-two/connectors/conn-two/oauth2/initialise",
            json=payload,
            headers={"Authorization": "Bearer k2"},
        )
    assert response.status_code == 200, response.text
    assert parse_qs(urlsplit(response.json()["url"]).query)["redirect_uri"] == [
        "https://example.com/cb"
    ]


# --- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_ms": float("inf")}, "latency_ms"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_limit": -3}, "rate_limit"),
        ({"seed": "abc"}, "seed"),
        ({"api_keys": frozenset()}, "api_keys"),
        ({"api_keys": "emulator-key"}, "api_keys"),
        ({"connectors": ()}, "connectors"),
        ({"connectors": (DEMO_CONNECTOR, DEMO_CONNECTOR)}, "connectors"),
        ({"script": {"acme": ["418"]}}, "script"),
        ({"script": {"acme": "503"}}, "script"),
        ({"script": {"": ["503"]}}, "script"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EmulatorConfig(**kwargs)


def test_config_coerces_collections() -> None:
    config = EmulatorConfig(api_keys={"a"}, connectors=[DEMO_CONNECTOR])  # type: ignore[arg-type]
    assert config.api_keys == frozenset({"a"})
    assert config.connectors == (DEMO_CONNECTOR,)
    assert EmulatorConfig(script={"x": ("503*",)}).script == {"x": ["503*"]}  # type: ignore[dict-item]


def test_connector_validation() -> None:
    with pytest.raises(ValueError, match="credential_id"):
        EmulatedConnector(
            organisation_id="o",
            connector_id="c",
            credential_id="not-a-ulid",
            credential_organisation_id=DEMO_CONNECTOR.credential_organisation_id,
            client_id="x",
        )
