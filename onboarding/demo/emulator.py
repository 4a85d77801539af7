"""A local stand-in for Versori's InitialiseOAuth2Connection endpoint, served over real HTTP.

The CLI, the demo, the tests and the benchmark all need a Versori that answers like the real one
(same paths, same error shape, same URL contract; the Connect API v1 path under `connectors` and
the Platform API v2 twin under `systems`, with its optional `redirectUrl`) but that can also be
told to be slow, flaky or rate limited on demand, without credentials or network. The request
path is kept cheap on purpose: the benchmark pushes several hundred requests per second through
it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import uvicorn
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from ulid import ULID

from onboarding.clock import utcnow

__all__ = [
    "DEFAULT_API_KEY",
    "DEMO_CONNECTOR",
    "DEMO_SYSTEM",
    "SCRIPT_ACTIONS",
    "EmulatedConnector",
    "EmulatorConfig",
    "EmulatorServer",
    "create_app",
    "run_emulator",
]

DEFAULT_API_KEY = "emulator-key"
DEFAULT_REDIRECT_URI = "https://platform.versori.com/api/connect/v1/oauth2/callback"

# Defined here rather than imported from the client's constants: the emulator plays the server,
# and should keep answering like Versori even if the client's idea of the contract drifts.
_RESERVED_KEYS = frozenset(
    {"redirect_uri", "state", "prompt", "scope", "response_type", "client_id"}
)

SCRIPT_ACTIONS = frozenset({"ok", "500", "502", "503", "429", "400", "bad_url"})

_SCRIPTED_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "internal", "internal server error"),
    "502": (502, "bad_gateway", "bad gateway"),
    "503": (503, "unavailable", "the service is temporarily unavailable"),
    "429": (429, "rate_limited", "too many requests"),
    "400": (400, "validation_failed", "request body is invalid"),
}
_SCRIPT_DETAILS = "injected by the emulator script"


def _is_ulid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ULID.from_str(value)
    except ValueError:
        return False
    return True


def _normalise_ulid(value: str) -> str:
    """Versori treats ULIDs case-insensitively; compare canonical forms so lowercase input works."""
    return str(ULID.from_str(value))


@dataclass(frozen=True)
class EmulatedConnector:
    """One connector the emulator knows, with the credential and client id stored under it.

    It answers under both APIs: `connector_id` is also its system id on the Platform API v2
    path (`/o/{organisation_id}/systems/{system_id}/oauth2/initialise`). `redirect_uri` is
    the redirect the returned URL carries unless a v2 request sets redirectUrl."""

    organisation_id: str
    connector_id: str
    credential_id: str
    credential_organisation_id: str
    client_id: str
    redirect_uri: str = DEFAULT_REDIRECT_URI

    def __post_init__(self) -> None:
        # A connector whose credential ids are not ULIDs could never be matched by a valid
        # request; failing here beats a confusing 404 at request time.
        for name in ("organisation_id", "connector_id", "client_id", "redirect_uri"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"EmulatedConnector.{name} must be a non-empty string")
        for name in ("credential_id", "credential_organisation_id"):
            if not _is_ulid(getattr(self, name)):
                raise ValueError(f"EmulatedConnector.{name} must be a ULID")


DEMO_CONNECTOR = EmulatedConnector(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    connector_id="01M8F12B95S4BX0QFB3TPDWZ0Q",
    credential_id="01M8F12B95S4BX0QFB3TPDWZ0R",
    credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    client_id="demo-client-id",
)

# A second one, which examples/profile-v2.yaml names as its Platform API v2 system.
DEMO_SYSTEM = EmulatedConnector(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    connector_id="01M8F12B95S4BX0QFB3TPDWZ0S",
    credential_id="01M8F12B95S4BX0QFB3TPDWZ0T",
    credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    client_id="demo-system-client-id",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class EmulatorConfig:
    """How the emulator behaves: who may call it, what it knows, and which faults it injects."""

    api_keys: frozenset[str] = frozenset({DEFAULT_API_KEY})
    connectors: tuple[EmulatedConnector, ...] = (DEMO_CONNECTOR, DEMO_SYSTEM)
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float | None = None
    seed: int | None = None
    script: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Callers (CLI flags, YAML) hand over lists and sets; coerce so the app can rely on types.
        if isinstance(self.api_keys, str):
            raise ValueError("api_keys must be a collection of keys, not a single string")
        self.api_keys = frozenset(self.api_keys)
        if not self.api_keys:
            raise ValueError("api_keys must not be empty: the emulator would reject every request")
        if not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must hold non-empty strings only")

        self.connectors = tuple(self.connectors)
        if not self.connectors:
            raise ValueError("connectors must not be empty")
        seen: set[tuple[str, str]] = set()
        for connector in self.connectors:
            if not isinstance(connector, EmulatedConnector):
                raise ValueError("connectors must hold EmulatedConnector instances")
            key = (connector.organisation_id, connector.connector_id)
            if key in seen:
                raise ValueError(
                    f"connectors holds organisation {key[0]} connector {key[1]} more than once"
                )
            seen.add(key)

        if not _is_number(self.latency_ms) or not math.isfinite(self.latency_ms):
            raise ValueError("latency_ms must be a finite number")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")

        if not _is_number(self.error_rate) or not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(
                f"error_rate must be a fraction between 0 and 1, got {self.error_rate}"
            )

        if self.rate_limit is not None and (
            not _is_number(self.rate_limit)
            or not math.isfinite(self.rate_limit)
            or self.rate_limit <= 0
        ):
            raise ValueError(
                f"rate_limit must be a positive number of requests per second or None, "
                f"got {self.rate_limit}"
            )

        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

        if not isinstance(self.script, dict):
            raise ValueError("script must map a substring to a list of actions")
        script: dict[str, list[str]] = {}
        for pattern, actions in self.script.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("script keys must be non-empty strings")
            if isinstance(actions, str):
                raise ValueError(f"script[{pattern!r}] must be a list of actions, not a string")
            actions = list(actions)
            for action in actions:
                if not isinstance(action, str) or action.removesuffix("*") not in SCRIPT_ACTIONS:
                    raise ValueError(
                        f"script[{pattern!r}] has unknown action {action!r}; expected one of "
                        f"{', '.join(sorted(SCRIPT_ACTIONS))}, optionally ending in '*'"
                    )
            script[pattern] = actions
        self.script = script


class _TokenBucket:
    """Continuous-refill token bucket.

    `take` has no await, so on the single event loop it is atomic and needs no lock.
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """Return 0 when a token was taken, else the seconds until one is free."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def refill(self) -> None:
        self.tokens = self.capacity
        self.updated = time.monotonic()


class _Runtime:
    """Everything the emulator mutates, in one place so `reset` and `stats` stay trivially right."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.script_progress: dict[tuple[str, str], int] = {}
        self.limiter = _TokenBucket(config.rate_limit) if config.rate_limit is not None else None
        self.rng = random.Random(config.seed)

    def record(self, status: int) -> None:
        self.requests += 1
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1

    def stats(self) -> dict[str, Any]:
        # dict() of a dict is a single C-level copy under the GIL, so this is safe to call from
        # the thread that owns an EmulatorServer while the event loop keeps counting.
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "states_issued": len(self.states),
        }

    def reset(self) -> None:
        self.requests = 0
        self.by_status.clear()
        self.states.clear()
        self.script_progress.clear()
        if self.limiter is not None:
            self.limiter.refill()
        self.rng.seed(self.config.seed)

    def next_script_action(self, authorize_url: str, additional_params: str) -> str | None:
        """The action for this request, if a script entry covers it; advances that pair's cursor."""
        probe = f"{authorize_url}?{additional_params}"
        for pattern, actions in self.config.script.items():
            if pattern not in probe:
                continue
            key = (authorize_url, additional_params)
            index = self.script_progress.get(key, 0)
            if index >= len(actions):
                return None
            action = actions[index]
            if action.endswith("*"):
                return action[:-1]
            self.script_progress[key] = index + 1
            return action
        return None


