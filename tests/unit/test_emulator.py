"""The emulator over real HTTP: the URL contract, every error class, and the fault injection."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from typer.testing import CliRunner

from demo.emulator import (
    DEFAULT_API_KEY,
    DEMO_CONNECTOR,
    EmulatedConnector,
    EmulatorConfig,
    EmulatorServer,
    create_app,
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
    running, http = start(EmulatorConfig(rate_limit=10))
    http.close()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=5.0) as client:
            responses = await asyncio.gather(
                *(client.post(PATH, json=body(), headers=AUTH) for _ in range(40))
            )
        return [r.status_code for r in responses]

    statuses = Counter(asyncio.run(burst()))
    # The sliding window: 10, or up to 10 more if the burst took over a second; never all.
    assert 10 <= statuses[200] < 40
    assert statuses[200] + statuses[429] == 40


# --- the rate limit's windows, on a clock of the test's own -----------------------------------


class FakeClock:
    """Both of the emulator's clocks (monotonic for the sliding window, wall for the fixed one),
    at whatever time the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def paced_app(config: EmulatorConfig, clock: FakeClock) -> Starlette:
    return create_app(config, clock=clock, wall_clock=clock)


def send_at(
    app: Starlette,
    clock: FakeClock,
    times: Sequence[float],
    payload: dict[str, Any] | None = None,
    headers: dict[str, str] = AUTH,
) -> list[httpx.Response]:
    """One request at each of `times` (in order, the clock set to each first), through the
    ASGI transport: the app's own code, with no socket and no scheduling noise in the timing."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as http:
            responses = []
            for moment in times:
                clock.now = moment
                responses.append(await http.post(PATH, json=payload or body(), headers=headers))
            return responses

    return asyncio.run(run())


def statuses_at(app: Starlette, clock: FakeClock, times: Sequence[float]) -> list[int]:
    return [r.status_code for r in send_at(app, clock, times)]


def test_sliding_window_is_the_default() -> None:
    assert EmulatorConfig().rate_limit_window == "sliding"
    assert EmulatorConfig(rate_limit=5).stall_seconds == 60


def test_sliding_rejects_the_51st_in_a_second_and_accepts_once_the_window_slides() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=50), clock)
    t0 = 1000.0
    assert statuses_at(app, clock, [t0 + i * 0.01 for i in range(50)]) == [200] * 50
    [refused] = send_at(app, clock, [t0 + 0.5])
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "1"
    # The first request (t0) is still in every trailing second until t0 + 1.
    assert statuses_at(app, clock, [t0 + 0.9, t0 + 0.99, t0 + 0.999]) == [429] * 3
    # At t0 + 1 it has left: one place, one request; the next waits for t0 + 0.01 to leave.
    assert statuses_at(app, clock, [t0 + 1.0, t0 + 1.0, t0 + 1.005]) == [200, 429, 429]
    # The refused requests counted for nothing: t0 + 0.01 leaves at t0 + 1.01.
    assert statuses_at(app, clock, [t0 + 1.0101]) == [200]
    stats = app.state.emulator.stats()
    assert stats["by_status"] == {"200": 52, "429": 6}
    assert stats["rate_limited"] == 6


def test_sliding_accepts_a_burst_after_a_pause_but_never_51_in_a_second() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=50), clock)
    # 25 at one instant, after a quiet spell: a burst within the limit is fine.
    assert statuses_at(app, clock, [2000.0] * 25) == [200] * 25
    assert statuses_at(app, clock, [2010.0] * 25) == [200] * 25
    # 25 more half a second later fill the window; the 51st within the second is refused,
    # which a token bucket (refilled by 25 in that half second) would have let through.
    assert statuses_at(app, clock, [2010.5] * 25) == [200] * 25
    assert statuses_at(app, clock, [2010.6, 2010.99]) == [429, 429]
    assert statuses_at(app, clock, [2011.0] * 26) == [200] * 25 + [429]


def test_sliding_never_lets_more_than_n_through_in_any_second() -> None:
    """Random arrivals at about 1.6 x the limit, bursts and pauses among them: every trailing
    second holds at most 50 accepted requests, and a request is refused only when it is full."""
    rng = random.Random(11)
    times: list[float] = []
    now = 3000.0
    while len(times) < 1500:
        roll = rng.random()
        if roll < 0.05:
            now += rng.uniform(0.5, 2.0)  # a pause
        elif roll < 0.10:
            times += [now] * rng.randint(5, 40)  # a burst at one instant
        now += rng.expovariate(80.0)
        times.append(now)
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=50), clock)
    responses = send_at(app, clock, times)
    accepted: list[float] = []
    for moment, response in zip(times, responses, strict=True):
        in_window = sum(1 for t in accepted if t > moment - 1.0)
        if response.status_code == 200:
            assert in_window < 50, f"a 51st request accepted within a second at {moment}"
            accepted.append(moment)
        else:
            assert response.status_code == 429
            assert in_window == 50, f"refused at {moment} with {in_window} in the window"
            assert response.headers["Retry-After"] == "1"
    assert 0 < len(accepted) < len(times)


def test_sliding_rounds_a_fractional_rate_down() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=2.9), clock)
    assert statuses_at(app, clock, [10.0, 10.1, 10.2, 10.3]) == [200, 200, 429, 429]
    tiny = paced_app(EmulatorConfig(rate_limit=0.2), clock)
    assert statuses_at(tiny, clock, [10.0, 10.5, 11.0]) == [200, 429, 200]


def test_fixed_window_counts_per_clock_second() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=50, rate_limit_window="fixed"), clock)
    assert statuses_at(app, clock, [100.2] * 50) == [200] * 50
    [refused] = send_at(app, clock, [100.3])
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"  # ceil(0.7 s to the next second)
    assert statuses_at(app, clock, [100.999]) == [429]
    # A new second, a new count; both sides of its edge full: 100 in 0.1 s (what "fixed" is).
    assert statuses_at(app, clock, [101.0] * 51) == [200] * 50 + [429]
    assert statuses_at(app, clock, [102.95] * 50 + [103.05] * 50) == [200] * 100


def test_the_same_requests_through_each_window() -> None:
    """50 at one instant and 25 half a second later, at 50/s: only the bucket forgives."""
    times = [5000.0] * 50 + [5000.5] * 25
    clock = FakeClock()
    sliding = Counter(statuses_at(paced_app(EmulatorConfig(rate_limit=50), clock), clock, times))
    assert sliding == {200: 50, 429: 25}
    fixed_app = paced_app(EmulatorConfig(rate_limit=50, rate_limit_window="fixed"), clock)
    assert Counter(statuses_at(fixed_app, clock, times)) == {200: 50, 429: 25}


def test_bucket_is_the_old_token_bucket(start: StartServer) -> None:
    """The bucket runs on the real clock, as before: a full bucket of 50, then what refills."""
    running, http = start(EmulatorConfig(rate_limit=50, rate_limit_window="bucket"))
    with http:
        first = Counter(http.post(PATH, json=body(), headers=AUTH).status_code for _ in range(120))
        time.sleep(0.6)
        second = Counter(http.post(PATH, json=body(), headers=AUTH).status_code for _ in range(30))
    assert first[200] >= 50 and first[429] > 0
    # Refilled by ~30 tokens in the pause: a second burst goes through within the same
    # second, beyond 50 in all, which the sliding window refuses.
    assert second[200] >= 25
    assert running.stats()["rate_limit_window"] == "bucket"


def test_sliding_on_a_real_server(start: StartServer) -> None:
    running, http = start(EmulatorConfig(rate_limit=50))
    http.close()

    async def burst(n: int) -> tuple[Counter[int], float]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(
            base_url=running.base_url, timeout=10.0, limits=limits
        ) as client:
            began = time.monotonic()
            responses = await asyncio.gather(
                *(client.post(PATH, json=body(), headers=AUTH) for _ in range(n))
            )
            return Counter(r.status_code for r in responses), time.monotonic() - began

    statuses, seconds = asyncio.run(burst(51))
    if seconds < 1.0:
        assert statuses == {200: 50, 429: 1}
    else:  # a very busy machine: the burst spread over more than one window
        assert statuses[200] <= 50 * 2
    time.sleep(1.05)
    assert asyncio.run(burst(1))[0] == {200: 1}


def test_rate_limit_counts_only_requests_past_auth() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=2), clock)
    strangers = send_at(app, clock, [1.0] * 5, headers={"Authorization": "Bearer nope-nope"})
    assert [r.status_code for r in strangers] == [401] * 5
    assert statuses_at(app, clock, [1.1, 1.2, 1.3]) == [200, 200, 429]
    # Auth comes first: a stranger is told 401, not 429, even with the window full.
    stranger = send_at(app, clock, [1.4], headers={})
    assert stranger[0].status_code == 401


def test_reset_empties_the_window() -> None:
    clock = FakeClock()
    app = paced_app(EmulatorConfig(rate_limit=1), clock)
    assert statuses_at(app, clock, [1.0, 1.1]) == [200, 429]
    app.state.emulator.reset()
    assert statuses_at(app, clock, [1.2]) == [200]


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
        ("404", 404, "not_found"),
        ("401", 401, "unauthenticated"),
        ("403", 403, "forbidden"),
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
    if expected_status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_script_404_is_one_tenants_credential_miss(start: StartServer) -> None:
    running, http = start(EmulatorConfig(script={"tenant=gone": ["404*"], "tenant=late": ["403"]}))
    with http:

        def answer(params: str) -> httpx.Response:
            return http.post(PATH, json=body(additionalParams=params), headers=AUTH)

        gone = answer("tenant=gone")
        assert gone.status_code == 404
        # Worded as the real miss (test_unknown_credential), and marked as injected.
        assert gone.json() == {
            "code": "not_found",
            "message": "credential not found",
            "details": "injected by the emulator script",
        }
        assert answer("tenant=gone").status_code == 404
        assert answer("tenant=other").status_code == 200  # the same credential, another tenant
        assert answer("tenant=late").status_code == 403
        assert answer("tenant=late").status_code == 200
    assert running.stats()["by_status"] == {"404": 2, "403": 1, "200": 2}


class ErrorLogs(logging.Handler):
    """The ERROR records (tracebacks included) uvicorn logs for the emulator's server."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[Callable[[], ErrorLogs]]:
    """Call it once the server has started: uvicorn's logging set-up at start removes any
    handler attached to its loggers before."""
    handler = ErrorLogs()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "starlette")]

    def watch() -> ErrorLogs:
        for logger in loggers:
            logger.addHandler(handler)
        return handler

    yield watch
    for logger in loggers:
        logger.removeHandler(handler)


