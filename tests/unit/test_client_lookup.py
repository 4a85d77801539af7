"""VersoriClient.find_connection against httpx.MockTransport: the exact externalId among
ListEndUsers' substring matches, paging across `next`, the template and system filters, the
Connect API v1 lookup by name, and every failure typed (and bounded)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from onboarding.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    InputError,
    NotFoundError,
    ServerError,
)
from onboarding.versori import client as client_module
from onboarding.versori.client import MAX_PAGES, VersoriClient

API_KEY = "vk_live_Sup3rSecretKey0123456789abcdef"
BASE_URL = "https://x.example/api/v2"
ORG = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0"
SYSTEM = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C1"
OTHER_SYSTEM = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C5"
TEMPLATE = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2"
OTHER_TEMPLATE = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C3"
ACME_ID = "01J9Z6ZQ7T8KX3N5V2W4Y6A8D0"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERSORI_API_KEY", raising=False)
    monkeypatch.delenv("VERSORI_BASE_URL", raising=False)


def user(external_id: str, versori_id: str) -> dict[str, Any]:
    return {
        "id": versori_id,
        "externalId": external_id,
        "displayName": "",
        "organisationId": ORG,
        "createdAt": "2025-01-01T00:00:00Z",
        "updatedAt": "2025-01-01T00:00:00Z",
    }


def connection(
    connection_id: str, template: str | None = TEMPLATE, system: str | None = SYSTEM
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": connection_id,
        "name": f"conn {connection_id}",
        "credentials": [{"credential": {"type": "oauth2-code", "errors": []}}],
        "variables": [],
        "createdAt": "2025-01-01T00:00:00Z",
        "updatedAt": "2025-01-01T00:00:00Z",
    }
    if system is not None:
        item["systemId"] = system
    if template is not None:
        item["connectionTemplateId"] = template
    return item


class Versori:
    """A fake Versori: pages keyed by (path's last segment, `after`); records every request."""

    def __init__(self, pages: dict[tuple[str, str], Any], status: int = 200) -> None:
        self.pages = pages
        self.status = status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = (request.url.path.rsplit("/", 1)[-1], request.url.params.get("after", ""))
        page = self.pages.get(key)
        if page is None:
            return httpx.Response(404, json={"code": "not_found", "message": "no such page"})
        if isinstance(page, bytes):
            return httpx.Response(self.status, content=page)
        return httpx.Response(self.status, json=page)

    def params(self, index: int) -> dict[str, str]:
        return dict(self.requests[index].url.params)


def make_client(handler: Handler, api: str = "platform-v2", **kwargs: Any) -> VersoriClient:
    return VersoriClient(
        api=api,  # type: ignore[arg-type]
        api_key=API_KEY,
        base_url=BASE_URL,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def find(handler: Handler, api: str = "platform-v2", **kwargs: Any) -> Any:
    client_kwargs = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k in {"read_timeout", "call_deadline", "max_connections"}
    }
    kwargs.setdefault("external_id", "acme")
    kwargs.setdefault("name", "Tenant acme")
    with make_client(handler, api, **client_kwargs) as client:
        return client.find_connection(ORG, SYSTEM, **kwargs)


# --- Platform API v2 ---------------------------------------------------------------------------


def test_exact_external_id_among_substring_matches_across_pages() -> None:
    versori = Versori(
        {
            ("users", ""): {
                "users": [
                    user("acme-2", "01J9Z6ZQ7T8KX3N5V2W4Y6A8D1"),
                    user("xacme", ACME_ID[:-1] + "9"),
                ],
                "totalCount": 3,
                "next": "page2",
            },
            ("users", "page2"): {"users": [user("acme", ACME_ID)], "totalCount": 3, "next": ""},
            ("connections", ""): {"items": [connection("C1")], "totalCount": 1},
        }
    )
    found = find(versori)
    assert found is not None and found.id == "C1"
    assert found.system_id == SYSTEM and found.connection_template_id == TEMPLATE
    first, second, third = (versori.params(i) for i in range(3))
    assert first == {"search": "acme", "first": "100"}
    assert second == {"search": "acme", "first": "100", "after": "page2"}
    # ListConnections by the end user's Versori id, never by its externalId.
    assert third == {"end_user_id": ACME_ID, "system_id": SYSTEM, "first": "100"}
    assert [r.url.path for r in versori.requests] == [
        f"/api/v2/o/{ORG}/users",
        f"/api/v2/o/{ORG}/users",
        f"/api/v2/o/{ORG}/connections",
    ]
    assert all(r.method == "GET" for r in versori.requests)
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in versori.requests)


