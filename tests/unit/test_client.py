"""Unit tests for onboarding.versori.client: one attempt, every failure typed, no secret in any
error.

Everything goes through httpx.MockTransport except one test, which needs a real socket to show
that the call deadline interrupts a server that trickles its body.
"""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from onboarding import constants
from onboarding.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FieldError,
    InputError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    RateLimitedError,
    RetryableStatusError,
    ServerError,
    VersoriError,
    is_transient,
)
from onboarding.settings import VersoriSettings
from onboarding.versori import client as client_module
from onboarding.versori.client import VersoriClient, parse_retry_after
from onboarding.versori.wire import InitialiseRequest

API_KEY = "vk_live_Sup3rSecretKey0123456789abcdef"
BASE_URL = "https://x.example/api/connect/v1"
ORG = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0"
CONNECTOR = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C1"
CREDENTIAL = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2"
EXPECTED_URL = f"{BASE_URL}/o/{ORG}/connectors/{CONNECTOR}/oauth2/initialise"
AUTHORIZE_RESULT = "https://auth.example.com/authorize?response_type=code&state=abc"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERSORI_API_KEY", raising=False)
    monkeypatch.delenv("VERSORI_BASE_URL", raising=False)


def make_request(**overrides: Any) -> InitialiseRequest:
    fields: dict[str, Any] = {
        "credential": {"id": CREDENTIAL, "organisation_id": ORG},
        "authorize_url": "https://auth.example.com/authorize",
        "client_id": "client-123",
        "scopes": ["openid", "email"],
    }
    fields.update(overrides)
    return InitialiseRequest.model_validate(fields)


def make_client(handler: Handler, **kwargs: Any) -> VersoriClient:
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("base_url", BASE_URL)
    return VersoriClient(transport=httpx.MockTransport(handler), **kwargs)


def call(handler: Handler, request: InitialiseRequest | None = None, **kwargs: Any) -> str:
    with make_client(handler, **kwargs) as client:
        return client.initialise(ORG, CONNECTOR, request or make_request())


def fail(handler: Handler, **kwargs: Any) -> VersoriError:
    with pytest.raises(VersoriError) as info:
        call(handler, **kwargs)
    return info.value


def answer(status: int, body: Any = None, **kwargs: Any) -> Handler:
    """A handler answering `status` with `body`: bytes as they are (streamed, so that decoding
    happens in the client, as with a real server), anything else as JSON."""

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, stream=httpx.ByteStream(body), **kwargs)
        return httpx.Response(status, json=body, **kwargs)

    return handler


