"""A local stand-in for Versori's InitialiseOAuth2Connection endpoint, served over real HTTP.

The CLI, the demo, the tests and the benchmark all need a Versori that answers like the real one
(same paths, same error shape, same URL contract; the Connect API v1 path under `connectors` and
the Platform API v2 twin under `systems`, with its optional `redirectUrl`) but that can also be
told to be slow, flaky or rate limited on demand, without credentials or network. The request
path is kept cheap on purpose: the benchmark pushes several hundred requests per second through
it. What a request must hold and how the URL is built are in versori_rules.py; what the
emulator is told to play (connectors, keys, faults) in emulator_config.py.

Its rate limit is, by default, as strict as the strictest real API: at most N accepted requests
in any trailing second (`rate_limit_window="sliding"`), so a client whose pacing bursts is
answered 429 here as it would be there. GET /_emulator/stats says what it answered, and how
many times each tenant (its authorizeUrl?additionalParams) was given a URL; GET /_emulator/calls
how many requests each Versori endpoint received. The rest of the API: the consent page and
CreateConnection in emulator_oauth.py, end users, a connection's reads and updates,
environments and activations in emulator_platform.py, the test hooks in emulator_hooks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, Self

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from demo.emulator_config import (
    CREATE_SCRIPT_ACTIONS,
    DEFAULT_API_KEY,
    DEMO_CONNECTOR,
    DEMO_SYSTEM,
    RATE_LIMIT_WINDOWS,
    SCRIPT_ACTIONS,
    EmulatedConnector,
    EmulatorConfig,
    load_script,
    step_script,
)
from demo.emulator_hooks import mount_hooks
from demo.emulator_oauth import mount_oauth
from demo.emulator_platform import mount_platform
from demo.versori_rules import (
    RESERVED_KEYS,
    build_url,
    error_response,
    field_error,
    invalid_body,
    normalise_ulid,
    unauthenticated,
    validate_body,
)
from onboarding.clock import utcnow

__all__ = [
    "CREATE_SCRIPT_ACTIONS",
    "DEFAULT_API_KEY",
    "DEMO_CONNECTOR",
    "DEMO_SYSTEM",
    "RATE_LIMIT_WINDOWS",
    "SCRIPT_ACTIONS",
    "EmulatedConnector",
    "EmulatorConfig",
    "EmulatorServer",
    "create_app",
    "load_script",
    "run_emulator",
]


_SCRIPTED_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "internal", "internal server error"),
    "502": (502, "bad_gateway", "bad gateway"),
    "503": (503, "unavailable", "the service is temporarily unavailable"),
    "429": (429, "rate_limited", "too many requests"),
    "400": (400, "validation_failed", "request body is invalid"),
    # A credential miss of this tenant alone, worded as the real one (other tenants still pass).
    "404": (404, "not_found", "credential not found"),
    "401": (
        401,
        "unauthenticated",
        "the Bearer API key in the Authorization header is missing or not valid",
    ),
    "403": (403, "forbidden", "the API key may not initialise this connection"),
}
_SCRIPTED_HEADERS: dict[int, dict[str, str]] = {
    429: {"Retry-After": "1"},
    401: {"WWW-Authenticate": "Bearer"},
}
_SCRIPT_DETAILS = "injected by the emulator script"


class _Limiter(Protocol):
    def take(self) -> float:
        """0 when the request is accepted (and counted), else the seconds until one would be."""
        ...

    def refill(self) -> None:
        """Forget every request counted so far."""
        ...


class _TokenBucket:
    """Continuous-refill token bucket (`rate_limit_window="bucket"`): forgives a burst of up to
    `capacity` after a pause, so it lets more than `rate` through in some seconds.

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


def _window_size(rate: float) -> int:
    return max(1, math.floor(rate))


class _SlidingWindow:
    """At most `limit` accepted requests in any trailing `window` seconds: the times of those
    accepted in the last window, oldest first, on a monotonic clock. A refused request is not
    recorded, so a client that keeps retrying does not push its own next slot further away.

    The lock makes `take` safe from threads too; on the event loop it is never contended."""

    __slots__ = ("accepted", "clock", "limit", "lock", "window")

    def __init__(
        self, rate: float, clock: Callable[[], float] = time.monotonic, window: float = 1.0
    ) -> None:
        self.limit = _window_size(rate)
        self.window = window
        self.clock = clock
        self.accepted: deque[float] = deque()
        self.lock = threading.Lock()

    def take(self) -> float:
        with self.lock:
            now = self.clock()
            accepted = self.accepted
            # A request accepted at t counts in (t, t + window]: it has left at t + window.
            edge = now - self.window
            while accepted and accepted[0] <= edge:
                accepted.popleft()
            if len(accepted) < self.limit:
                accepted.append(now)
                return 0.0
            return accepted[0] + self.window - now

    def refill(self) -> None:
        with self.lock:
            self.accepted.clear()