def test_no_exact_user_is_none_and_lists_no_connections() -> None:
    versori = Versori(
        {
            ("users", ""): {
                "users": [user("acme-2", ACME_ID), user("ACME", ACME_ID)],
                "totalCount": 2,
            }
        }
    )
    assert find(versori) is None
    assert len(versori.requests) == 1


def test_the_template_picks_the_connection_across_pages() -> None:
    versori = Versori(
        {
            ("users", ""): {"users": [user("acme", ACME_ID)], "totalCount": 1},
            ("connections", ""): {
                "items": [connection("C1", OTHER_TEMPLATE), connection("C2", None)],
                "totalCount": 3,
                "next": "more",
            },
            ("connections", "more"): {
                "items": [connection("C3", TEMPLATE.lower())],
                "totalCount": 3,
            },
        }
    )
    found = find(versori, template_id=TEMPLATE)
    assert found is not None and found.id == "C3"
    assert versori.params(2)["after"] == "more"
    first = find(versori)
    assert first is not None and first.id == "C1", "no template: the first"


def test_a_connection_of_another_system_is_skipped() -> None:
    versori = Versori(
        {
            ("users", ""): {"users": [user("acme", ACME_ID)], "totalCount": 1},
            ("connections", ""): {
                "items": [connection("C1", system=OTHER_SYSTEM), connection("C2", system=None)],
                "totalCount": 2,
            },
        }
    )
    found = find(versori)
    assert found is not None and found.id == "C2"


def test_no_connection_of_the_user_is_none() -> None:
    versori = Versori(
        {
            ("users", ""): {"users": [user("acme", ACME_ID)], "totalCount": 1, "next": ""},
            ("connections", ""): {"items": None, "totalCount": 0},
        }
    )
    assert find(versori) is None
    assert find(versori, template_id=TEMPLATE) is None


def test_v2_needs_the_external_id() -> None:
    with pytest.raises(InputError):
        find(Versori({}), external_id="")


# --- Connect API v1 ----------------------------------------------------------------------------


def test_v1_finds_the_connection_by_exact_name_across_pages() -> None:
    versori = Versori(
        {
            ("connections", ""): {
                "items": [
                    {"id": "C9", "name": "Tenant acme 2", "createdAt": "x", "updatedAt": "x"}
                ],
                "totalCount": 2,
                "next": "p2",
            },
            ("connections", "p2"): {
                "items": [{"id": "C1", "name": "Tenant acme", "createdAt": "x", "updatedAt": "x"}],
                "totalCount": 2,
            },
        }
    )
    found = find(versori, api="connect-v1", external_id="")
    assert found is not None and found.id == "C1" and found.system_id is None
    assert [r.url.path for r in versori.requests] == [
        f"/api/v2/o/{ORG}/connectors/{SYSTEM}/connections"
    ] * 2
    assert versori.params(0) == {"first": "100"}
    assert versori.params(1) == {"first": "100", "after": "p2"}
    assert find(versori, api="connect-v1", name="Tenant") is None


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, ServerError), (503, ServerError), (404, NotFoundError), (401, AuthenticationError)],
)
def test_an_error_status_is_typed(status: int, error: type[APIError]) -> None:
    versori = Versori({("users", ""): {"code": "boom", "message": "no"}}, status=status)
    with pytest.raises(error) as info:
        find(versori)
    assert info.value.status == status and info.value.code == "boom"
    assert API_KEY not in str(info.value)


@pytest.mark.parametrize(
    "page",
    [b"not json", {"users": "many"}, {"items": []}, {"users": [{"id": "", "externalId": "x"}]}],
)
def test_a_2xx_that_is_no_page_is_invalid_response(page: Any) -> None:
    with pytest.raises(APIError) as info:
        find(Versori({("users", ""): page}))
    assert info.value.code == "invalid_response" and info.value.status == 200