def _error(
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


def _field(name: str, message: str) -> dict[str, str]:
    return {"field": name, "message": message}


_NOT_A_URI = "must be an absolute http(s) URI"


def _check_authorize_url(value: object) -> str | None:
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
    if not _is_ulid(value):
        raise PydanticCustomError("ulid", "must be a ULID")
    return value


def _uri_field(value: str | None) -> str | None:
    problem = None if value is None else _check_authorize_url(value)
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
        fields.append(_field(name, _MESSAGES.get(kind, problem["msg"])))
    return fields


def _validate_body(
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


def _build_url(
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


def _unauthenticated() -> JSONResponse:
    return _error(
        401,
        "unauthenticated",
        "the Bearer API key in the Authorization header is missing or not valid",
        headers={"WWW-Authenticate": "Bearer"},
    )


def create_app(config: EmulatorConfig) -> Starlette:
    """Build the emulator app; its runtime state lives on `app.state.emulator`."""
    runtime = _Runtime(config)
    connectors = {(c.organisation_id, c.connector_id): c for c in config.connectors}
    organisations = {c.organisation_id for c in config.connectors}
    api_keys = config.api_keys
    latency = config.latency_ms / 1000.0

    async def initialise(request: Request) -> Response:
        return await _answer(request, v2=False)

    async def initialise_v2(request: Request) -> Response:
        return await _answer(request, v2=True)

    async def _answer(request: Request, v2: bool) -> Response:
        try:
            response = await _initialise(request, v2)
        except ClientDisconnect:
            # The caller went away mid-request (a killed batch): nothing to answer, no traceback.
            return Response(status_code=499)
        runtime.record(response.status_code)
        return response

    async def _initialise(request: Request, v2: bool) -> Response:
        if latency > 0:
            await asyncio.sleep(latency)

        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in api_keys:
            return _unauthenticated()

        limiter = runtime.limiter
        if limiter is not None:
            wait = limiter.take()
            if wait > 0:
                return _error(
                    429,
                    "rate_limited",
                    "too many requests; retry after the time in the Retry-After header",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )

        org_id = request.path_params["organisation_id"]
        kind = "system" if v2 else "connector"
        connector_id = request.path_params[f"{kind}_id"]
        connector = connectors.get((org_id, connector_id))
        if connector is None:
            if org_id not in organisations:
                return _error(404, "not_found", f"organisation {org_id} not found")
            return _error(
                404, "not_found", f"{kind} {connector_id} not found in organisation {org_id}"
            )

        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return _error(400, "invalid_body", "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "request body must be a JSON object")

        errors, pairs = _validate_body(body, v2)
        if errors:
            return _error(400, "validation_failed", "request body is invalid", fields=errors)

        credential = body["credential"]
        if (
            _normalise_ulid(credential["id"]) != connector.credential_id
            or _normalise_ulid(credential["organisationId"]) != connector.credential_organisation_id
        ):
            return _error(404, "not_found", "credential not found")
        if body["clientId"] != connector.client_id:
            return _error(
                400,
                "validation_failed",
                "request body is invalid",
                fields=[
                    _field("clientId", "does not match the client id stored under the credential")
                ],
            )

        clashes = sorted({k for k, _ in pairs} & _RESERVED_KEYS)
        if clashes:
            return _error(
                400,
                "validation_failed",
                "request body is invalid",
                fields=[
                    _field(
                        "additionalParams",
                        f"must not set {', '.join(clashes)}: the endpoint sets "
                        f"{'it' if len(clashes) == 1 else 'them'} itself",
                    )
                ],
            )

        authorize_url: str = body["authorizeUrl"]
        bad_url = False
        if config.script:
            action = runtime.next_script_action(authorize_url, body.get("additionalParams") or "")
            if action == "bad_url":
                bad_url = True
            elif action is not None and action != "ok":
                status, code, message = _SCRIPTED_ERRORS[action]
                return _error(
                    status,
                    code,
                    message,
                    details=_SCRIPT_DETAILS,
                    headers={"Retry-After": "1"} if status == 429 else None,
                )

        if config.error_rate > 0 and runtime.rng.random() < config.error_rate:
            return _error(
                503,
                "unavailable",
                "the service is temporarily unavailable",
                details="injected by the emulator error_rate",
            )

        if bad_url:
            return JSONResponse({"url": _build_url(authorize_url, connector, body, pairs, None)})

        state = secrets.token_urlsafe(32)
        runtime.states[state] = {
            "api": "platform-v2" if v2 else "connect-v1",
            "organisation_id": connector.organisation_id,
            f"{kind}_id": connector.connector_id,
            "credential_id": connector.credential_id,
            "client_id": connector.client_id,
            "authorize_url": authorize_url,
            "redirect_uri": body.get("redirectUrl") or connector.redirect_uri,
            "issued_at": utcnow().isoformat(),
        }
        return JSONResponse({"url": _build_url(authorize_url, connector, body, pairs, state)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        return JSONResponse(runtime.stats())

    async def reset(request: Request) -> Response:
        runtime.reset()
        return JSONResponse({"ok": True})

    async def get_state(request: Request) -> Response:
        record = runtime.states.get(request.path_params["state"])
        if record is None:
            return _error(404, "not_found", "state not found")
        return JSONResponse(record)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods answer in Versori's error shape too, so a client
        # pointed at a wrong base URL fails with a parseable error rather than plain text.
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(
            exc.status_code,
            codes.get(exc.status_code, "error"),
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )

    app = Starlette(
        routes=[
            Route(
                "/o/{organisation_id}/connectors/{connector_id}/oauth2/initialise",
                initialise,
                methods=["POST"],
            ),
            Route(
                "/o/{organisation_id}/systems/{system_id}/oauth2/initialise",
                initialise_v2,
                methods=["POST"],
            ),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/_emulator/stats", stats, methods=["GET"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/_emulator/states/{state}", get_state, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.emulator = runtime
    app.state.states = runtime.states
    return app


def _uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
    )


class EmulatorServer:
    """Runs the emulator on uvicorn in a daemon thread, for tests, the demo and the benchmark.

    A real socket (rather than an ASGI transport) keeps the client's whole HTTP stack under test,
    timeouts and connection pooling included.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.app = create_app(self.config)
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the emulator is not running; call start() or use it as a context")
        return self._base_url

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port))
        failure: list[BaseException] = []

        def serve() -> None:
            # uvicorn answers a failed bind with sys.exit(); inside a thread that would vanish
            # silently (or trip pytest's thread-exception check), so keep it for start() to report.
            try:
                server.run()
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=serve, name="versori-emulator", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                cause = failure[0] if failure else None
                raise RuntimeError(
                    f"the emulator failed to start on {self.host}:{self.port} "
                    "(is the port already in use?)"
                ) from cause
            if time.monotonic() > deadline:
                server.should_exit = True
                thread.join(timeout)
                raise RuntimeError(f"the emulator did not start within {timeout:g} s")
            time.sleep(0.005)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        self._server = server
        self._thread = thread
        self._base_url = f"http://{host}:{bound_port}"
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        self._server = None
        self._thread = None
        self._base_url = None

    def stats(self) -> dict[str, Any]:
        """The same numbers as GET /_emulator/stats, read in-process."""
        runtime: _Runtime = self.app.state.emulator
        return runtime.stats()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8700
) -> None:
    """Serve the emulator in the foreground until interrupted (the CLI's `emulator` command)."""
    app = create_app(config if config is not None else EmulatorConfig())
    uvicorn.Server(_uvicorn_config(app, host, port)).run()