def raising(exc_type: type[httpx.HTTPError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated failure", request=request)  # type: ignore[call-arg]

    return handler


def assert_no_secret(exc: BaseException) -> None:
    for text in (str(exc), repr(exc)):
        assert API_KEY not in text
    if exc.__cause__ is not None:
        assert API_KEY not in str(exc.__cause__)
        assert API_KEY not in repr(exc.__cause__)


# --- request shape ------------------------------------------------------------------------


class Recorder:
    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response or httpx.Response(200, json={"url": AUTHORIZE_RESULT})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response


def test_request_shape_method_path_headers_and_body() -> None:
    recorder = Recorder()
    request = make_request(
        prompt="consent",
        disable_offline_access=True,
        additional_params="access_type=offline&hd=example.com",
    )
    assert call(recorder, request) == AUTHORIZE_RESULT

    [sent] = recorder.requests
    assert sent.method == "POST"
    assert str(sent.url) == EXPECTED_URL
    assert sent.url.path == f"/api/connect/v1/o/{ORG}/connectors/{CONNECTOR}/oauth2/initialise"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "application/json"
    assert json.loads(sent.content) == {
        "credential": {"id": CREDENTIAL, "organisationId": ORG},
        "authorizeUrl": "https://auth.example.com/authorize",
        "clientId": "client-123",
        "scopes": ["openid", "email"],
        "disableOfflineAccess": True,
        "prompt": "consent",
        "additionalParams": "access_type=offline&hd=example.com",
    }


def test_request_body_omits_prompt_when_none_and_sends_defaults() -> None:
    recorder = Recorder()
    call(recorder, make_request())
    body = json.loads(recorder.requests[0].content)
    assert "prompt" not in body
    assert body == {
        "credential": {"id": CREDENTIAL, "organisationId": ORG},
        "authorizeUrl": "https://auth.example.com/authorize",
        "clientId": "client-123",
        "scopes": ["openid", "email"],
        "disableOfflineAccess": False,
        "additionalParams": "",
    }
    # No snake_case key leaks onto the wire, at any depth.
    assert not [key for key in [*body, *body["credential"]] if "_" in key]


@pytest.mark.parametrize(
    ("base_url", "expected_prefix"),
    [
        ("https://x.example/api/connect/v1", "https://x.example/api/connect/v1"),
        ("https://x.example/api/connect/v1/", "https://x.example/api/connect/v1"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://x.example", "https://x.example"),
    ],
)
def test_path_is_appended_to_base_url_path(base_url: str, expected_prefix: str) -> None:
    recorder = Recorder()
    call(recorder, base_url=base_url)
    expected = f"{expected_prefix}/o/{ORG}/connectors/{CONNECTOR}/oauth2/initialise"
    assert str(recorder.requests[0].url) == expected


def test_path_segments_are_percent_encoded() -> None:
    recorder = Recorder()
    with make_client(recorder) as client:
        client.initialise("org/../x", "conn?y", make_request())
    assert recorder.requests[0].url.raw_path == (
        b"/api/connect/v1/o/org%2F..%2Fx/connectors/conn%3Fy/oauth2/initialise"
    )


def test_api_key_and_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERSORI_API_KEY", "env-key-123")
    monkeypatch.setenv("VERSORI_BASE_URL", "https://staging.example/v9")
    recorder = Recorder()
    settings = VersoriSettings()
    with VersoriClient.from_settings(settings, transport=httpx.MockTransport(recorder)) as client:
        assert client.host == "staging.example"
        client.initialise(ORG, CONNECTOR, make_request())
    sent = recorder.requests[0]
    assert sent.headers["authorization"] == "Bearer env-key-123"
    assert str(sent.url).startswith("https://staging.example/v9/o/")


def test_default_base_url_is_production() -> None:
    recorder = Recorder()
    with VersoriClient(api_key=API_KEY, transport=httpx.MockTransport(recorder)) as client:
        client.initialise(ORG, CONNECTOR, make_request())
    assert str(recorder.requests[0].url).startswith(constants.PRODUCTION_BASE_URL + "/o/")


def test_every_timeout_is_bounded_by_the_call_deadline() -> None:
    recorder = Recorder()
    call(recorder, connect_timeout=5.0, read_timeout=30.0, call_deadline=2.0)
    timeout = recorder.requests[0].extensions["timeout"]
    assert set(timeout) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 2.0 for value in timeout.values())


def test_short_timeouts_are_kept_under_a_long_deadline() -> None:
    recorder = Recorder()
    call(recorder, connect_timeout=0.5, read_timeout=0.75, call_deadline=60.0)
    timeout = recorder.requests[0].extensions["timeout"]
    assert timeout["connect"] == 0.5
    assert timeout["read"] == 0.75
    assert timeout["write"] == 0.75


# --- success and malformed success --------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_success_returns_the_url(status: int) -> None:
    assert call(answer(status, {"url": AUTHORIZE_RESULT, "extra": 1})) == AUTHORIZE_RESULT


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"not json", b"null", b"[]", b'{"url": 5}', b'{"URL": "x"}', b"\xff\xfe"],
)
def test_2xx_without_a_json_url_is_invalid_response(body: bytes) -> None:
    exc = fail(answer(200, body))
    assert type(exc) is APIError
    assert exc.code == "invalid_response"
    assert exc.status == 200
    assert not is_transient(exc)
    assert_no_secret(exc)


def test_oversized_body_is_invalid_response() -> None:
    exc = fail(answer(200, b"x" * ((1 << 20) + 10)))
    assert type(exc) is APIError
    assert exc.code == "invalid_response"
    assert "too large" in exc.message


def test_undecodable_2xx_body_is_invalid_response() -> None:
    exc = fail(answer(200, b"not gzip at all", headers={"Content-Encoding": "gzip"}))
    assert type(exc) is APIError
    assert exc.code == "invalid_response"
    assert exc.status == 200


def test_undecodable_error_body_keeps_the_status_class() -> None:
    exc = fail(answer(503, b"not gzip at all", headers={"Content-Encoding": "gzip"}))
    assert type(exc) is ServerError
    assert exc.code == "http_503"
    assert is_transient(exc)


