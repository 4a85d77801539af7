"""The emulator's test and demo hooks on the Platform API v2 state (emulator_platform.py): what
happens at Versori without our service, played on demand. Not Versori's API: no API key, and
not counted as Versori calls.

    GET    /_emulator/calls            {"calls": {"<METHOD> <path template>": n}, "total": n}:
                                       every request to a Versori path (/o/...), any answer
    GET    /_emulator/environments     {"environments": [{"id", "organisationId", "name",
                                       "systems": [{"systemId", "connectionTemplateId"}]}]}
    GET    /_emulator/activations      {"activations": [...], "faults": {action: n}}: each as
                                       kept (`links`: [{connectionTemplateId, connectionId}],
                                       deleted connections included), ActivateUser's script
    POST   /_emulator/connections      a connection made "elsewhere", as in Versori's own UI
                                       (no state, no code, no callback). Body: `externalId`
                                       and `systemId` (required), `organisationId` (default:
                                       the one connector of that id), `connectionTemplateId`
                                       (default: the system's template in that organisation's
                                       environments, if exactly one), `name` (default:
                                       "<externalId> (made in Versori)"). Makes the end user
                                       if new; the same 409s as CreateConnection. 201
                                       {"connection": Connection, "user": EndUser}
    POST   /_emulator/connections/{id}/credential
                                       its credential's health: `errors` (a list of strings,
                                       [] valid; null: never validated, the key dropped) and/or
                                       `expiresAt` (ISO 8601 with a zone; null drops it).
                                       200, the Connection
    DELETE /_emulator/connections/{id} deleted out of band (204), held by an activation or
                                       not: the activation stays and lists it no more
Hooks on a connection find v2 connections only (404 otherwise). Unknown fields are 400.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from demo.emulator_config import is_ulid
from demo.emulator_oauth import end_user, make_connection, v2_connection
from demo.emulator_platform import V2, PlatformRuntime, json_body, not_found
from demo.versori_rules import error_response, field_error, invalid_body, normalise_ulid

if TYPE_CHECKING:
    from starlette.applications import Starlette

_MAKE_FIELDS = frozenset(
    {"externalId", "systemId", "organisationId", "connectionTemplateId", "name"}
)
_HEALTH_FIELDS = frozenset({"errors", "expiresAt"})


def mount_hooks(app: Starlette, runtime: Any) -> None:
    """Add the hooks to the emulator's `app`, after mount_platform; `runtime` is its _Runtime."""
    platform: PlatformRuntime = app.state.platform
    oauth = platform.oauth
    config = runtime.config

    def v2_record(request: Request) -> dict[str, Any] | Response:
        raw = request.path_params["connection_id"]
        record = oauth.connection_index.get(normalise_ulid(raw)) if is_ulid(raw) else None
        if record is None or record["api"] != V2:
            return not_found("connection", raw)
        return record

    async def calls(request: Request) -> Response:
        counted = dict(platform.calls)
        return JSONResponse({"calls": counted, "total": sum(counted.values())})

    async def environments(request: Request) -> Response:
        return JSONResponse(
            {
                "environments": [
                    {
                        "id": e.environment_id,
                        "organisationId": e.organisation_id,
                        "name": e.name,
                        "systems": [
                            {"systemId": s, "connectionTemplateId": t} for s, t in e.systems
                        ],
                    }
                    for e in config.environments
                ]
            }
        )

    async def activations(request: Request) -> Response:
        return JSONResponse({"activations": platform.activations, "faults": platform.faults})

    async def make_elsewhere(request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        problems = _unknown(body, _MAKE_FIELDS)
        for key in ("externalId", "systemId"):
            if not isinstance(body.get(key), str) or not body[key]:
                problems.append(field_error(key, "required, a non-empty string"))
        for key in ("organisationId", "connectionTemplateId"):
            if key in body and not is_ulid(body[key]):
                problems.append(field_error(key, "must be a ULID"))
        name = body.get("name")
        if "name" in body and (not isinstance(name, str) or not name):
            problems.append(field_error("name", "must be a non-empty string"))
        if problems:
            return invalid_body(problems)
        external_id: str = body["externalId"]
        system_id: str = body["systemId"]
        organisations = {
            c.organisation_id for c in config.connectors if c.connector_id == system_id
        }
        organisation_id = body.get("organisationId")
        if organisation_id is None and len(organisations) > 1:
            message = f"required: system {system_id} is in {len(organisations)} organisations"
            return invalid_body([field_error("organisationId", message)])
        if organisation_id is None and organisations:
            [organisation_id] = organisations
        if not isinstance(organisation_id, str) or organisation_id not in organisations:
            message = f"no system {system_id} in the emulator's connectors for that organisation"
            return invalid_body([field_error("systemId", message)])
        template_id = body.get("connectionTemplateId")
        if template_id is None:
            templates = [
                found
                for e in config.environments
                if e.organisation_id == organisation_id
                and (found := e.template_of(system_id)) is not None
            ]
            if len(templates) != 1:
                message = f"required: system {system_id} has {len(templates)} templates"
                return invalid_body([field_error("connectionTemplateId", message)])
            [template_id] = templates
        template_id = normalise_ulid(template_id)
        name = name or f"{external_id} (made in Versori)"
        why = oauth.conflict(True, organisation_id, system_id, template_id, external_id, name)
        if why is not None:
            return error_response(409, "conflict", why)
        record = make_connection(
            oauth, True, organisation_id, system_id, template_id, external_id, name
        )
        record["elsewhere"] = True
        user = end_user(oauth.users_by_id[record["endUserId"]])
        return JSONResponse({"connection": v2_connection(record), "user": user}, status_code=201)

    async def set_health(request: Request) -> Response:
        record = v2_record(request)
        if isinstance(record, Response):
            return record
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        problems = _unknown(body, _HEALTH_FIELDS)
        if not _HEALTH_FIELDS & body.keys():
            problems.append(field_error("", "give errors, expiresAt or both"))
        errors = body.get("errors")
        if errors is not None and (
            not isinstance(errors, list) or not all(isinstance(e, str) for e in errors)
        ):
            problems.append(field_error("errors", "must be a list of strings, or null"))
        expires = body.get("expiresAt")
        if expires is not None:
            when = _aware(expires)
            if when is None:
                problems.append(
                    field_error("expiresAt", "must be an ISO 8601 time with a zone, or null")
                )
            else:
                expires = when.isoformat()
        if problems:
            return invalid_body(problems)
        for holder in record["credentials"]:
            credential = holder["credential"]
            for key, value in (("errors", errors), ("expiresAt", expires)):
                if key not in body:
                    continue
                if value is None:
                    credential.pop(key, None)
                else:
                    credential[key] = value
        return JSONResponse(v2_connection(record))

    async def delete_elsewhere(request: Request) -> Response:
        record = v2_record(request)
        if isinstance(record, Response):
            return record
        oauth.remove(record)
        return Response(status_code=204)

    app.router.routes[:0] = [
        Route("/_emulator/calls", calls, methods=["GET"]),
        Route("/_emulator/environments", environments, methods=["GET"]),
        Route("/_emulator/activations", activations, methods=["GET"]),
        Route("/_emulator/connections", make_elsewhere, methods=["POST"]),
        Route("/_emulator/connections/{connection_id}/credential", set_health, methods=["POST"]),
        Route("/_emulator/connections/{connection_id}", delete_elsewhere, methods=["DELETE"]),
    ]


def _unknown(body: dict[str, Any], known: frozenset[str]) -> list[dict[str, str]]:
    return [field_error(key, "unknown field") for key in sorted(body.keys() - known)]


def _aware(value: object) -> datetime | None:
    """`value` as a time with a zone, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None