def test_script_stall_trips_the_read_timeout_and_ends_quietly(
    start: StartServer, server_errors: Callable[[], ErrorLogs]
) -> None:
    running, _ = start(EmulatorConfig(script={"tenant=slow": ["stall", "ok"]}, stall_seconds=30))
    errors = server_errors()
    slow = body(additionalParams="tenant=slow")
    timeout = httpx.Timeout(5.0, read=0.5)
    with httpx.Client(base_url=running.base_url, timeout=timeout) as http:
        began = time.monotonic()
        with http.stream("POST", PATH, json=slow, headers=AUTH) as response:
            assert response.status_code == 200  # the headers came at once
            with pytest.raises(httpx.ReadTimeout):
                response.read()
        assert time.monotonic() - began < 5.0
    # That client is gone (its connection closed with it); the emulator serves on at once.
    with httpx.Client(base_url=running.base_url, timeout=5.0) as http:
        assert http.post(PATH, json=slow, headers=AUTH).status_code == 200  # "ok"
        deadline = time.monotonic() + 5.0
        while running.stats()["stalls"]["abandoned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = http.get("/_emulator/stats").json()
    assert stats["stalls"] == {"started": 1, "delivered": 0, "abandoned": 1}
    assert stats["by_status"] == {"200": 2}
    # A state was issued for the stalled answer too, but only the URL that arrived counts.
    assert stats["states_issued"] == 2
    assert stats["initialised"] == {f"{AUTHORIZE_URL}?tenant=slow": 1}
    assert errors.records == []


def test_script_stall_shorter_than_the_timeout_delivers(start: StartServer) -> None:
    running, http = start(EmulatorConfig(script={"tenant=slow": ["stall"]}, stall_seconds=0.3))
    with http:
        began = time.monotonic()
        response = http.post(PATH, json=body(additionalParams="tenant=slow"), headers=AUTH)
        elapsed = time.monotonic() - began
    assert response.status_code == 200
    assert "state=" in response.json()["url"]
    assert elapsed >= 0.25
    stats = running.stats()
    assert stats["stalls"] == {"started": 1, "delivered": 1, "abandoned": 0}
    assert stats["initialised"] == {f"{AUTHORIZE_URL}?tenant=slow": 1}


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


EMPTY_STATS = {
    "requests": 0,
    "by_status": {},
    "rate_limited": 0,
    "states_issued": 0,
    "stalls": {"started": 0, "delivered": 0, "abandoned": 0},
    "initialised": {},
    "first_request_at": None,
    "last_request_at": None,
}


def test_stats_and_reset(start: Any) -> None:
    running, http = start(EmulatorConfig())
    with http:
        began = time.time()
        http.post(PATH, json=body(), headers=AUTH)
        http.post(PATH, json=body(), headers=AUTH)
        http.post(PATH, json=body())
        ended = time.time()
        http.get("/healthz")
        stats = http.get("/_emulator/stats").json()
        assert running.stats() == stats
        first, last = stats.pop("first_request_at"), stats.pop("last_request_at")
        assert began <= first <= last <= ended
        assert {**stats, "first_request_at": None, "last_request_at": None} == {
            **EMPTY_STATS,
            "requests": 3,
            "by_status": {"200": 2, "401": 1},
            "states_issued": 2,
            "initialised": {f"{AUTHORIZE_URL}?": 2},
            "rate_limit": None,
            "rate_limit_window": "sliding",
        }
        assert http.post("/_emulator/reset").status_code == 200
        assert http.get("/_emulator/stats").json() == {
            **EMPTY_STATS,
            "rate_limit": None,
            "rate_limit_window": "sliding",
        }
    assert running.app.state.states == {}


def test_stats_count_429s_and_each_tenants_initialisations() -> None:
    clock = FakeClock()
    config = EmulatorConfig(rate_limit=3, script={"tenant=b": ["503"]})
    app = paced_app(config, clock)
    tenant_a = body(additionalParams="tenant=a&region=eu")
    tenant_b = body(authorizeUrl="https://b.example.com/authorize", additionalParams="tenant=b")
    sent = [
        *send_at(app, clock, [1.0, 1.1], tenant_a),
        *send_at(app, clock, [1.2, 1.3, 1.4, 2.25], tenant_b),  # 503, 429, 429, 200
        *send_at(app, clock, [2.3], tenant_a, headers={}),  # 401
    ]
    assert [r.status_code for r in sent] == [200, 200, 503, 429, 429, 200, 401]

    async def read_stats() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as http:
            response = await http.get("/_emulator/stats")
            result: dict[str, Any] = response.json()
            return result

    stats = asyncio.run(read_stats())
    assert stats["requests"] == 7
    assert stats["by_status"] == {"200": 3, "503": 1, "429": 2, "401": 1}
    assert stats["rate_limited"] == 2
    assert stats["initialised"] == {
        f"{AUTHORIZE_URL}?tenant=a&region=eu": 2,
        "https://b.example.com/authorize?tenant=b": 1,
    }
    assert (stats["rate_limit"], stats["rate_limit_window"]) == (3, "sliding")


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
        ({"script": {"acme": ["stall", 404]}}, "script"),
        ({"rate_limit_window": "rolling"}, "rate_limit_window"),
        ({"stall_seconds": 0}, "stall_seconds"),
        ({"stall_seconds": float("nan")}, "stall_seconds"),
        ({"stall_seconds": "5"}, "stall_seconds"),
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


# --- `onboard emulator`'s options -------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[EmulatorConfig]:
    """What `onboard emulator` would serve: its config, instead of a server that runs for ever."""
    configs: list[EmulatorConfig] = []

    def capture(config: EmulatorConfig, host: str, port: int) -> None:
        configs.append(config)

    monkeypatch.setattr("demo.emulator.run_emulator", capture)
    return configs


def onboard_emulator(*args: str) -> Any:
    from deployments.cli import app

    return CliRunner().invoke(app, ["emulator", *args])


def test_cli_defaults(served: list[EmulatorConfig]) -> None:
    result = onboard_emulator("--rate-limit", "50")
    assert result.exit_code == 0, result.output
    [config] = served
    assert (config.rate_limit, config.rate_limit_window) == (50, "sliding")
    assert config.script == {}
    assert config.stall_seconds == 60


def test_cli_window_script_and_stall(tmp_path: Path, served: list[EmulatorConfig]) -> None:
    script = tmp_path / "faults.yaml"
    script.write_text('tenant=gone: [404*]\n"tenant=slow": [stall, ok]\nacme: ["503", 401]\n')
    result = onboard_emulator(
        "--rate-limit",
        "20",
        "--rate-limit-window",
        "fixed",
        "--script",
        str(script),
        "--stall-seconds",
        "2.5",
    )
    assert result.exit_code == 0, result.output
    [config] = served
    assert config.rate_limit_window == "fixed"
    assert config.script == {
        "tenant=gone": ["404*"],
        "tenant=slow": ["stall", "ok"],
        "acme": ["503", "401"],
    }
    assert config.stall_seconds == 2.5

    as_json = tmp_path / "faults.json"
    as_json.write_text(json.dumps({"tenant=b": ["429", "ok"]}))
    assert (
        onboard_emulator("--script", str(as_json), "--rate-limit-window", "bucket").exit_code == 0
    )
    assert served[1].script == {"tenant=b": ["429", "ok"]}
    assert served[1].rate_limit_window == "bucket"


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["--rate-limit-window", "rolling"], "--rate-limit-window", "sliding, fixed, bucket"),
        (["--rate-limit-window", "Sliding"], "--rate-limit-window", "got 'Sliding'"),
        (["--stall-seconds", "0"], "--stall-seconds", "positive"),
        (["--stall-seconds", "inf"], "--stall-seconds", "positive"),
        (["--rate-limit", "0"], "--rate-limit", "positive"),
        (["--latency-ms", "-5"], "--latency-ms", ">= 0"),
        (["--error-rate", "2"], "--error-rate", "between 0 and 1"),
    ],
)
def test_cli_bad_values_name_the_option(
    served: list[EmulatorConfig], args: list[str], option: str, says: str
) -> None:
    result = onboard_emulator(*args)
    assert result.exit_code == 2, result.output
    assert "Bad input" in result.output
    assert f"{option}:" in result.output
    assert says in result.output
    assert served == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read"),
        ("- 503\n- ok\n", "must hold a mapping"),
        ("acme: [503, teapot]\n", "unknown action 'teapot'"),
        ("acme: 503\n", "must map to a list"),
        ("acme: [503\n", "not valid YAML or JSON"),
        ('{"": ["503"]}', "non-empty string"),
    ],
)
def test_cli_bad_script_file(
    tmp_path: Path, served: list[EmulatorConfig], content: str | None, says: str
) -> None:
    script = tmp_path / "faults.yaml"
    if content is not None:
        script.write_text(content)
    result = onboard_emulator("--script", str(script))
    assert result.exit_code == 2, result.output
    assert "--script" in result.output
    assert says in result.output
    assert served == []