def test_gzip_encoded_success_is_decoded() -> None:
    body = gzip.compress(json.dumps({"url": AUTHORIZE_RESULT}).encode())
    assert call(answer(200, body, headers={"Content-Encoding": "gzip"})) == AUTHORIZE_RESULT


# --- error statuses -----------------------------------------------------------------------

STATUS_TABLE = [
    (400, BadRequestError, False),
    (401, AuthenticationError, False),
    (403, PermissionDeniedError, False),
    (404, NotFoundError, False),
    (408, RetryableStatusError, True),
    (409, ConflictError, False),
    (412, PreconditionFailedError, False),
    (418, APIError, False),
    (422, APIError, False),
    (425, RetryableStatusError, True),
    (429, RateLimitedError, True),
    (500, ServerError, True),
    (502, ServerError, True),
    (503, ServerError, True),
    (504, ServerError, True),
    (302, APIError, False),
]


@pytest.mark.parametrize(("status", "cls", "transient"), STATUS_TABLE)
def test_status_maps_to_its_class(status: int, cls: type[APIError], transient: bool) -> None:
    body = {"code": "versori_code", "message": "Versori says no", "details": "trace 42"}
    exc = fail(answer(status, body))
    assert type(exc) is cls
    assert isinstance(exc, APIError)
    assert exc.status == status
    assert exc.code == "versori_code"
    assert exc.message == "Versori says no"
    assert exc.details == "trace 42"
    assert exc.fields == []
    assert is_transient(exc) is transient
    assert str(exc) == f"HTTP {status} versori_code: Versori says no"
    assert_no_secret(exc)


@pytest.mark.parametrize(("status", "cls", "transient"), STATUS_TABLE)
def test_non_json_error_body_gets_http_status_code(
    status: int, cls: type[APIError], transient: bool
) -> None:
    exc = fail(answer(status, b"<html>Bad Gateway</html>"))
    assert type(exc) is cls
    assert isinstance(exc, APIError)
    assert exc.code == f"http_{status}"
    assert exc.status == status
    assert exc.message  # a reason phrase, never empty
    assert is_transient(exc) is transient


def test_non_json_error_message_is_the_reason_phrase() -> None:
    assert fail(answer(503, b"")).message == "Service Unavailable"  # type: ignore[attr-defined]
    unknown = fail(answer(599, b"oops"))
    assert type(unknown) is ServerError
    assert unknown.code == "http_599"
    assert unknown.message == "error without a Versori error body"


@pytest.mark.parametrize(
    "body",
    [{"message": "no code"}, {"code": "x"}, {"code": 5, "message": "m"}, ["code", "message"]],
)
def test_json_error_body_without_code_and_message_falls_back(body: Any) -> None:
    exc = fail(answer(404, body))
    assert type(exc) is NotFoundError
    assert exc.code == "http_404"
    assert exc.message == "Not Found"


def test_400_parses_fields() -> None:
    body = {
        "code": "validation_failed",
        "message": "the request is invalid",
        "fields": [
            {"field": "credential.id", "message": "not found"},
            {"field": "authorizeUrl", "message": "must be https"},
        ],
        "details": "see docs",
    }
    exc = fail(answer(400, body))
    assert type(exc) is BadRequestError
    assert exc.fields == [
        FieldError("credential.id", "not found"),
        FieldError("authorizeUrl", "must be https"),
    ]
    assert all(isinstance(f, FieldError) for f in exc.fields)
    assert exc.details == "see docs"
    assert str(exc) == (
        "HTTP 400 validation_failed: the request is invalid "
        "(credential.id: not found; authorizeUrl: must be https)"
    )
    assert not is_transient(exc)


def test_null_fields_and_structured_details_keep_versori_code() -> None:
    exc = fail(answer(400, {"code": "bad", "message": "m", "fields": None, "details": None}))
    assert (exc.code, exc.message, exc.fields, exc.details) == ("bad", "m", [], "")  # type: ignore[attr-defined]
    exc = fail(answer(409, {"code": "conflict", "message": "m", "details": {"id": [1, 2]}}))
    assert type(exc) is ConflictError
    assert exc.code == "conflict"
    assert json.loads(exc.details) == {"id": [1, 2]}


