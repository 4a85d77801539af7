"""Versori's Platform API v2: profiles with `api: platform-v2`, the systems path, redirectUrl and
its check on the returned URL, at unit level (httpx.MockTransport), against the emulator on a
real socket, and through the whole flow."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from demo.emulator import (
    DEFAULT_API_KEY,
    DEMO_CONNECTOR,
    DEMO_SYSTEM,
    EmulatorConfig,
    EmulatorServer,
)
from onboarding import constants
from onboarding.errors import (
    InputError,
    LinkCheckError,
    NotFoundError,
    RateLimitedError,
    ServerError,
)
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Status
from onboarding.settings import VersoriSettings
from onboarding.versori.authorize_url import check_link
from onboarding.versori.client import VersoriClient
from onboarding.versori.wire import InitialiseRequest
from tests.support import campaign_of, onboard

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROFILE_V2 = EXAMPLES / "profile-v2.yaml"

API_KEY = "vk_live_Sup3rSecretKey0123456789abcdef"
ORG = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0"
SYSTEM = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C1"
CREDENTIAL = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2"
ENDPOINT = "https://auth.example.com/oauth2/authorize"
REDIRECT = "https://app.example.com/versori/callback"
STATE = "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5d2Fs"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VERSORI_API_KEY", "VERSORI_BASE_URL", "VERSORI_API_KEY_BLOCK"):
        monkeypatch.delenv(name, raising=False)


def v2_profile(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "v2",
        "api": "platform-v2",
        "organisation_id": ORG,
        "system_id": SYSTEM,
        "credential_id": CREDENTIAL,
        "client_id": "client-123",
        "authorize_url": ENDPOINT,
        "scopes": ["read"],
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def returned_url(request: InitialiseRequest, redirect_uri: str = REDIRECT) -> str:
    """What Versori answers for `request`, with this redirect_uri."""
    params = [
        ("response_type", "code"),
        ("client_id", request.client_id),
        ("redirect_uri", redirect_uri),
        ("state", STATE),
        ("scope", " ".join([*request.scopes, "offline_access"])),
        ("prompt", request.prompt or "login"),
    ]
    return str(httpx.URL(request.authorize_url, params=params))


class Recorder:
    """A MockTransport handler that keeps every request and answers like Versori would."""

    def __init__(self, redirect_uri: str = REDIRECT, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.redirect_uri = redirect_uri
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            return httpx.Response(
                self.status,
                json={"code": "x", "message": "no"},
                headers={"Retry-After": "3"},
            )
        body = InitialiseRequest.model_validate(json.loads(request.content))
        return httpx.Response(200, json={"url": returned_url(body, self.redirect_uri)})


def v2_client(handler: Recorder, **kwargs: Any) -> VersoriClient:
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("base_url", "https://x.example/api/v2")
    return VersoriClient(api="platform-v2", transport=httpx.MockTransport(handler), **kwargs)


# --- the profile -------------------------------------------------------------------------------


def test_example_v2_profile_loads_and_names_its_system() -> None:
    profile = load_profile(PROFILE_V2)
    assert profile.api == "platform-v2"
    assert profile.connector_id is None
    assert profile.system_id == DEMO_SYSTEM.connector_id
    assert profile.target_id == DEMO_SYSTEM.connector_id
    assert profile.redirect_url
    request = profile.render({"subdomain": "acme", "admin_email": "a@acme.example"})
    assert request.to_wire()["redirectUrl"] == profile.redirect_url


def test_a_profile_is_connect_v1_by_default_and_keyed_by_its_connector() -> None:
    profile = load_profile(EXAMPLES / "profile.yaml")
    assert profile.api == "connect-v1"
    assert profile.system_id is None
    assert profile.target_id == profile.connector_id
    assert "redirectUrl" not in profile.render({"subdomain": "a", "admin_email": "a@b.c"}).to_wire()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(InputError) as info:
        load_profile(path)
    for problem in info.value.problems:
        assert problem.source == str(path)
    return [(p.line, p.field, p.message) for p in info.value.problems]


V2_YAML = f"""\
name: v2
api: platform-v2
organisation_id: {ORG}
system_id: {SYSTEM}
credential_id: {CREDENTIAL}
client_id: client-123
authorize_url: {ENDPOINT}
"""


def test_a_v2_profile_that_also_names_a_connector_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, V2_YAML + f"connector_id: {SYSTEM}\n")
    [(line, field, message)] = problems(path)
    assert (line, field) == (8, "connector_id")
    assert "system_id" in message and "remove connector_id" in message


def test_a_v2_profile_with_a_connector_instead_of_a_system_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, V2_YAML.replace("system_id:", "connector_id:"))
    found = {field: message for _, field, message in problems(path)}
    assert set(found) == {"connector_id", "system_id"}
    assert "required for api: platform-v2" in found["system_id"]


def test_a_connect_v1_profile_may_not_name_a_system_or_a_redirect_url(tmp_path: Path) -> None:
    text = V2_YAML.replace("api: platform-v2\n", "").replace("system_id:", "connector_id:")
    path = write(tmp_path, text + f"system_id: {SYSTEM}\nredirect_url: {REDIRECT}\n")
    found = {field: (line, message) for line, field, message in problems(path)}
    assert set(found) == {"system_id", "redirect_url"}
    assert found["system_id"][0] == 7
    assert "api: platform-v2" in found["system_id"][1]
    assert found["redirect_url"][0] == 8
    assert "api: platform-v2" in found["redirect_url"][1]
    assert REDIRECT not in str(found)


def test_an_unknown_api_is_refused_by_name(tmp_path: Path) -> None:
    [(line, field, message)] = problems(
        write(tmp_path, V2_YAML.replace("platform-v2", "platform-v3"))
    )
    assert (line, field) == (2, "api")
    assert "connect-v1" in message and "platform-v2" in message


@pytest.mark.parametrize(
    "url",
    ["http://app.example.com/cb", "/relative/cb", "https://app.example.com/cb#frag", "nope"],
)
def test_redirect_url_must_be_an_absolute_https_url(tmp_path: Path, url: str) -> None:
    [(line, field, _)] = problems(write(tmp_path, V2_YAML + f"redirect_url: '{url}'\n"))
    assert (line, field) == (8, "redirect_url")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"redirect_uri": "https://other.example.com/cb"},
            "redirect_uri differs from redirect_url",
        ),
        ({"redirect_host": "other.example.com"}, "redirect_url's host is not redirect_host"),
    ],
)
def test_redirect_url_and_the_pins_must_agree(extra: dict[str, str], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        ConnectorProfile.model_validate(v2_profile(redirect_url=REDIRECT, **extra))
    # Pins that agree with it are fine.
    ConnectorProfile.model_validate(
        v2_profile(redirect_url=REDIRECT, redirect_uri=REDIRECT, redirect_host="app.example.com")
    )


# --- the wire model ----------------------------------------------------------------------------


def test_redirect_url_goes_on_the_wire_as_redirectUrl_only_when_set() -> None:
    profile = ConnectorProfile.model_validate(v2_profile())
    assert "redirectUrl" not in profile.render({}).to_wire()
    with_it = ConnectorProfile.model_validate(v2_profile(redirect_url=REDIRECT))
    assert with_it.render({}).to_wire()["redirectUrl"] == REDIRECT
    with pytest.raises(ValidationError):
        InitialiseRequest.model_validate(
            {**with_it.render({}).model_dump(), "redirect_url": "not a url"}
        )


# --- the client, at unit level -------------------------------------------------------------


@pytest.mark.parametrize("redirect_url", [None, REDIRECT])
def test_v2_client_posts_to_the_systems_path_with_the_same_headers(
    redirect_url: str | None,
) -> None:
    recorder = Recorder()
    request = ConnectorProfile.model_validate(v2_profile(redirect_url=redirect_url)).render({})
    with v2_client(recorder) as client:
        url = client.initialise(ORG, SYSTEM, request)
    check_link(url, request)
    [sent] = recorder.requests
    assert sent.method == "POST"
    assert sent.url.path == f"/api/v2/o/{ORG}/systems/{SYSTEM}/oauth2/initialise"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "application/json"
    body = json.loads(sent.content)
    assert body == request.to_wire()
    if redirect_url is None:
        assert "redirectUrl" not in body
    else:
        assert body["redirectUrl"] == redirect_url


def test_v2_base_url_defaults_to_platform_v2_and_versori_base_url_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    request = ConnectorProfile.model_validate(v2_profile()).render({})
    with v2_client(recorder, base_url=None) as client:
        client.initialise(ORG, SYSTEM, request)
    assert str(recorder.requests[0].url) == (
        f"{constants.PLATFORM_V2_BASE_URL}/o/{ORG}/systems/{SYSTEM}/oauth2/initialise"
    )
    monkeypatch.setenv("VERSORI_BASE_URL", "https://staging.example/api/v2")
    transport = httpx.MockTransport(recorder)
    settings = VersoriSettings(api_key=API_KEY)
    with VersoriClient.from_settings(settings, api="platform-v2", transport=transport) as client:
        client.initialise(ORG, SYSTEM, request)
    assert recorder.requests[1].url.host == "staging.example"
    # connect-v1 keeps its own default.
    monkeypatch.delenv("VERSORI_BASE_URL")
    with VersoriClient(api_key=API_KEY) as v1:
        assert v1.base_url == constants.PRODUCTION_BASE_URL


def test_open_client_gives_a_v2_profile_the_v2_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.batching.resources import open_client

    monkeypatch.setenv("VERSORI_API_KEY", API_KEY)
    monkeypatch.chdir(Path(__file__).parent)  # no .env of the project's
    with open_client(2, VersoriSettings(), "platform-v2") as client:
        assert client.base_url == constants.PLATFORM_V2_BASE_URL
        assert client.api == "platform-v2"
    with open_client(2, VersoriSettings()) as client:
        assert client.base_url == constants.PRODUCTION_BASE_URL
    monkeypatch.setenv("VERSORI_BASE_URL", "http://127.0.0.1:9")
    with open_client(2, VersoriSettings(), "platform-v2") as client:
        assert client.base_url == "http://127.0.0.1:9"


def test_v2_errors_are_handled_as_v1_errors() -> None:
    request = ConnectorProfile.model_validate(v2_profile()).render({})
    for status, cls in ((404, NotFoundError), (429, RateLimitedError), (503, ServerError)):
        with v2_client(Recorder(status=status)) as client, pytest.raises(cls) as info:
            client.initialise(ORG, SYSTEM, request)
        assert API_KEY not in str(info.value)
    assert isinstance(info.value, ServerError)
    with v2_client(Recorder(status=429)) as client, pytest.raises(RateLimitedError) as limited:
        client.initialise(ORG, SYSTEM, request)
    assert limited.value.retry_after == 3.0


def test_a_connect_v1_client_refuses_a_redirect_url_before_calling() -> None:
    recorder = Recorder()
    request = ConnectorProfile.model_validate(v2_profile(redirect_url=REDIRECT)).render({})
    client = VersoriClient(
        api_key=API_KEY, base_url="https://x.example", transport=httpx.MockTransport(recorder)
    )
    with client, pytest.raises(InputError, match="api: platform-v2"):
        client.initialise(ORG, SYSTEM, request)
    assert recorder.requests == []


def test_an_unknown_api_is_refused_by_the_client() -> None:
    with pytest.raises(InputError, match="connect-v1 or platform-v2"):
        VersoriClient(api_key=API_KEY, api="platform-v3")  # type: ignore[arg-type]


# --- the returned URL's redirect_uri -------------------------------------------------------


def test_a_v2_url_whose_redirect_uri_differs_from_redirect_url_is_refused() -> None:
    request = ConnectorProfile.model_validate(v2_profile(redirect_url=REDIRECT)).render({})
    check_link(returned_url(request), request)
    other = "https://attacker.example/cb"
    url = returned_url(request, redirect_uri=other)
    with pytest.raises(LinkCheckError) as info:
        check_link(url, request)
    [problem] = info.value.problems
    assert "redirect_uri" in problem and "redirect_url" in problem
    for text in (str(info.value), repr(info.value)):
        assert url not in text and STATE not in text
        assert other not in text and REDIRECT not in text
    # Without redirect_url, that same redirect_uri passes (no other pin is set).
    unpinned = request.model_copy(update={"redirect_url": None})
    check_link(url, unpinned)


def test_onboarding_never_stores_a_v2_link_to_another_redirect(tmp_path: Path) -> None:
    profile = ConnectorProfile.model_validate(v2_profile(redirect_url=REDIRECT))
    tenant = Tenant(tenant_id="t1", name="T1", admin_email="a@x.example", fields={})
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        with v2_client(Recorder(redirect_uri="https://attacker.example/cb")) as client:
            outcome = onboard(campaign_of(profile, ledger, client), tenant)
            assert isinstance(outcome.cause, LinkCheckError), outcome
            assert "redirect_url" in str(outcome.cause)
        record = ledger.get("t1", SYSTEM)
        assert record is not None and record.status is Status.FAILED and not record.url
        with v2_client(Recorder()) as client:
            assert onboard(campaign_of(profile, ledger, client), tenant).ok
        record = ledger.get("t1", SYSTEM)
        assert record is not None and record.url
        assert dict(parse_qsl(urlsplit(record.url).query))["redirect_uri"] == REDIRECT
    finally:
        ledger.close()


# --- against the emulator on a real socket ---------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer() as running:
        yield running


@pytest.fixture
def http(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        client.post("/_emulator/reset").raise_for_status()
        yield client


AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
V2_PATH = f"/o/{DEMO_SYSTEM.organisation_id}/systems/{DEMO_SYSTEM.connector_id}/oauth2/initialise"
V1_PATH = (
    f"/o/{DEMO_CONNECTOR.organisation_id}/connectors/{DEMO_CONNECTOR.connector_id}"
    "/oauth2/initialise"
)


def emulator_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "credential": {
            "id": DEMO_SYSTEM.credential_id,
            "organisationId": DEMO_SYSTEM.credential_organisation_id,
        },
        "authorizeUrl": ENDPOINT,
        "clientId": DEMO_SYSTEM.client_id,
    }
    body.update(overrides)
    return body


def redirect_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["redirect_uri"]


@pytest.mark.parametrize("redirect_url", [None, REDIRECT])
def test_emulator_serves_the_v2_path_and_tracks_its_states(
    http: httpx.Client, redirect_url: str | None
) -> None:
    body = emulator_body(**({"redirectUrl": redirect_url} if redirect_url else {}))
    response = http.post(V2_PATH, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    assert redirect_of(url) == (redirect_url or DEMO_SYSTEM.redirect_uri)
    state = dict(parse_qsl(urlsplit(url).query))["state"]
    record = http.get(f"/_emulator/states/{state}").json()
    assert record["api"] == "platform-v2"
    assert record["system_id"] == DEMO_SYSTEM.connector_id
    assert "connector_id" not in record
    assert record["redirect_uri"] == redirect_of(url)
    assert http.get("/_emulator/stats").json()["states_issued"] == 1


def test_emulator_v1_path_knows_no_redirect_url(http: httpx.Client) -> None:
    body = emulator_body(
        credential={
            "id": DEMO_CONNECTOR.credential_id,
            "organisationId": DEMO_CONNECTOR.credential_organisation_id,
        },
        clientId=DEMO_CONNECTOR.client_id,
        redirectUrl=REDIRECT,
    )
    response = http.post(V1_PATH, json=body, headers=AUTH)
    assert response.status_code == 400
    assert {"field": "redirectUrl", "message": "unknown field"} in response.json()["fields"]
    del body["redirectUrl"]
    response = http.post(V1_PATH, json=body, headers=AUTH)
    assert response.status_code == 200
    state = dict(parse_qsl(urlsplit(response.json()["url"]).query))["state"]
    record = http.get(f"/_emulator/states/{state}").json()
    assert record["api"] == "connect-v1" and record["connector_id"] == DEMO_CONNECTOR.connector_id


def test_emulator_v2_refuses_a_bad_redirect_url_and_an_unknown_system(http: httpx.Client) -> None:
    response = http.post(V2_PATH, json=emulator_body(redirectUrl="not a url"), headers=AUTH)
    assert response.status_code == 400
    assert [f["field"] for f in response.json()["fields"]] == ["redirectUrl"]
    unknown = V2_PATH.replace(DEMO_SYSTEM.connector_id, "01J9Z6ZQ7T8KX3N5V2W4Y6A8C9")
    response = http.post(unknown, json=emulator_body(), headers=AUTH)
    assert response.status_code == 404
    assert response.json()["message"].startswith("system 01J9Z6ZQ7T8KX3N5V2W4Y6A8C9 not found")
    assert http.post(V2_PATH, json=emulator_body()).status_code == 401


def test_emulator_injects_the_same_faults_on_the_v2_path() -> None:
    config = EmulatorConfig(script={"flaky": ["503", "429", "ok"]}, rate_limit=None)
    with (
        EmulatorServer(config) as running,
        httpx.Client(base_url=running.base_url, timeout=5.0) as http,
    ):
        body = emulator_body(authorizeUrl="https://flaky.example.com/authorize")
        statuses = [http.post(V2_PATH, json=body, headers=AUTH).status_code for _ in range(3)]
        assert statuses == [503, 429, 200]
        assert running.stats()["by_status"] == {"503": 1, "429": 1, "200": 1}
    with (
        EmulatorServer(EmulatorConfig(error_rate=1.0)) as running,
        httpx.Client(base_url=running.base_url, timeout=5.0) as http,
    ):
        assert http.post(V2_PATH, json=emulator_body(), headers=AUTH).status_code == 503


@pytest.mark.parametrize("redirect_url", [None, REDIRECT])
def test_the_client_against_the_emulator_on_the_v2_path(
    server: EmulatorServer, redirect_url: str | None
) -> None:
    profile = load_profile(PROFILE_V2).model_copy(update={"redirect_url": redirect_url})
    request = profile.render({"subdomain": "acme", "admin_email": "a@acme.example"})
    with VersoriClient(
        api="platform-v2", api_key=DEFAULT_API_KEY, base_url=server.base_url
    ) as client:
        url = client.initialise(profile.organisation_id, profile.target_id, request)
    link = check_link(url, request)
    assert redirect_of(link.url) == (redirect_url or DEMO_SYSTEM.redirect_uri)


# --- the whole flow ----------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_a_v2_profile_runs_the_whole_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.onboard_tenants as flow_module

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    roster = tmp_path / "r.csv"
    with roster.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i in range(1, 4):
            w.writerow([f"t{i:03d}", f"Tenant {i}", f"admin@acme{i}.example.com", f"acme{i}"])
    profile = load_profile(PROFILE_V2)
    with EmulatorServer() as emulator:
        monkeypatch.setenv("VERSORI_BASE_URL", emulator.base_url)
        state = flow_module.onboard_tenants(
            roster=str(roster), profile=str(PROFILE_V2), concurrency=2, return_state=True
        )
        summary: Any = state.result(raise_on_failure=False)
        assert state.type.value == "COMPLETED"
        assert summary["by_status"] == {"delivered": 3}
        assert summary["connector_id"] == DEMO_SYSTEM.connector_id
        ledger = Ledger(db)
        try:
            record = ledger.get("t001", DEMO_SYSTEM.connector_id)
            assert record is not None and record.status is Status.DELIVERED
            assert record.url and record.url.startswith("https://acme1.zendesk.com/")
            assert redirect_of(record.url) == profile.redirect_url
            with httpx.Client(base_url=emulator.base_url) as http:
                issued = http.get(f"/_emulator/states/{record.state}").json()
            assert issued["api"] == "platform-v2"
            assert issued["system_id"] == DEMO_SYSTEM.connector_id
        finally:
            ledger.close()
