"""Versori's side of the initialise call, as the emulator plays it: the request body checked
field by field (pydantic, strict JSON types) with Versori's error shape, and the authorize URL
built from a valid body. Kept apart from the server (emulator.py) so that the contract reads in
one place."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse
from ulid import ULID

from demo.emulator_config import EmulatedConnector, is_ulid

# Defined here rather than imported from the client's constants: the emulator plays the server,
# and should keep answering like Versori even if the client's idea of the contract drifts.
RESERVED_KEYS = frozenset(
    {"redirect_uri", "state", "prompt", "scope", "response_type", "client_id"}
)


def normalise_ulid(value: str) -> str:
    """Versori treats ULIDs case-insensitively; compare canonical forms so lowercase input works."""
    return str(ULID.from_str(value))


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    fields: list[dict[str, str]] | None = None,
    details: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def field_error(name: str, message: str) -> dict[str, str]:
    return {"field": name, "message": message}


def invalid_body(fields: list[dict[str, str]]) -> JSONResponse:
    """Versori's 400 for a body that fails its checks, each failure under `fields`."""
    return error_response(400, "validation_failed", "request body is invalid", fields=fields)


_NOT_A_URI = "must be an absolute http(s) URI"


def check_authorize_url(value: object) -> str | None:
    """Return why `value` cannot be an authorize endpoint, or None if it can."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "required"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return _NOT_A_URI
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        return _NOT_A_URI
    if parts.scheme.lower() not in ("http", "https"):
        return _NOT_A_URI
    if not parts.hostname:
        return "must have a host"
    if "#" in value:
        return "must not have a fragment"
    return None


def _ulid_field(value: str) -> str:
    if not value:
        raise PydanticCustomError("required", "required")
    if not is_ulid(value):
        raise PydanticCustomError("ulid", "must be a ULID")
    return value


def _uri_field(value: str | None) -> str | None:
    problem = None if value is None else check_authorize_url(value)
    if problem is not None:
        raise PydanticCustomError("uri", problem)
    return value


def _query_field(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_qsl(value, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise PydanticCustomError("query", "must be a URL-encoded query string") from None
    return value


_Ulid = Annotated[str, AfterValidator(_ulid_field)]


class _CredentialBody(BaseModel):
    model_config = ConfigDict(strict=True)

    id: _Ulid
    organisationId: _Ulid


class _InitialiseBody(BaseModel):
    """The Connect API v1 request body as Versori checks it: exact JSON types (strict), no
    unknown field; `_field_errors` words each failure as Versori's `fields` do."""

    model_config = ConfigDict(strict=True, extra="forbid")

    credential: _CredentialBody
    authorizeUrl: Annotated[str, AfterValidator(_uri_field)]
    clientId: Annotated[str, Field(min_length=1)]
    scopes: list[str] | None = None
    disableOfflineAccess: bool | None = None
    prompt: str | None = None
    additionalParams: Annotated[str | None, AfterValidator(_query_field)] = None


class _InitialiseBodyV2(_InitialiseBody):
    """The Platform API v2 body: the same, plus where the provider sends the user back."""

    redirectUrl: Annotated[str | None, AfterValidator(_uri_field)] = None


_MESSAGES = {
    "missing": "required",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_type": "must be a boolean",
    "list_type": "must be a list of strings",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "extra_forbidden": "unknown field",
}


def _field_errors(error: ValidationError) -> list[dict[str, str]]:
    """Versori's `fields`: `credential.id`, `scopes[2]`; a null counts as missing."""
    fields = []
    for problem in error.errors():
        head, *rest = problem["loc"]
        name = str(head) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
        kind = "missing" if problem["input"] is None else problem["type"]
        fields.append(field_error(name, _MESSAGES.get(kind, problem["msg"])))
    return fields


def validate_body(
    body: dict[str, Any], v2: bool = False
) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """Every field error at once, as Versori reports them, so callers can fix a body in one
    go; and the additionalParams pairs of a valid body. `v2`: the Platform API v2 body."""
    try:
        checked = (_InitialiseBodyV2 if v2 else _InitialiseBody).model_validate(body)
    except ValidationError as error:
        return _field_errors(error), []
    additional = checked.additionalParams
    return [], parse_qsl(additional, keep_blank_values=True) if additional else []


def build_url(
    authorize_url: str,
    connector: EmulatedConnector,
    body: dict[str, Any],
    pairs: list[tuple[str, str]],
    state: str | None,
) -> str:
    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", connector.client_id),
        ("redirect_uri", body.get("redirectUrl") or connector.redirect_uri),
    ]
    if state is not None:
        params.append(("state", state))

    scopes: list[str] = list(body.get("scopes") or [])
    if not body.get("disableOfflineAccess") and "offline_access" not in scopes:
        scopes.append("offline_access")
    if scopes:
        params.append(("scope", " ".join(scopes)))

    prompt = body.get("prompt")
    if prompt:
        params.append(("prompt", prompt))
    elif not any(key == "approval_prompt" for key, _ in pairs):
        params.append(("prompt", "login"))

    params.extend(pairs)
    query = urlencode(params, quote_via=quote)
    if "?" not in authorize_url:
        separator = "?"
    elif authorize_url.endswith(("?", "&")):
        separator = ""
    else:
        separator = "&"
    return f"{authorize_url}{separator}{query}"


def unauthenticated() -> JSONResponse:
    return error_response(
        401,
        "unauthenticated",
        "the Bearer API key in the Authorization header is missing or not valid",
        headers={"WWW-Authenticate": "Bearer"},
    )