@pytest.mark.parametrize(
    ("header", "expected"),
    [({"Retry-After": "7"}, 7.0), ({"Retry-After": "soon"}, None), ({}, None)],
)
def test_429_carries_retry_after(header: dict[str, str], expected: float | None) -> None:
    exc = fail(answer(429, {"code": "rate_limited", "message": "slow down"}, headers=header))
    assert isinstance(exc, RateLimitedError)
    assert exc.retry_after == expected
    assert exc.code == "rate_limited"
    assert is_transient(exc)


def test_429_with_non_json_body_still_carries_retry_after() -> None:
    exc = fail(answer(429, b"Too Many", headers={"Retry-After": "3"}))
    assert isinstance(exc, RateLimitedError)
    assert exc.code == "http_429"
    assert exc.retry_after == 3.0


# --- one attempt only ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "response", [answer(503, {"code": "c", "message": "m"}), raising(httpx.ConnectError)]
)
def test_exactly_one_attempt_per_call(response: Handler) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return response(request)

    with pytest.raises(VersoriError):
        call(handler)
    assert calls == 1


# --- transport errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("httpx_error", "expected"),
    [
        (httpx.ConnectError, APIConnectionError),
        (httpx.RemoteProtocolError, APIConnectionError),
        (httpx.ReadError, APIConnectionError),
        (httpx.WriteError, APIConnectionError),
        (httpx.UnsupportedProtocol, APIConnectionError),
        (httpx.ReadTimeout, APITimeoutError),
        (httpx.ConnectTimeout, APITimeoutError),
        (httpx.WriteTimeout, APITimeoutError),
        (httpx.PoolTimeout, APITimeoutError),
    ],
)
def test_transport_errors_are_mapped_and_chained(
    httpx_error: type[httpx.HTTPError], expected: type[APIConnectionError]
) -> None:
    exc = fail(raising(httpx_error))
    assert type(exc) is expected
    assert isinstance(exc.__cause__, httpx_error)
    assert is_transient(exc)
    assert "x.example" in str(exc)
    assert exc.code == ("timeout" if expected is APITimeoutError else "connection_error")
    assert_no_secret(exc)