class _FixedWindow:
    """At most `limit` accepted requests per wall-clock second (`floor(time)`): what APIs that
    count per calendar second do. Two full seconds back to back let 2 x limit through in 1 s."""

    __slots__ = ("clock", "count", "limit", "lock", "second")

    def __init__(self, rate: float, clock: Callable[[], float] = time.time) -> None:
        self.limit = _window_size(rate)
        self.clock = clock
        self.second = -1
        self.count = 0
        self.lock = threading.Lock()

    def take(self) -> float:
        with self.lock:
            now = self.clock()
            second = math.floor(now)
            if second != self.second:
                self.second, self.count = second, 0
            if self.count < self.limit:
                self.count += 1
                return 0.0
            return second + 1 - now

    def refill(self) -> None:
        with self.lock:
            self.second, self.count = -1, 0


def _limiter(
    config: EmulatorConfig, clock: Callable[[], float], wall_clock: Callable[[], float]
) -> _Limiter | None:
    rate = config.rate_limit
    if rate is None:
        return None
    if config.rate_limit_window == "sliding":
        return _SlidingWindow(rate, clock)
    if config.rate_limit_window == "fixed":
        return _FixedWindow(rate, wall_clock)
    return _TokenBucket(rate)


class _StalledResponse(Response):
    """200 and its headers at once, then nothing for `stall` seconds, then the body: a server
    that hangs mid-answer, so the client's read timeout is what ends the call. If the client
    hangs up first, the response ends there, quietly (no body, no error, no traceback)."""

    def __init__(
        self,
        answer: Response,
        stall: float,
        delivered: Callable[[], None],
        abandoned: Callable[[], None],
    ) -> None:
        self.status_code = answer.status_code
        self.body = answer.body
        self.raw_headers = answer.raw_headers
        self.background = None
        self.stall = stall
        self.delivered = delivered
        self.abandoned = abandoned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        with anyio.move_on_after(self.stall):
            # The request body has been read: what comes now is the client going away.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.abandoned()
            return
        # Counted before it goes, as every other answer is (a client may read it before this
        # coroutine runs again). A client gone in between is not seen: uvicorn (ASGI 2.3)
        # drops the body silently; a 2.4 server raises OSError, which ends the answer here.
        self.delivered()
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": self.body})


