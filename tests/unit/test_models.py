"""Unit tests for onboarding.versori.wire (wire models, ULIDs, additional params) and the error
tree."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from onboarding.constants import RESERVED_QUERY_KEYS
from onboarding.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FieldError,
    InputError,
    LinkCheckError,
    NotFoundError,
    OnboardingError,
    PermissionDeniedError,
    PreconditionFailedError,
    Problem,
    RateLimitedError,
    RetryableStatusError,
    ServerError,
    VersoriError,
    error_class_for,
    is_transient,
)
from onboarding.versori.wire import (
    CredentialRef,
    ErrorBody,
    InitialiseRequest,
    InitialiseResponse,
    check_absolute_url,
    parse_additional_params,
)

GOOD_ULID = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0"
OTHER_ULID = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C1"


def request_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "credential": {"id": GOOD_ULID, "organisationId": OTHER_ULID},
        "authorizeUrl": "https://auth.example.com/authorize",
        "clientId": "client-123",
    }
    fields.update(overrides)
    return fields


# --- ULIDs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (GOOD_ULID, GOOD_ULID),
        (GOOD_ULID.lower(), GOOD_ULID),
        ("01j9Z6zq7T8kx3N5v2W4y6A8c0", GOOD_ULID),
        (f"  {GOOD_ULID}\n", GOOD_ULID),
        ("00000000000000000000000000", "00000000000000000000000000"),
        ("7ZZZZZZZZZZZZZZZZZZZZZZZZZ", "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"),
    ],
)
def test_ulid_accepted_and_normalised(value: str, expected: str) -> None:
    ref = CredentialRef.model_validate({"id": value, "organisationId": value})
    assert ref.id == expected
    assert ref.organisation_id == expected


@pytest.mark.parametrize(
    "value",
    [
        GOOD_ULID[:-1],  # 25 characters
        GOOD_ULID + "0",  # 27 characters
        "",
        GOOD_ULID[:-1] + "U",  # not in Crockford base32
        GOOD_ULID[:-1] + "I",
        GOOD_ULID[:-1] + "L",
        GOOD_ULID[:-1] + "O",
        GOOD_ULID[:-1] + "-",
        GOOD_ULID[:-1] + "é",
        "8" + GOOD_ULID[1:],  # overflows 128 bits
        "01J9Z6ZQ7T-8KX3N5V2W4Y6A8C",
    ],
)
def test_ulid_rejected(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        CredentialRef.model_validate({"id": value, "organisationId": GOOD_ULID})
    [error] = info.value.errors()
    assert error["loc"] == ("id",)
    assert "is not a ULID" in error["msg"]


def test_ulid_must_be_a_string() -> None:
    with pytest.raises(ValidationError):
        CredentialRef.model_validate({"id": 123, "organisationId": GOOD_ULID})


def test_credential_accepts_snake_and_camel_case() -> None:
    camel = CredentialRef.model_validate({"id": GOOD_ULID, "organisationId": OTHER_ULID})
    snake = CredentialRef.model_validate({"id": GOOD_ULID, "organisation_id": OTHER_ULID})
    assert camel == snake
    assert camel.model_dump(by_alias=True) == {"id": GOOD_ULID, "organisationId": OTHER_ULID}


# --- additional params --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", []),
        ("access_type=offline", [("access_type", "offline")]),
        ("a=1&b=two%20words&c=x+y", [("a", "1"), ("b", "two words"), ("c", "x y")]),
        ("hint=a%2Bb%40example.com", [("hint", "a+b@example.com")]),
        ("blank=", [("blank", "")]),
        ("a=1&a=2", [("a", "1"), ("a", "2")]),
        ("approval_prompt=force", [("approval_prompt", "force")]),
        ("Scope=x", [("Scope", "x")]),  # keys are case-sensitive
    ],
)
def test_parse_additional_params(query: str, expected: list[tuple[str, str]]) -> None:
    assert parse_additional_params(query) == expected


@pytest.mark.parametrize("key", sorted(RESERVED_QUERY_KEYS))
def test_each_reserved_key_is_refused_by_name(key: str) -> None:
    with pytest.raises(ValueError, match=f"^sets {key}, which Versori sets itself"):
        parse_additional_params(f"hd=example.com&{key}=x")


def test_reserved_key_refused_when_percent_encoded() -> None:
    with pytest.raises(ValueError, match=r"^sets scope,"):
        parse_additional_params("sc%6Fpe=openid")


def test_every_clashing_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"^sets prompt, state, which"):
        parse_additional_params("state=1&prompt=2&ok=3")


def test_reserved_keys_are_the_ones_versori_sets() -> None:
    assert {
        "redirect_uri",
        "state",
        "prompt",
        "scope",
        "response_type",
        "client_id",
    } == RESERVED_QUERY_KEYS


@pytest.mark.parametrize("query", ["a", "a=1&b", "a=1&&b=2", "a=1&", "&", "&a=1"])
def test_malformed_additional_params(query: str) -> None:
    with pytest.raises(ValueError, match="not a URL-encoded query string"):
        parse_additional_params(query)


def test_request_refuses_reserved_additional_params() -> None:
    with pytest.raises(ValidationError) as info:
        InitialiseRequest.model_validate(request_fields(additionalParams="redirect_uri=https://x"))
    [error] = info.value.errors()
    assert error["loc"] == ("additionalParams",)
    assert "sets redirect_uri" in error["msg"]


def test_request_refuses_malformed_additional_params() -> None:
    with pytest.raises(ValidationError, match="not a URL-encoded query string"):
        InitialiseRequest.model_validate(request_fields(additionalParams="justakey"))


# --- InitialiseRequest --------------------------------------------------------------------


def test_to_wire_is_camel_case_with_every_field() -> None:
    request = InitialiseRequest(
        credential=CredentialRef(id=GOOD_ULID.lower(), organisation_id=OTHER_ULID),
        authorize_url="https://auth.example.com/authorize?tenant=acme",
        client_id="client-123",
        scopes=["openid", "email"],
        disable_offline_access=True,
        prompt="consent",
        additional_params="access_type=offline",
    )
    assert request.to_wire() == {
        "credential": {"id": GOOD_ULID, "organisationId": OTHER_ULID},
        "authorizeUrl": "https://auth.example.com/authorize?tenant=acme",
        "clientId": "client-123",
        "scopes": ["openid", "email"],
        "disableOfflineAccess": True,
        "prompt": "consent",
        "additionalParams": "access_type=offline",
    }


def test_to_wire_omits_prompt_when_none_and_keeps_defaults() -> None:
    wire = InitialiseRequest.model_validate(request_fields()).to_wire()
    assert wire == {
        "credential": {"id": GOOD_ULID, "organisationId": OTHER_ULID},
        "authorizeUrl": "https://auth.example.com/authorize",
        "clientId": "client-123",
        "scopes": [],
        "disableOfflineAccess": False,
        "additionalParams": "",
    }


def test_to_wire_keeps_an_empty_prompt() -> None:
    wire = InitialiseRequest.model_validate(request_fields(prompt="")).to_wire()
    assert wire["prompt"] == ""


def test_request_round_trips_through_the_wire() -> None:
    request = InitialiseRequest.model_validate(
        request_fields(scopes=["a"], prompt="login", additionalParams="x=1")
    )
    assert InitialiseRequest.model_validate(request.to_wire()) == request


@pytest.mark.parametrize(
    "overrides",
    [
        {"clientId": ""},
        {"unknownField": 1},
        {"credential": {"id": GOOD_ULID}},
        {"credential": {"id": GOOD_ULID, "organisationId": OTHER_ULID, "extra": 1}},
        {"scopes": "openid"},
    ],
)
def test_request_rejects_bad_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        InitialiseRequest.model_validate(request_fields(**overrides))


@pytest.mark.parametrize(
    "url",
    [
        "/oauth2/authorize",
        "authorize",
        "auth.example.com/authorize",
        "//auth.example.com/authorize",
        "ftp://auth.example.com/authorize",
        "javascript:alert(1)",
        "https://",
        "https:///authorize",
        "https://auth.example.com/authorize#frag",
        "https://auth.example.com/authorize?x=1#state=1",
    ],
)
def test_authorize_url_must_be_absolute_without_fragment(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        InitialiseRequest.model_validate(request_fields(authorizeUrl=url))
    [error] = info.value.errors()
    assert error["loc"] == ("authorizeUrl",)
    with pytest.raises(ValueError):
        check_absolute_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example.com/authorize",
        "http://localhost:8080/authorize",
        "https://auth.example.com/authorize?tenant=acme&x=",
        "https://[::1]/authorize",
    ],
)
def test_authorize_url_accepts_absolute_urls(url: str) -> None:
    assert check_absolute_url(url) == url
    assert InitialiseRequest.model_validate(request_fields(authorizeUrl=url)).authorize_url == url


# --- response and error bodies ------------------------------------------------------------


def test_response_model() -> None:
    assert InitialiseResponse.model_validate_json(b'{"url": "https://a"}').url == "https://a"
    with pytest.raises(ValidationError):
        InitialiseResponse.model_validate_json(b"{}")


def test_error_body_full_and_minimal() -> None:
    body = ErrorBody.model_validate_json(
        b'{"code": "c", "message": "m", "fields": [{"field": "f", "message": "bad"}],'
        b' "details": "d", "extra": true}'
    )
    assert (body.code, body.message, body.details) == ("c", "m", "d")
    assert [(f.field, f.message) for f in body.fields] == [("f", "bad")]
    minimal = ErrorBody.model_validate_json(b'{"code": "c", "message": "m"}')
    assert (minimal.fields, minimal.details) == ([], "")


def test_error_body_tolerates_null_members_and_structured_details() -> None:
    body = ErrorBody.model_validate_json(
        b'{"code": "c", "message": "m", "fields": null, "details": null}'
    )
    assert (body.fields, body.details) == ([], "")
    body = ErrorBody.model_validate_json(b'{"code": "c", "message": "m", "details": {"a": [1]}}')
    assert body.details == '{"a":[1]}'


@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b'{"code": "c"}', b'{"message": "m"}', b"<html>"]
)
def test_error_body_needs_code_and_message(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        ErrorBody.model_validate_json(raw)


# --- the error tree -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (408, RetryableStatusError),
        (409, ConflictError),
        (412, PreconditionFailedError),
        (425, RetryableStatusError),
        (429, RateLimitedError),
        (500, ServerError),
        (501, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (599, ServerError),
        (300, APIError),
        (302, APIError),
        (402, APIError),
        (405, APIError),
        (410, APIError),
        (418, APIError),
        (422, APIError),
        (451, APIError),
    ],
)
def test_error_class_for(status: int, cls: type[APIError]) -> None:
    assert error_class_for(status) is cls


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (APIError(418, "c", "m"), False),
        (BadRequestError(400, "c", "m"), False),
        (AuthenticationError(401, "c", "m"), False),
        (PermissionDeniedError(403, "c", "m"), False),
        (NotFoundError(404, "c", "m"), False),
        (ConflictError(409, "c", "m"), False),
        (PreconditionFailedError(412, "c", "m"), False),
        (RetryableStatusError(408, "c", "m"), True),
        (RetryableStatusError(425, "c", "m"), True),
        (RateLimitedError(429, "c", "m", retry_after=2.0), True),
        (ServerError(500, "c", "m"), True),
        (APIConnectionError("refused"), True),
        (APITimeoutError("slow"), True),
        (InputError("bad"), False),
        (LinkCheckError(["bad"]), False),
        (ValueError("not ours"), False),
        (TimeoutError("not ours either"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_tree_shape() -> None:
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        PreconditionFailedError,
        RateLimitedError,
        RetryableStatusError,
        ServerError,
    ):
        assert issubclass(cls, APIError)
    assert issubclass(APIError, VersoriError)
    assert issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(APIConnectionError, VersoriError)
    assert issubclass(VersoriError, OnboardingError)
    assert issubclass(InputError, OnboardingError)
    assert issubclass(LinkCheckError, OnboardingError)
    assert not issubclass(APIConnectionError, APIError)


def test_error_codes() -> None:
    assert APIConnectionError("x").code == "connection_error"
    assert APITimeoutError("x").code == "timeout"
    assert InputError("x").code == "bad_input"
    assert LinkCheckError(["x"]).code == "link_check_failed"
    assert ServerError(502, "bad_gateway", "m").code == "bad_gateway"


def test_api_error_text_and_defaults() -> None:
    exc = BadRequestError(400, "invalid", "no", [FieldError("a", "b")], "d")
    assert str(exc) == "HTTP 400 invalid: no (a: b)"
    assert (exc.status, exc.code, exc.message, exc.details) == (400, "invalid", "no", "d")
    plain = APIError(418, "teapot", "short and stout")
    assert plain.fields == []
    assert plain.details == ""
    assert RateLimitedError(429, "c", "m").retry_after is None


def test_input_and_link_errors_text() -> None:
    exc = InputError(
        [Problem("roster.csv", 3, "admin_email", "not an email"), Problem("p.yaml", None, "", "x")],
        hint="fix the roster",
    )
    assert str(exc) == "roster.csv:3: admin_email: not an email\np.yaml: x\nfix the roster"
    assert str(InputError("plain")) == "plain"
    link = LinkCheckError(["has no state", "has a #fragment"])
    assert str(link) == "returned authorize URL failed checks: has no state; has a #fragment"


ERRORS: list[OnboardingError] = [
    APIError(418, "teapot", "short"),
    BadRequestError(400, "invalid", "no", [FieldError("a", "b")], "details"),
    RateLimitedError(429, "rate_limited", "slow down", retry_after=3.5),
    ServerError(503, "http_503", "Service Unavailable"),
    APIConnectionError("could not reach Versori"),
    APITimeoutError("timed out"),
    LinkCheckError(["has no state", "has a #fragment"]),
    InputError([Problem("roster.csv", 3, "admin_email", "not an email")], hint="fix it"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "clone",
    [lambda e: pickle.loads(pickle.dumps(e)), copy.copy, copy.deepcopy],
    ids=["pickle", "copy", "deepcopy"],
)
def test_errors_survive_pickle_and_copy(exc: OnboardingError, clone: Any) -> None:
    """Prefect and process pools pickle or copy exceptions; each must come back whole."""
    again = clone(exc)
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert vars(again) == vars(exc)
    assert is_transient(again) is is_transient(exc)