class _Body(httpx.SyncByteStream):
    """A response body that yields chunks, then optionally raises."""

    def __init__(
        self,
        chunks: list[bytes],
        error: Exception | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.chunks = chunks
        self.error = error
        self.tick = tick

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if self.tick is not None:
                self.tick()
            yield chunk
        if self.error is not None:
            raise self.error


def test_timeout_while_reading_the_body_is_a_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = httpx.ReadTimeout("stalled", request=request)
        return httpx.Response(200, stream=_Body([b'{"url": '], error))

    exc = fail(handler)
    assert type(exc) is APITimeoutError
    assert isinstance(exc.__cause__, httpx.ReadTimeout)


def test_connection_lost_while_reading_the_body_is_a_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = httpx.RemoteProtocolError("peer closed", request=request)
        return httpx.Response(500, stream=_Body([b"{"], error))

    exc = fail(handler)
    assert type(exc) is APIConnectionError
    assert isinstance(exc.__cause__, httpx.RemoteProtocolError)


def test_call_deadline_is_checked_between_body_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each chunk costs 0.4 s, so a 1 s deadline trips on the third chunk."""
    now = [1000.0]

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    def tick() -> None:
        now[0] += 0.4

    monkeypatch.setattr(client_module, "time", FakeTime)
    delivered: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        def counting_tick() -> None:
            tick()
            delivered.append(1)

        return httpx.Response(200, stream=_Body([b"{"] * 10, tick=counting_tick))

    exc = fail(handler, call_deadline=1.0)
    assert type(exc) is APITimeoutError
    assert "1 s" in str(exc)
    assert len(delivered) == 3
    assert is_transient(exc)


# --- Retry-After --------------------------------------------------------------------------

FROZEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("-3", 0.0),
        ("1.5", 1.5),
        (format_datetime(FROZEN + timedelta(seconds=10), usegmt=True), 10.0),
        ("Thu, 02 Jan 2025 03:04:15 GMT", 10.0),
        (format_datetime(FROZEN - timedelta(hours=1), usegmt=True), 0.0),
        ("Thu, 02 Jan 2025 03:04:15 -0000", 10.0),  # no zone: taken as UTC
        ("soon", None),
        ("", None),
        ("   ", None),
        (None, None),
        ("nan", None),
        ("inf", None),
        ("-inf", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = parse_retry_after(value, now=lambda: FROZEN)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


HOSTILE_RETRY_AFTER = [
    "86400",
    "1e300",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Fri, 31 Dec 9999 23:59:59 -2359",
]


@pytest.mark.parametrize("value", HOSTILE_RETRY_AFTER)
def test_parse_retry_after_clamps_a_hostile_value_to_the_cap(value: str) -> None:
    result = parse_retry_after(value, now=lambda: FROZEN)
    assert result == constants.MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize("value", HOSTILE_RETRY_AFTER)
def test_a_hostile_retry_after_brakes_the_batch_for_the_cap_at_most(value: str) -> None:
    """The 429 brake gets the clamped value: no day-long stall, no OverflowError in sleep."""
    from onboarding.batch.call_pacing import Pacer

    exc = fail(
        answer(429, {"code": "rate_limited", "message": "m"}, headers={"Retry-After": value})
    )
    assert isinstance(exc, RateLimitedError)
    assert exc.retry_after is not None
    assert exc.retry_after <= constants.MAX_RETRY_AFTER_SECONDS
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(clock=lambda: now[0], sleep=sleep)
    pacer.hold_off(exc.retry_after)  # as the 429 handler does
    pacer.wait_before_call()
    assert sum(slept) <= constants.MAX_RETRY_AFTER_SECONDS


def test_parse_retry_after_defaults_to_the_real_clock() -> None:
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=100), usegmt=True)
    result = parse_retry_after(future)
    assert result is not None
    assert 95.0 <= result <= 100.0


# --- configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize("api_key", [None, ""])
def test_missing_api_key_is_an_input_error(api_key: str | None) -> None:
    with pytest.raises(InputError) as info:
        VersoriClient(api_key=api_key, base_url=BASE_URL)
    assert "VERSORI_API_KEY" in str(info.value)
    assert info.value.code == "bad_input"
    assert not is_transient(info.value)


@pytest.mark.parametrize(
    "api_key",
    [API_KEY + "\n", " " + API_KEY, API_KEY + "é", API_KEY[:10] + " " + API_KEY[10:]],
)
def test_unusable_api_key_is_an_input_error_that_does_not_quote_it(api_key: str) -> None:
    with pytest.raises(InputError) as info:
        VersoriClient(api_key=api_key, base_url=BASE_URL)
    assert "VERSORI_API_KEY" in str(info.value)
    assert_no_secret(info.value)
    assert API_KEY[:10] not in str(info.value)


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://x.example/api",
        "x.example/api",
        "not a url",
        "https://",
        "https://x.example:abc/api",
        "https://x.example:99999/api",
        "https://[::1",
        "https://x.example/api?version=1",
        "https://x.example/api#v1",
    ],
)
def test_bad_base_url_is_an_input_error(base_url: str) -> None:
    with pytest.raises(InputError) as info:
        VersoriClient(api_key=API_KEY, base_url=base_url)
    assert "VERSORI_BASE_URL" in str(info.value)
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    "base_url",
    [
        "http://platform.versori.com/api/connect/v1",
        "http://10.0.0.5:8700",
        "http://emulator.internal:8700",
        "http://user:pw@x.example/api",
    ],
)
def test_plain_http_to_a_remote_base_url_is_refused(base_url: str) -> None:
    """The API key rides in every request's header: never in clear across a network."""
    with pytest.raises(InputError) as info:
        VersoriClient(api_key=API_KEY, base_url=base_url)
    message = str(info.value)
    assert "VERSORI_BASE_URL" in message
    assert "https" in message
    assert "pw" not in message
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:8700", "http://localhost:8700/api", "http://[::1]:8700", "http://127.9.9.9"],
)
def test_plain_http_to_loopback_stays_allowed_for_the_emulator(base_url: str) -> None:
    VersoriClient(api_key=API_KEY, base_url=base_url).close()


def test_a_bad_base_url_is_never_quoted() -> None:
    """It may hold credentials (user:password@, a token in the query)."""
    with pytest.raises(InputError) as info:
        VersoriClient(api_key=API_KEY, base_url="https://user:hunter2@x.example/api?token=s3cr3t")
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


