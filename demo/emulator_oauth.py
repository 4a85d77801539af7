"""The emulator's other half of an OAuth2 connection: the provider's consent page at the
authorize URL (`/provider/authorize`: a profile whose authorize_url points there gets it), and
Versori's CreateConnection, which takes only a code that page issued for that state, once; and
the reads a client uses to find what it made.

    GET  /provider/authorize?...state=...   Allow / Deny, for a state the emulator issued
    POST /provider/authorize                303 to the state's redirect_uri with code and state,
                                            or error=access_denied and state
    POST /o/{org}/connections               Platform API v2 CreateConnection (201)
    GET  /o/{org}/connections               ListConnections: ?end_user_id=&system_id=&first=&after=
    POST /o/{org}/connectors/{id}/connections   Connect API v1 CreateConnectorConnection
    GET  /o/{org}/connectors/{id}/connections   ListConnectorConnections, newest first
    GET  /_emulator/connections             the connections made, and the faults played
    GET  /_emulator/users                   the end users made

The end users' reads (ListEndUsers, GetEndUser), a connection's own (Get, Update, Delete),
environments and activations are in emulator_platform.py.

It is as strict as Versori could be where Versori's documents are silent:
- v2: the `externalId` of a CreateConnection makes its end user if there is none (a ULID `id`
  of its own, `displayName` ""). One connection per end user and connection template, and a
  connection's name is unique within its system: a second is answered 409 (`conflict`).
- v1: a connection's name is unique within its connector; a second is answered 409.
- The code is checked first (400 `invalid_grant` if unknown, used, or issued for another
  state, organisation or connector); a 409 leaves it unused. The code is spent only when the
  connection is made.
- Lists are paged: `first` (1..100, default 20; else 400) and `after`, an opaque cursor from
  a page's `next` ("" on the last page; a cursor whose item was deleted since goes on from
  where it stood). `end_user_id` takes the end user's Versori id only, never its externalId.
  v1 and v2 connections are listed by their own API only.

CreateConnection's faults (`EmulatorConfig.create_script`, or `create:<substring>` keys of a
--script file), matched on a substring of the request's externalId or connection name, one
action per request in order, a trailing "*" repeating it:
    ok          the normal answer
    409         refused as if the connection existed; nothing made, the code not spent
    500         a 500; nothing made, the code not spent
    500_after   the connection made (and listed), then a 500
    slow_after  the connection made, then `stall_seconds` before the answer (a client with a
                shorter timeout gives up; the answer is then never sent)
    drop_after  the connection made, then the socket closed mid-answer (headers and part of
                the body, no complete answer)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from ulid import ULID

from demo.emulator_config import step_script
from demo.emulator_pages import paged
from demo.versori_rules import (
    error_response,
    field_error,
    invalid_body,
    normalise_ulid,
    unauthenticated,
)
from onboarding.clock import utcnow

if TYPE_CHECKING:
    from starlette.applications import Starlette

CONSENT_PATH = "/provider/authorize"
_SCRIPT_DETAILS = "injected by the emulator script"
# What uvicorn logs (as an error) when an answer ends before its body: a drop_after does that
# on purpose, so that one line is not logged for it (see _DropFilter).
_UNFINISHED = "ASGI callable returned without completing response."


@dataclass
class OAuthRuntime:
    """Codes the consent page issued (code -> what it was issued for), the end users and
    connections made (in the order made), and the CreateConnection script's progress."""

    states: dict[str, dict[str, Any]]
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    connections: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)
    consents: dict[str, int] = field(default_factory=lambda: {"allowed": 0, "denied": 0})
    # CreateConnection script actions played, by action; slow_after answers delivered/abandoned
    faults: dict[str, int] = field(default_factory=dict)
    script_progress: dict[tuple[str, str], int] = field(default_factory=dict)
    # (organisation, externalId) -> end user; what connections made take: (api, organisation,
    # system, name) and (end user id, template id). Sets, so a check stays cheap under load.
    user_index: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    taken: set[tuple[str, ...]] = field(default_factory=set)
    # Every end user and connection gets the next number: what a list's cursor points at.
    sequence: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # Versori id -> end user; connection id -> its record (GetEndUser, GetConnection)
    users_by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    connection_index: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget every code, end user, connection and count (POST /_emulator/reset)."""
        self.codes.clear()
        self.connections.clear()
        self.users.clear()
        self.consents.update(allowed=0, denied=0)
        self.faults.clear()
        self.script_progress.clear()
        self.user_index.clear()
        self.taken.clear()
        self.users_by_id.clear()
        self.connection_index.clear()

    def next_seq(self) -> int:
        return next(self.sequence)

    def count(self, what: str) -> None:
        self.faults[what] = self.faults.get(what, 0) + 1

    def spendable(self, data: dict[str, Any], organisation_id: str) -> dict[str, Any] | None:
        """What the code of a credential's `data` was issued for, if it may be spent now: issued
        for this state and organisation, and unused. The caller spends it (`used`)."""
        issued = self.codes.get(str(data.get("code", "")))
        if (
            issued is None
            or issued["state"] != data.get("state")
            or issued["used"]
            or issued["organisation_id"] != organisation_id
        ):
            return None
        return issued

    def user(self, organisation_id: str, external_id: str) -> dict[str, Any] | None:
        return self.user_index.get((organisation_id, external_id))

    def next_action(self, script: dict[str, list[str]], external_id: str, name: str) -> str | None:
        """The CreateConnection action for this request, if an entry covers it; advances the
        cursor of that (externalId, name)."""
        for pattern, actions in script.items():
            if pattern not in external_id and pattern not in name:
                continue
            return step_script(actions, self.script_progress, (external_id, name))
        return None

    def conflict(
        self,
        v2: bool,
        organisation_id: str,
        system_id: str,
        template_id: str,
        external_id: str,
        name: str,
    ) -> str | None:
        """Why a connection like this one cannot be made (one exists already), or None."""
        user = self.user(organisation_id, external_id) if v2 and external_id else None
        if user is not None and (user["id"], template_id) in self.taken:
            return f"end user {external_id} already has a connection from template {template_id}"
        if (_api(v2), organisation_id, system_id, name) in self.taken:
            kind = "system" if v2 else "connector"
            return f"a connection named {name!r} already exists in {kind} {system_id}"
        return None

    def add_user(self, user: dict[str, Any]) -> None:
        self.users.append(user)
        self.user_index[(user["organisationId"], user["externalId"])] = user
        self.users_by_id[user["id"]] = user

    def add(self, record: dict[str, Any]) -> None:
        """Keep a connection made, and what it now takes (its name; its end user's template)."""
        self.connections.append(record)
        self.connection_index[record["id"]] = record
        self.taken.add(name_key(record))
        if record["endUserId"] is not None:
            self.taken.add((record["endUserId"], record["connectionTemplateId"]))

    def remove(self, record: dict[str, Any]) -> None:
        """Forget a connection (DeleteConnection): its name and its end user's template are
        free again."""
        self.connections.remove(record)
        del self.connection_index[record["id"]]
        self.taken.discard(name_key(record))
        if record["endUserId"] is not None:
            self.taken.discard((record["endUserId"], record["connectionTemplateId"]))


def name_key(record: dict[str, Any]) -> tuple[str, ...]:
    """What a connection's name takes: it is unique within its API's system (v1: connector)."""
    return (record["api"], record["organisation_id"], record["systemId"], record["name"])


def invalid_grant() -> JSONResponse:
    return error_response(400, "invalid_grant", "the code is not valid for this state, or was used")


def _api(v2: bool) -> str:
    return "platform-v2" if v2 else "connect-v1"


class _DropFilter(logging.Filter):
    """Drops uvicorn's one error line for each answer a drop_after cut on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.expected > 0 and record.getMessage() == _UNFINISHED:
            self.expected -= 1
            return False
        return True


_DROPS = _DropFilter()


def _expect_drop() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _DROPS not in logger.filters:
        logger.addFilter(_DROPS)
    _DROPS.expected += 1


class _DelayedResponse(Response):
    """The answer, after `delay` seconds of silence (not even headers); if the client hangs
    up first, nothing is sent (and uvicorn says nothing either)."""

    def __init__(self, answer: Response, delay: float, counted: Callable[[str], None]) -> None:
        self.status_code = answer.status_code
        self.body = answer.body
        self.raw_headers = answer.raw_headers
        self.background = None
        self.delay = delay
        self.counted = counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.move_on_after(self.delay):
            # The request body has been read: what comes now is the client going away.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.counted("slow_after_abandoned")
            return
        self.counted("slow_after_delivered")
        with contextlib.suppress(OSError):
            await super().__call__(scope, receive, send)


class _DroppedResponse(Response):
    """The answer's status, headers and half its body, then the connection closed: the client
    sees the socket drop mid-answer (an incomplete body)."""

    def __init__(self, answer: Response) -> None:
        self.status_code = answer.status_code
        self.body = answer.body
        self.raw_headers = answer.raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        part = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": part, "more_body": True})
        # Returning now, with the body unfinished, makes uvicorn close the connection.
        _expect_drop()


def mount_oauth(app: Starlette, runtime: Any) -> None:
    """Add the consent page, CreateConnection and its reads to the emulator's `app`; `runtime`
    is its _Runtime (the states it issued, its config's keys, latency and scripts)."""
    oauth = OAuthRuntime(runtime.states)
    app.state.states = runtime.states
    app.state.oauth = oauth
    runtime.reset_hooks.append(oauth.reset)
    config = runtime.config
    latency = config.latency_ms / 1000.0

    def authorised(request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and key.strip() in config.api_keys

    async def consent(request: Request) -> Response:
        if request.method == "GET":
            params = dict(request.query_params)
        else:
            params = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        issued = oauth.states.get(params.get("state", ""))
        if issued is None or params.get("client_id", issued["client_id"]) != issued["client_id"]:
            return HTMLResponse(_page("Unknown authorization request", ""), status_code=400)
        if request.method == "GET":
            return HTMLResponse(_consent_page(issued, params["state"]))
        state, redirect_uri = params["state"], issued["redirect_uri"]
        if params.get("decision") == "allow":
            code = secrets.token_urlsafe(24)
            oauth.codes[code] = {
                "state": state,
                "redirect_uri": redirect_uri,
                "used": False,
                # What the state was issued for: the connection's organisation and system.
                "organisation_id": issued["organisation_id"],
                "system_id": issued.get("system_id") or issued.get("connector_id"),
            }
            oauth.consents["allowed"] += 1
            answer = {"code": code, "state": state}
        else:
            oauth.consents["denied"] += 1
            answer = {"error": "access_denied", "state": state}
        separator = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{urlencode(answer)}", status_code=303)

    async def create_v2(request: Request) -> Response:
        return await _create(request, v2=True)

    async def create_v1(request: Request) -> Response:
        return await _create(request, v2=False)

    async def _create(request: Request, v2: bool) -> Response:
        if latency > 0:
            await asyncio.sleep(latency)
        if not authorised(request):
            return unauthenticated()
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:
            return Response(status_code=499)
        except (ValueError, RecursionError):
            return error_response(400, "invalid_body", "request body is not valid JSON")
        problems, data, name = _read_body(body, v2)
        if problems:
            return invalid_body(problems)
        organisation_id = request.path_params["organisation_id"]
        issued = oauth.spendable(data, organisation_id)
        if issued is None or (
            not v2 and issued["system_id"] != request.path_params["connector_id"]
        ):
            return invalid_grant()
        if v2 and data.get("redirectUrl") != issued["redirect_uri"]:
            return invalid_body([field_error("credential.data.redirectUrl", "does not match")])
        system_id: str = issued["system_id"]
        external_id: str = (body.get("externalId") or "") if v2 else ""
        # ULIDs in any case are one id (as Versori reads them): kept in canonical form.
        template_id = normalise_ulid(body["connectionTemplateId"]) if v2 else ""

        action = None
        if config.create_script:
            action = oauth.next_action(config.create_script, external_id, name)
            if action is not None:
                oauth.count(action)
        if action == "500":
            return error_response(500, "internal", "internal server error", details=_SCRIPT_DETAILS)
        # The 409 comes before the code is spent: a client told "it exists" may look the
        # connection up, and the code stays unused (a real provider would spend it only at
        # the token exchange, which a refused request never reaches).
        if action == "409":
            return error_response(
                409, "conflict", "the connection already exists", details=_SCRIPT_DETAILS
            )
        why = oauth.conflict(v2, organisation_id, system_id, template_id, external_id, name)
        if why is not None:
            return error_response(409, "conflict", why)

        issued["used"] = True
        record = make_connection(
            oauth, v2, organisation_id, system_id, template_id, external_id, name
        )
        if v2:
            answer = JSONResponse(v2_connection(record), status_code=201)
        else:
            answer = JSONResponse(_v1_connection(record))
        if action == "500_after":
            return error_response(500, "internal", "internal server error", details=_SCRIPT_DETAILS)
        if action == "slow_after":
            return _DelayedResponse(answer, config.stall_seconds, oauth.count)
        if action == "drop_after":
            return _DroppedResponse(answer)
        return answer

    async def list_v2(request: Request) -> Response:
        if latency > 0:
            await asyncio.sleep(latency)
        if not authorised(request):
            return unauthenticated()
        organisation_id = request.path_params["organisation_id"]
        end_user_id = request.query_params.get("end_user_id")
        system_id = request.query_params.get("system_id")
        made = [
            record
            for record in oauth.connections
            if record["api"] == _api(True)
            and record["organisation_id"] == organisation_id
            # The end user's Versori id only: an externalId matches nothing.
            and (not end_user_id or record["endUserId"] == end_user_id)
            and (not system_id or record["systemId"] == system_id)
        ]
        return paged(request, "connections", made, "items", v2_connection)

    async def list_v1(request: Request) -> Response:
        if latency > 0:
            await asyncio.sleep(latency)
        if not authorised(request):
            return unauthenticated()
        organisation_id = request.path_params["organisation_id"]
        connector_id = request.path_params["connector_id"]
        made = [
            record
            for record in reversed(oauth.connections)  # newest first
            if record["api"] == _api(False)
            and record["organisation_id"] == organisation_id
            and record["systemId"] == connector_id
        ]
        return paged(request, "connector-connections", made, "items", _v1_connection)

    async def connections(request: Request) -> Response:
        return JSONResponse(
            {"connections": oauth.connections, "consents": oauth.consents, "faults": oauth.faults}
        )

    async def users(request: Request) -> Response:
        return JSONResponse({"users": oauth.users})

    app.router.routes[:0] = [
        Route(CONSENT_PATH, consent, methods=["GET", "POST"]),
        Route("/o/{organisation_id}/connections", create_v2, methods=["POST"]),
        Route("/o/{organisation_id}/connections", list_v2, methods=["GET"]),
        Route(
            "/o/{organisation_id}/connectors/{connector_id}/connections",
            create_v1,
            methods=["POST"],
        ),
        Route(
            "/o/{organisation_id}/connectors/{connector_id}/connections",
            list_v1,
            methods=["GET"],
        ),
        Route("/_emulator/connections", connections, methods=["GET"]),
        Route("/_emulator/users", users, methods=["GET"]),
    ]


def make_connection(
    oauth: OAuthRuntime,
    v2: bool,
    organisation_id: str,
    system_id: str,
    template_id: str,
    external_id: str,
    name: str,
) -> dict[str, Any]:
    """Make the connection (and its end user, if new) and return its record."""
    now = utcnow().isoformat()
    user = oauth.user(organisation_id, external_id) if v2 and external_id else None
    if v2 and external_id and user is None:
        user = {
            "id": str(ULID()),
            "externalId": external_id,
            "displayName": "",
            "organisationId": organisation_id,
            "createdAt": now,
            "updatedAt": now,
            "seq": oauth.next_seq(),
        }
        oauth.add_user(user)
    record = {
        "id": str(ULID()),
        "name": name,
        "createdAt": now,
        "updatedAt": now,
        "systemId": system_id,
        "connectionTemplateId": template_id or None,
        "endUserId": user["id"] if user is not None else None,
        "credentials": new_credentials(organisation_id, name),
        # the emulator's own bookkeeping (tests read these through /_emulator/connections)
        "api": _api(v2),
        "organisation_id": organisation_id,
        "external_id": external_id or None,
        "template_id": template_id or None,
        "connector_id": None if v2 else system_id,
        "seq": oauth.next_seq(),
    }
    oauth.add(record)
    return record


def new_credentials(organisation_id: str, name: str) -> list[dict[str, Any]]:
    """A connection's `credentials` as Versori gives them back for a code it exchanged: no
    secret, validated (`errors` empty), no expiry."""
    credential = {
        "id": str(ULID()),
        "organisationId": organisation_id,
        "name": name,
        "type": "oauth2-code",
        "errors": [],
    }
    return [{"id": str(ULID()), "credential": credential}]


def end_user(user: dict[str, Any]) -> dict[str, Any]:
    """A Platform API v2 `EndUser`."""
    return {key: value for key, value in user.items() if key != "seq"}


def v2_connection(record: dict[str, Any]) -> dict[str, Any]:
    """A Platform API v2 `Connection` (no end-user field, no status, as Versori's)."""
    connection = {
        key: record[key]
        for key in ("id", "name", "credentials", "createdAt", "updatedAt", "systemId")
    }
    connection["variables"] = []
    if record.get("baseUrl"):
        connection["baseUrl"] = record["baseUrl"]
    if record["connectionTemplateId"]:
        connection["connectionTemplateId"] = record["connectionTemplateId"]
    return connection


def _v1_connection(record: dict[str, Any]) -> dict[str, Any]:
    """A Connect API v1 `ConnectionSummary`."""
    return {key: record[key] for key in ("id", "name", "createdAt", "updatedAt")}


def _read_body(body: Any, v2: bool) -> tuple[list[dict[str, str]], dict[str, Any], str]:
    """The problems of a CreateConnection body, its credential's data and the name."""
    if not isinstance(body, dict):
        return [field_error("", "must be an object")], {}, ""
    problems: list[dict[str, str]] = []
    if v2:
        if not _is_ulid(body.get("connectionTemplateId")):
            problems.append(field_error("connectionTemplateId", "must be a ULID"))
        external_id = body.get("externalId")
        if external_id is not None and (not isinstance(external_id, str) or not external_id):
            problems.append(field_error("externalId", "must be a non-empty string"))
        connection = body.get("connection")
        if not isinstance(connection, dict):
            return [*problems, field_error("connection", "required")], {}, ""
        credentials = connection.get("credentials")
        prefix = "connection.credentials[0]"
    else:
        connection = body
        holder = body.get("credentials")
        credentials = holder.get("action") if isinstance(holder, dict) else None
        prefix = "credentials.action[0]"
    name = connection.get("name")
    if not isinstance(name, str) or not name:
        problems.append(field_error("name", "required"))
    if not isinstance(credentials, list) or not credentials or not isinstance(credentials[0], dict):
        return [*problems, field_error(prefix, "required")], {}, ""
    credential = credentials[0].get("credential") or {}
    data = credential.get("data") if isinstance(credential, dict) else None
    if not isinstance(credential, dict) or credential.get("type") != "oauth2-code":
        problems.append(field_error(f"{prefix}.credential.type", "must be oauth2-code"))
    if not isinstance(data, dict) or not data.get("code") or not data.get("state"):
        problems.append(field_error(f"{prefix}.credential.data", "code and state are required"))
        data = {}
    return problems, data, str(name or "")


def _is_ulid(value: object) -> bool:
    try:
        ULID.from_str(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _consent_page(issued: dict[str, Any], state: str) -> str:
    client = escape(str(issued["client_id"]))
    buttons = (
        f'<form method="post" action="{CONSENT_PATH}">'
        f'<input type="hidden" name="state" value="{escape(state)}">'
        f'<input type="hidden" name="client_id" value="{client}">'
        '<button name="decision" value="allow" id="allow">Allow</button> '
        '<button name="decision" value="deny" id="deny">Deny</button></form>'
    )
    return _page(
        "Emulated provider: allow access?",
        f"<p>The application <b>{client}</b> asks to access your account.</p>{buttons}",
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f"</title></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
