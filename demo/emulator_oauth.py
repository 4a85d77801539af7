"""The emulator's other half of an OAuth2 connection: the provider's consent page at the
authorize URL (`/provider/authorize`: a profile whose authorize_url points there gets it), and
Versori's CreateConnection, which takes only a code that page issued for that state, once.

    GET  /provider/authorize?...state=...   Allow / Deny, for a state the emulator issued
    POST /provider/authorize                303 to the state's redirect_uri with code and state,
                                            or error=access_denied and state
    POST /o/{org}/connections               Platform API v2 CreateConnection
    POST /o/{org}/connectors/{id}/connections   Connect API v1 CreateConnectorConnection
    GET  /_emulator/connections             the connections made (tests read them)
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from ulid import ULID

from demo.versori_rules import error_response, field_error, invalid_body, unauthenticated
from onboarding.clock import utcnow

if TYPE_CHECKING:
    from starlette.applications import Starlette

CONSENT_PATH = "/provider/authorize"


@dataclass
class OAuthRuntime:
    """Codes the consent page issued (code -> what it was issued for) and connections made."""

    states: dict[str, dict[str, Any]]
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    connections: list[dict[str, Any]] = field(default_factory=list)
    consents: dict[str, int] = field(default_factory=lambda: {"allowed": 0, "denied": 0})


def mount_oauth(app: Starlette, runtime: Any) -> None:
    """Add the consent page and CreateConnection to the emulator's `app`; `runtime` is its
    _Runtime (the states it issued, its config's keys and latency)."""
    oauth = OAuthRuntime(runtime.states)
    app.state.states = runtime.states
    app.state.oauth = oauth
    config = runtime.config
    latency = config.latency_ms / 1000.0

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
            oauth.codes[code] = {"state": state, "redirect_uri": redirect_uri, "used": False}
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
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in config.api_keys:
            return unauthenticated()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "invalid_body", "request body is not valid JSON")
        problems, data, name = _read_body(body, v2)
        if problems:
            return invalid_body(problems)
        issued = oauth.codes.get(str(data.get("code", "")))
        if issued is None or issued["state"] != data.get("state") or issued["used"]:
            return error_response(
                400, "invalid_grant", "the code is not valid for this state, or was used"
            )
        if v2 and data.get("redirectUrl") != issued["redirect_uri"]:
            return invalid_body([field_error("credential.data.redirectUrl", "does not match")])
        issued["used"] = True
        now = utcnow().isoformat()
        connection = {"id": str(ULID()), "name": name, "createdAt": now, "updatedAt": now}
        record = {
            **connection,
            "api": "platform-v2" if v2 else "connect-v1",
            "organisation_id": request.path_params["organisation_id"],
            "external_id": body.get("externalId"),
            "template_id": body.get("connectionTemplateId"),
            "connector_id": request.path_params.get("connector_id"),
        }
        oauth.connections.append(record)
        return JSONResponse(connection)

    async def connections(request: Request) -> Response:
        return JSONResponse({"connections": oauth.connections, "consents": oauth.consents})

    app.router.routes[:0] = [
        Route(CONSENT_PATH, consent, methods=["GET", "POST"]),
        Route("/o/{organisation_id}/connections", create_v2, methods=["POST"]),
        Route(
            "/o/{organisation_id}/connectors/{connector_id}/connections",
            create_v1,
            methods=["POST"],
        ),
        Route("/_emulator/connections", connections, methods=["GET"]),
    ]


def _read_body(body: Any, v2: bool) -> tuple[list[dict[str, str]], dict[str, Any], str]:
    """The problems of a CreateConnection body, its credential's data and the name."""
    if not isinstance(body, dict):
        return [field_error("", "must be an object")], {}, ""
    problems: list[dict[str, str]] = []
    if v2:
        if not _is_ulid(body.get("connectionTemplateId")):
            problems.append(field_error("connectionTemplateId", "must be a ULID"))
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
