"""Versori's side of the initialise call, as the emulator plays it: the request body checked
field by field (pydantic, strict JSON types) with Versori's error shape, and the authorize URL
built from a valid body; and the shape of the Platform API v2 UpdateConnection and ActivateUser
bodies (emulator_platform.py). Kept apart from the server (emulator.py) so that the contract
reads in one place."""

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


def read_update(body: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any], str, str]:
    """The problems of an UpdateConnection body, its credential's data, name and baseUrl."""
    problems: list[dict[str, str]] = []
    name, base_url, credentials = body.get("name"), body.get("baseUrl"), body.get("credentials")
    if name is None:
        problems.append(field_error("name", "required"))
    elif not isinstance(name, str) or not name:
        problems.append(field_error("name", "must be a non-empty string"))
    if base_url is None:
        problems.append(field_error("baseUrl", "required"))
    elif not isinstance(base_url, str) or (base_url and check_authorize_url(base_url)):
        problems.append(field_error("baseUrl", 'must be "" or an absolute http(s) URI'))
    data: dict[str, Any] = {}
    if credentials is None:
        problems.append(field_error("credentials", "required"))
    elif not isinstance(credentials, list) or len(credentials) != 1:
        problems.append(field_error("credentials", "must hold exactly one credential"))
    elif not isinstance(credentials[0], dict):
        problems.append(field_error("credentials[0]", "must be an object"))
    else:
        item = credentials[0]
        if "id" in item and not is_ulid(item["id"]):
            problems.append(field_error("credentials[0].id", "must be a ULID"))
        credential = item.get("credential")
        given = credential.get("data") if isinstance(credential, dict) else None
        if not isinstance(credential, dict) or credential.get("type") != "oauth2-code":
            problems.append(field_error("credentials[0].credential.type", "must be oauth2-code"))
        if not isinstance(given, dict) or not given.get("code") or not given.get("state"):
            message = "code and state are required"
            problems.append(field_error("credentials[0].credential.data", message))
        else:
            data = given
    return problems, data, name if isinstance(name, str) else "", str(base_url or "")


def read_activation(body: dict[str, Any]) -> list[dict[str, str]]:
    """The problems of an ActivateUser body's shape (what it refers to is checked later)."""
    problems: list[dict[str, str]] = []
    user_id = body.get("userId")
    if user_id is None:
        problems.append(field_error("userId", "required"))
    elif not isinstance(user_id, str) or not user_id:
        problems.append(field_error("userId", "must be a non-empty string"))
    environment_id = body.get("environmentId")
    if environment_id is None:
        problems.append(field_error("environmentId", "required"))
    elif not is_ulid(environment_id):
        problems.append(field_error("environmentId", "must be a ULID"))
    variables = body.get("dynamicVariables")
    if variables is not None and not isinstance(variables, dict):
        problems.append(field_error("dynamicVariables", "must be an object"))
    connections = body.get("connections")
    if connections is None:
        return [*problems, field_error("connections", "required")]
    if not isinstance(connections, list):
        return [*problems, field_error("connections", "must be a list")]
    for i, item in enumerate(connections):
        where = f"connections[{i}]"
        if not isinstance(item, dict):
            problems.append(field_error(where, "must be an object"))
            continue
        if not is_ulid(item.get("connectionTemplateId")):
            problems.append(field_error(f"{where}.connectionTemplateId", "must be a ULID"))
        if "connection" in item:
            message = "not played by the emulator: make the connection, give existingConnectionId"
            problems.append(field_error(f"{where}.connection", message))
        elif not is_ulid(item.get("existingConnectionId")):
            problems.append(field_error(f"{where}.existingConnectionId", "must be a ULID"))
    return problems