def test_bad_base_url_from_environment_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERSORI_BASE_URL", "platform.versori.com/api")
    with pytest.raises(InputError, match="VERSORI_BASE_URL"):
        VersoriClient.from_settings(VersoriSettings(), api_key=API_KEY)


def test_the_client_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its key, base URL and timeouts are its caller's (from_settings: the settings')."""
    monkeypatch.setenv("VERSORI_API_KEY", "env-key-123")
    monkeypatch.setenv("VERSORI_BASE_URL", "https://staging.example/v9")
    with pytest.raises(InputError, match="VERSORI_API_KEY is not set"):
        VersoriClient()
    with VersoriClient(api_key=API_KEY) as client:
        assert client.base_url == constants.PRODUCTION_BASE_URL


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        *(answer(status, {"code": "c", "message": "m"}) for status, _, _ in STATUS_TABLE),
        *(answer(status, b"plain") for status, _, _ in STATUS_TABLE),
        answer(200, b"{}"),
        answer(200, b"x" * ((1 << 20) + 1)),
        raising(httpx.ConnectError),
        raising(httpx.ConnectTimeout),
        raising(httpx.ReadTimeout),
        raising(httpx.RemoteProtocolError),
    ],
)
def test_api_key_never_appears_in_any_error(handler: Handler) -> None:
    def echoing(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        return handler(request)

    assert_no_secret(fail(echoing))


def test_client_repr_does_not_show_the_key() -> None:
    with make_client(Recorder()) as client:
        assert API_KEY not in repr(client)
        assert API_KEY not in str(vars(client).get("base_url"))


# --- the deadline against a real socket ---------------------------------------------------


class _TricklingHandler(http.server.BaseHTTPRequestHandler):
    """Answers headers at once, then one body byte every 0.2 s for 10 s."""

    stop: threading.Event

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "50")
        self.end_headers()
        self.wfile.flush()
        for _ in range(50):
            if self.stop.wait(0.2):
                return
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def trickling_server() -> Iterator[str]:
    stop = threading.Event()
    handler = type("Handler", (_TricklingHandler,), {"stop": stop})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_call_deadline_interrupts_a_trickling_body(trickling_server: str) -> None:
    client = VersoriClient(
        api_key=API_KEY, base_url=trickling_server, call_deadline=1.0, read_timeout=5
    )
    started = time.monotonic()
    with client, pytest.raises(APITimeoutError) as info:
        client.initialise(ORG, CONNECTOR, make_request())
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0
    assert "did not finish answering" in str(info.value)
    assert is_transient(info.value)
    assert_no_secret(info.value)


# --- the environment's proxy ---------------------------------------------------------------


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_the_environment_names_the_proxy_as_httpx_reads_it(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    from onboarding.versori.client import environment_proxy

    assert environment_proxy("https://platform.versori.com") is None
    no_proxy_env.setenv("HTTPS_PROXY", "proxy.internal:3128")
    assert environment_proxy("https://platform.versori.com") == "http://proxy.internal:3128"
    assert environment_proxy("http://127.0.0.1:8000") is None, "HTTPS_PROXY is for https"
    no_proxy_env.setenv("ALL_PROXY", "http://all.internal:1")
    assert environment_proxy("http://127.0.0.1:8000") == "http://all.internal:1"
    no_proxy_env.setenv("NO_PROXY", ".versori.com,127.0.0.1")
    assert environment_proxy("https://platform.versori.com") is None
    assert environment_proxy("http://127.0.0.1:8000") is None


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers itself: records the absolute URL it was asked for."""

    asked: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.asked.append(self.path)
        body = json.dumps({"url": AUTHORIZE_RESULT}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_calls_go_through_the_proxy_the_environment_names(no_proxy_env: pytest.MonkeyPatch) -> None:
    """As they did through httpx.Client: the client now sends straight to a transport, which
    reads no environment, so it hands the transport the proxy itself."""
    asked: list[str] = []
    handler = type("Handler", (_ProxyHandler,), {"asked": asked})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        no_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        with VersoriClient(api_key=API_KEY, base_url="http://localhost:9") as client:
            assert client.initialise(ORG, CONNECTOR, make_request()) == AUTHORIZE_RESULT
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)
    assert asked == [f"http://localhost:9/o/{ORG}/connectors/{CONNECTOR}/oauth2/initialise"]