class _Runtime:
    """Everything the emulator mutates, in one place so `reset` and `stats` stay trivially right."""

    def __init__(
        self,
        config: EmulatorConfig,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.script_progress: dict[tuple[str, str], int] = {}
        # authorizeUrl?additionalParams -> how many times it was given a URL (a 200 delivered)
        self.initialised: dict[str, int] = {}
        # stall actions: answers begun, bodies sent after the stall, clients that hung up first
        self.stalls = {"started": 0, "delivered": 0, "abandoned": 0}
        # When the first and the latest initialise request were answered (time.time()): the
        # span a benchmark divides its calls by, without the client's own start-up.
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.limiter = _limiter(config, clock, wall_clock)
        self.rng = random.Random(config.seed)
        # What else `reset` forgets (the OAuth half's codes, end users and connections).
        self.reset_hooks: list[Callable[[], None]] = []

    def record(self, status: int) -> None:
        """Every answer of the initialise endpoints (not of /healthz or /_emulator/*)."""
        self.requests += 1
        self.last_request_at = now = time.time()
        if self.first_request_at is None:
            self.first_request_at = now
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1

    def record_initialised(self, identity: str) -> None:
        self.initialised[identity] = self.initialised.get(identity, 0) + 1

    def stats(self) -> dict[str, Any]:
        # dict() of a dict is a single C-level copy under the GIL, so this is safe to call from
        # the thread that owns an EmulatorServer while the event loop keeps counting.
        by_status = dict(self.by_status)
        return {
            "requests": self.requests,
            "by_status": by_status,
            "rate_limited": by_status.get("429", 0),
            "states_issued": len(self.states),
            "stalls": dict(self.stalls),
            "initialised": dict(self.initialised),
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
            "rate_limit": self.config.rate_limit,
            "rate_limit_window": self.config.rate_limit_window,
        }

    def reset(self) -> None:
        self.requests = 0
        self.by_status.clear()
        self.states.clear()
        self.script_progress.clear()
        self.initialised.clear()
        self.stalls = dict.fromkeys(self.stalls, 0)
        self.first_request_at = self.last_request_at = None
        if self.limiter is not None:
            self.limiter.refill()
        self.rng.seed(self.config.seed)
        for hook in self.reset_hooks:
            hook()

    def next_script_action(self, authorize_url: str, additional_params: str) -> str | None:
        """The action for this request, if a script entry covers it; advances that pair's cursor."""
        probe = f"{authorize_url}?{additional_params}"
        for pattern, actions in self.config.script.items():
            if pattern not in probe:
                continue
            return step_script(actions, self.script_progress, (authorize_url, additional_params))
        return None


def create_app(
    config: EmulatorConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> Starlette:
    """Build the emulator app; its runtime state lives on `app.state.emulator`. The rate limit
    reads `clock` (sliding window) or `wall_clock` (fixed window): tests pass clocks of their
    own to place each request exactly."""
    runtime = _Runtime(config, clock, wall_clock)
    connectors = {(c.organisation_id, c.connector_id): c for c in config.connectors}
    organisations = {c.organisation_id for c in config.connectors}
    api_keys = config.api_keys
    latency = config.latency_ms / 1000.0
    stall_seconds = config.stall_seconds

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
            return unauthenticated()

        limiter = runtime.limiter
        if limiter is not None:
            wait = limiter.take()
            if wait > 0:
                return error_response(
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
                return error_response(404, "not_found", f"organisation {org_id} not found")
            return error_response(
                404, "not_found", f"{kind} {connector_id} not found in organisation {org_id}"
            )

        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error_response(400, "invalid_body", "request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "invalid_body", "request body must be a JSON object")

        errors, pairs = validate_body(body, v2)
        if errors:
            return invalid_body(errors)

        credential = body["credential"]
        if (
            normalise_ulid(credential["id"]) != connector.credential_id
            or normalise_ulid(credential["organisationId"]) != connector.credential_organisation_id
        ):
            return error_response(404, "not_found", "credential not found")
        if body["clientId"] != connector.client_id:
            mismatch = "does not match the client id stored under the credential"
            return invalid_body([field_error("clientId", mismatch)])

        clashes = sorted({k for k, _ in pairs} & RESERVED_KEYS)
        if clashes:
            return invalid_body(
                [
                    field_error(
                        "additionalParams",
                        f"must not set {', '.join(clashes)}: the endpoint sets "
                        f"{'it' if len(clashes) == 1 else 'them'} itself",
                    )
                ]
            )

        authorize_url: str = body["authorizeUrl"]
        additional_params: str = body.get("additionalParams") or ""
        identity = f"{authorize_url}?{additional_params}"
        action = None
        if config.script:
            action = runtime.next_script_action(authorize_url, additional_params)
            if action in _SCRIPTED_ERRORS:
                status, code, message = _SCRIPTED_ERRORS[action]
                return error_response(
                    status,
                    code,
                    message,
                    details=_SCRIPT_DETAILS,
                    headers=_SCRIPTED_HEADERS.get(status),
                )

        if config.error_rate > 0 and runtime.rng.random() < config.error_rate:
            return error_response(
                503,
                "unavailable",
                "the service is temporarily unavailable",
                details="injected by the emulator error_rate",
            )

        if action == "bad_url":
            runtime.record_initialised(identity)
            return JSONResponse({"url": build_url(authorize_url, connector, body, pairs, None)})

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
        answer = JSONResponse({"url": build_url(authorize_url, connector, body, pairs, state)})
        if action == "stall":
            # The state is issued (Versori did the work); the tenant counts as initialised only
            # if the client is still there to read the URL when the stall ends.
            runtime.stalls["started"] += 1

            def delivered() -> None:
                runtime.stalls["delivered"] += 1
                runtime.record_initialised(identity)

            def abandoned() -> None:
                runtime.stalls["abandoned"] += 1

            return _StalledResponse(answer, stall_seconds, delivered, abandoned)
        runtime.record_initialised(identity)
        return answer

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
            return error_response(404, "not_found", "state not found")
        return JSONResponse(record)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods answer in Versori's error shape too, so a client
        # pointed at a wrong base URL fails with a parseable error rather than plain text.
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
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
    mount_oauth(app, runtime)  # the consent page and CreateConnection (emulator_oauth.py)
    mount_platform(app, runtime)  # end users, connections, activations (emulator_platform.py)
    mount_hooks(app, runtime)  # the test hooks on them (emulator_hooks.py)
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
        """The same numbers as GET /_emulator/stats, read in-process (see `_Runtime.stats`)."""
        runtime: _Runtime = self.app.state.emulator
        return runtime.stats()

    def calls(self) -> dict[str, int]:
        """Requests each Versori endpoint received, as GET /_emulator/calls's `calls`."""
        return dict(self.app.state.platform.calls)

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