def test_paging_is_bounded() -> None:
    requests: list[httpx.Request] = []

    def endless(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(
            200, json={"users": [], "totalCount": 9999, "next": f"p{len(requests)}"}
        )

    with pytest.raises(APIError) as info:
        find(endless)
    assert info.value.code == "invalid_response" and str(MAX_PAGES) in info.value.message
    assert len(requests) == MAX_PAGES


def test_a_cursor_that_comes_back_is_a_loop() -> None:
    versori = Versori({("users", ""): {"users": [], "totalCount": 1, "next": "same"}})
    versori.pages[("users", "same")] = versori.pages[("users", "")]
    with pytest.raises(APIError) as info:
        find(versori)
    assert info.value.code == "invalid_response" and len(versori.requests) == 2


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError, APIConnectionError),
        (httpx.RemoteProtocolError, APIConnectionError),
        (httpx.ReadTimeout, APITimeoutError),
        (httpx.ConnectTimeout, APITimeoutError),
    ],
)
def test_transport_errors_are_typed(
    raised: type[httpx.TransportError], expected: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised(f"failed {request.url}", request=request)

    with pytest.raises(APIConnectionError) as info:
        find(handler)
    assert type(info.value) is expected
    assert API_KEY not in str(info.value)


def test_the_whole_lookup_shares_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each request costs 0.75 s, so a 2.5 s deadline leaves 1.75 s to the
    second request and 1 s to the third; at 1.5 s each, the second overruns it."""
    now = [1000.0]

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(client_module, "time", FakeTime)
    versori = Versori(
        {
            ("users", ""): {"users": [], "totalCount": 1, "next": "p2"},
            ("users", "p2"): {"users": [user("acme", ACME_ID)], "totalCount": 1},
            ("connections", ""): {"items": [connection("C1")], "totalCount": 1},
        }
    )

    def slow(request: httpx.Request) -> httpx.Response:
        answer = versori(request)
        now[0] += 0.75
        return answer

    found = find(slow, read_timeout=30.0, deadline=2.5)
    assert found is not None
    reads = [r.extensions["timeout"]["read"] for r in versori.requests]
    assert reads == pytest.approx([2.5, 1.75, 1.0])

    now[0] = 2000.0
    versori.requests.clear()

    def slower(request: httpx.Request) -> httpx.Response:
        answer = versori(request)
        now[0] += 1.5
        return answer

    with pytest.raises(APITimeoutError):
        find(slower, read_timeout=30.0, deadline=2.5)
    assert len(versori.requests) == 2, "the lookup ends in the second request"


def test_the_deadline_is_never_longer_than_the_clients() -> None:
    versori = Versori({("users", ""): {"users": [], "totalCount": 0}})
    find(versori, call_deadline=1.0, deadline=8.0)
    assert versori.requests[0].extensions["timeout"]["read"] <= 1.0


@pytest.mark.parametrize("deadline", [0, -1, float("nan"), float("inf")])
def test_a_bad_deadline_is_refused(deadline: float) -> None:
    with pytest.raises(InputError):
        find(Versori({}), deadline=deadline)


def test_waiting_for_a_free_slot_counts_against_the_deadline() -> None:
    versori = Versori({("users", ""): {"users": [], "totalCount": 0}})
    with make_client(versori, max_connections=1) as client:
        assert client._slots.acquire(timeout=1)
        began = time.monotonic()
        with pytest.raises(APITimeoutError) as info:
            client.find_connection(ORG, SYSTEM, external_id="acme", name="x", deadline=0.2)
        assert 0.15 <= time.monotonic() - began < 2.0
        assert "no free connection" in str(info.value)
        client._slots.release()
        assert client.find_connection(ORG, SYSTEM, external_id="acme", name="x") is None
    assert len(versori.requests) == 1


def test_a_failed_page_gives_its_slot_back() -> None:
    versori = Versori({("users", ""): {"code": "boom", "message": "no"}}, status=500)
    with make_client(versori, max_connections=1) as client:
        for _ in range(3):
            with pytest.raises(ServerError):
                client.find_connection(ORG, SYSTEM, external_id="acme", name="x", deadline=1)
    assert len(versori.requests) == 3


# --- create_connection's deadline --------------------------------------------------------------


def test_create_connection_takes_a_shorter_deadline() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(201, json=connection("C1"))

    with make_client(handler, read_timeout=30.0) as client:
        made = client.create_connection(
            ORG,
            SYSTEM,
            code="c",
            state="s",
            name="n",
            external_id="acme",
            template_id=TEMPLATE,
            deadline=10.0,
        )
        assert made.id == "C1" and made.connection_template_id == TEMPLATE
        client.create_connection(
            ORG, SYSTEM, code="c", state="s", name="n", external_id="acme", template_id=TEMPLATE
        )
    assert 9.0 < requests[0].extensions["timeout"]["read"] <= 10.0
    assert requests[1].extensions["timeout"]["read"] == 30.0
