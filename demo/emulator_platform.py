"""The emulator's Platform API v2 beyond making a connection: knowing and keeping one (its end
users, a connection read, updated in place and deleted), the environments of the config
(EmulatedEnvironment: the systems each needs, one connection template each) and the
activations that make an end user live on one. Every request to a Versori path (/o/...) is
counted per endpoint (GET /_emulator/calls), so a benchmark can report the calls it cost.

    GET    /o/{org}/users                 ListEndUsers: ?search=&first=&after=, and
                                          ?activated=true|false&environment_id= (both or none)
    GET    /o/{org}/users/{user_id}       GetEndUser, by Versori id only
    GET    /o/{org}/connections/{id}      GetConnection
    PUT    /o/{org}/connections/{id}      UpdateConnection: a new oauth2-code credential in place
    DELETE /o/{org}/connections/{id}      DeleteConnection (204)
    POST   /o/{org}/activations           ActivateUser (200, the Activation)
    GET    /o/{org}/environments/{env}/activations                ListActivations (an array)
    GET    /o/{org}/environments/{env}/activations/{id}           GetActivation
    DELETE /o/{org}/environments/{env}/activations/{id}           DeleteActivation (204)
    GET    /o/{org}/environment/{env}/users/{externalId}/activations   ListUserActivations

It is as strict as Versori could be where Versori's documents are silent:
- An id in a path that is not a ULID is 400 (`fields` names it); an unknown one, or one of
  another organisation, 404. ULIDs are read in any case.
- UpdateConnection needs `name`, `credentials` and `baseUrl` (400 naming each missing one;
  `baseUrl` "" or an absolute http(s) URI) and exactly one credential, of type oauth2-code:
  its code is checked and spent as CreateConnection's is (400 `invalid_grant`; a code
  issued for another system is one too), its `data.redirectUrl` must be the state's. The
  connection keeps its id; the credential is a new one (new ids, `errors` [], no
  `expiresAt`). A name taken in the system is 409. Only v2 connections are found here.
- DeleteConnection of a connection an activation holds is refused, 409 `conflict`, naming
  the activation: delete the activation first. A connection deleted out of band (the
  DELETE /_emulator hook, as Versori's UI could) leaves its activation in place, listing
  only the connections that still exist: an activation whose `connections` miss one of its
  environment's systems is what a client sees then. The emulator never acts on an
  `expiresAt` itself: it only reports it.
- ActivateUser: `userId` (the end user's Versori id, else its externalId), `environmentId`
  and `connections`, each `{connectionTemplateId, existingConnectionId}` (an inline
  `connection` is not played: 400). Malformed: 400 `validation_failed`. Unknown environment
  or end user: 404. The end user already activated on the environment: 409 `conflict`.
  Then 422 `unprocessable`, every problem under `fields`: a template not of the environment
  or given twice, a connection unknown, of another end user (or of none), from another
  template or system, or whose credential is broken (`errors` not empty) or expired; and
  each system of the environment without a connection. The answer is 200 with the
  Activation: `id`, `user`, `environmentId`, `environment` (`id`, `name`), `connections`,
  `dynamicVariables`, `createdAt`, `updatedAt`.
- ListUserActivations takes the externalId only; an unknown one is 404.

Test and demo hooks (not Versori's):
    GET    /_emulator/calls                   Versori calls received, per endpoint
    GET    /_emulator/environments            the environments of the config
    GET    /_emulator/activations             the activations made, and the faults played
    POST   /_emulator/connections             a connection made "elsewhere" (as in Versori's
                                              own UI: no state, no code, no callback)
    POST   /_emulator/connections/{id}/credential   set its credential's `errors`/`expiresAt`
    DELETE /_emulator/connections/{id}        delete it out of band, activations or not
ActivateUser's faults: `EmulatorConfig.activate_script`, or `activate:<substring>` keys of a
--script file, matched on a substring of the request's userId or of the end user's
externalId, one action per request in order, a trailing "*" repeating it: "ok"; "400",
"403", "404", "409", "422", "429", "500", "502", "503" (refused, nothing made); "500_after"
(the activation made, then a 500). A scripted answer comes once the environment and the end
user are found, before the 409 and 422 checks.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from ulid import ULID

from demo.emulator_config import EmulatedEnvironment, is_ulid, step_script
from demo.emulator_oauth import (
    OAuthRuntime,
    end_user,
    invalid_grant,
    name_key,
    new_credentials,
    v2_connection,
)
from demo.emulator_pages import bad_query, paged
from demo.versori_rules import (
    error_response,
    field_error,
    invalid_body,
    normalise_ulid,
    read_activation,
    read_update,
    unauthenticated,
)
from onboarding.clock import utcnow

if TYPE_CHECKING:
    from starlette.applications import Starlette

V2 = "platform-v2"
_SCRIPT_DETAILS = "injected by the emulator script"
_SCRIPTED: dict[str, tuple[int, str, str]] = {
    "400": (400, "validation_failed", "request body is invalid"),
    "403": (403, "forbidden", "the API key may not activate this end user"),
    "404": (404, "not_found", "end user not found"),
    "409": (409, "conflict", "the end user is already activated on this environment"),
    "422": (422, "unprocessable", "the activation cannot be made"),
    "429": (429, "rate_limited", "too many requests"),
    "500": (500, "internal", "internal server error"),
    "502": (502, "bad_gateway", "bad gateway"),
    "503": (503, "unavailable", "the service is temporarily unavailable"),
}
_CONVERTOR = re.compile(r":\w+}")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class PlatformRuntime:
    """The activations made (in order, and by id, by end user and environment, by connection
    held), the Versori calls received per endpoint, and ActivateUser's script progress."""

    oauth: OAuthRuntime
    environments: dict[str, EmulatedEnvironment]
    activations: list[dict[str, Any]] = field(default_factory=list)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_user: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    holders: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "GET /o/{organisation_id}/users/{user_id}" -> requests received (any answer)
    calls: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    script_progress: dict[tuple[str, str], int] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget every activation and count (POST /_emulator/reset)."""
        for kept in (self.by_id, self.by_user, self.holders, self.calls, self.faults):
            kept.clear()
        self.activations.clear()
        self.script_progress.clear()

    def count(self, what: str) -> None:
        self.faults[what] = self.faults.get(what, 0) + 1

    def add(self, activation: dict[str, Any]) -> None:
        self.activations.append(activation)
        self.by_id[activation["id"]] = activation
        self.by_user[(activation["userId"], activation["environmentId"])] = activation
        for link in activation["links"]:
            self.holders[link["connectionId"]] = activation

    def remove(self, activation: dict[str, Any]) -> None:
        self.activations.remove(activation)
        del self.by_id[activation["id"]]
        del self.by_user[(activation["userId"], activation["environmentId"])]
        for link in activation["links"]:
            if self.holders.get(link["connectionId"]) is activation:
                del self.holders[link["connectionId"]]

    def environment(self, organisation_id: str, environment_id: str) -> EmulatedEnvironment | None:
        found = self.environments.get(environment_id)
        return found if found is not None and found.organisation_id == organisation_id else None

    def wire(self, activation: dict[str, Any]) -> dict[str, Any]:
        """A Platform API v2 `Activation`: the connections that still exist, in the order of
        its environment's systems."""
        environment = self.environments[activation["environmentId"]]
        index = self.oauth.connection_index
        return {
            "id": activation["id"],
            "user": end_user(self.oauth.users_by_id[activation["userId"]]),
            "environmentId": environment.environment_id,
            "environment": {"id": environment.environment_id, "name": environment.name},
            "connections": [
                v2_connection(index[link["connectionId"]])
                for link in activation["links"]
                if link["connectionId"] in index
            ],
            "dynamicVariables": activation["dynamicVariables"],
            "createdAt": activation["createdAt"],
            "updatedAt": activation["updatedAt"],
        }


def mount_platform(app: Starlette, runtime: Any) -> None:
    """Add the routes of this module to the emulator's `app` (after mount_oauth), and count
    every request to a Versori path; `runtime` is its _Runtime. The test hooks are
    emulator_hooks.py's (mount_hooks)."""
    oauth: OAuthRuntime = app.state.oauth
    config = runtime.config
    platform = PlatformRuntime(oauth, {e.environment_id: e for e in config.environments})
    app.state.platform = platform
    runtime.reset_hooks.append(platform.reset)
    latency = config.latency_ms / 1000.0

    async def refused(request: Request) -> Response | None:
        """The wait every call takes, then 401 unless the API key is one of the config's."""
        if latency > 0:
            await asyncio.sleep(latency)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in config.api_keys:
            return unauthenticated()
        return None

    def v2_record(request: Request) -> dict[str, Any] | Response:
        """The v2 connection the path names, or the 400/404 that says why there is none."""
        raw = request.path_params["connection_id"]
        if not is_ulid(raw):
            return bad_path("connection_id")
        record = oauth.connection_index.get(normalise_ulid(raw))
        org = request.path_params["organisation_id"]
        if record is None or record["api"] != V2 or record["organisation_id"] != org:
            return error_response(404, "not_found", f"connection {raw} not found")
        return record

    def environment_of(request: Request) -> EmulatedEnvironment | Response:
        raw = request.path_params["environment_id"]
        if not is_ulid(raw):
            return bad_path("environment_id")
        return platform.environment(
            request.path_params["organisation_id"], normalise_ulid(raw)
        ) or not_found("environment", raw)

    async def list_users(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        organisation_id = request.path_params["organisation_id"]
        search = request.query_params.get("search", "").lower()
        users = [
            user
            for user in oauth.users
            if user["organisationId"] == organisation_id
            and (
                not search
                or any(search in user[k].lower() for k in ("id", "externalId", "displayName"))
            )
        ]
        activated = request.query_params.get("activated")
        environment_id = request.query_params.get("environment_id")
        if activated is not None or environment_id is not None:
            if activated is None:
                return bad_query("activated", "required with environment_id")
            if environment_id is None:
                return bad_query("environment_id", "required with activated")
            if activated not in ("true", "false"):
                return bad_query("activated", "must be true or false")
            if not is_ulid(environment_id):
                return bad_query("environment_id", "must be a ULID")
            environment = platform.environment(organisation_id, normalise_ulid(environment_id))
            if environment is None:
                return not_found("environment", environment_id)
            env_id = environment.environment_id
            live = {a["userId"] for a in platform.activations if a["environmentId"] == env_id}
            users = [user for user in users if (user["id"] in live) == (activated == "true")]
        return paged(request, "users", users, "users", end_user)

    async def get_user(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        raw = request.path_params["user_id"]
        if not is_ulid(raw):
            return bad_path("user_id")
        user = oauth.users_by_id.get(normalise_ulid(raw))
        if user is None or user["organisationId"] != request.path_params["organisation_id"]:
            return not_found("end user", raw)
        return JSONResponse(end_user(user))

    async def get_connection(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        record = v2_record(request)
        return record if isinstance(record, Response) else JSONResponse(v2_connection(record))

    async def update_connection(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        if not is_ulid(request.path_params["connection_id"]):
            return bad_path("connection_id")
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        problems, data, name, base_url = read_update(body)
        if problems:
            return invalid_body(problems)
        record = v2_record(request)
        if isinstance(record, Response):
            return record
        issued = oauth.spendable(data, record["organisation_id"])
        if issued is None or issued["system_id"] != record["systemId"]:
            return invalid_grant()
        if data.get("redirectUrl") != issued["redirect_uri"]:
            return invalid_body(
                [field_error("credentials[0].credential.data.redirectUrl", "does not match")]
            )
        renamed = {**record, "name": name}
        if name != record["name"] and name_key(renamed) in oauth.taken:
            message = f"a connection named {name!r} already exists in system {record['systemId']}"
            return error_response(409, "conflict", message)
        issued["used"] = True
        oauth.taken.discard(name_key(record))
        oauth.taken.add(name_key(renamed))
        record.update(
            name=name,
            baseUrl=base_url,
            credentials=new_credentials(record["organisation_id"], name),
            updatedAt=utcnow().isoformat(),
        )
        return JSONResponse(v2_connection(record))

    async def delete_connection(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        record = v2_record(request)
        if isinstance(record, Response):
            return record
        holder = platform.holders.get(record["id"])
        if holder is not None:
            return error_response(
                409,
                "conflict",
                f"connection {record['id']} is held by activation {holder['id']} of "
                f"environment {holder['environmentId']}; delete the activation first",
            )
        oauth.remove(record)
        return Response(status_code=204)

    async def activate(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        problems = read_activation(body)
        if problems:
            return invalid_body(problems)
        organisation_id = request.path_params["organisation_id"]
        environment = platform.environment(organisation_id, normalise_ulid(body["environmentId"]))
        if environment is None:
            return not_found("environment", body["environmentId"])
        user_id: str = body["userId"]
        user = (
            oauth.users_by_id.get(normalise_ulid(user_id)) if is_ulid(user_id) else None
        ) or oauth.user(organisation_id, user_id)
        if user is None or user["organisationId"] != organisation_id:
            return not_found("end user", user_id)

        action = None
        for pattern, actions in config.activate_script.items():
            if pattern in user_id or pattern in user["externalId"]:
                key = (user["externalId"], environment.environment_id)
                action = step_script(actions, platform.script_progress, key)
                break
        if action is not None:
            platform.count(action)
        if action in _SCRIPTED:
            status, code, message = _SCRIPTED[action]
            headers = {"Retry-After": "1"} if status == 429 else None
            return error_response(status, code, message, details=_SCRIPT_DETAILS, headers=headers)

        held = platform.by_user.get((user["id"], environment.environment_id))
        if held is not None:
            return error_response(
                409,
                "conflict",
                f"end user {user['externalId']} is already activated on environment "
                f"{environment.environment_id} (activation {held['id']})",
            )
        links, problems = check_links(oauth, environment, user, body["connections"])
        if problems:
            return error_response(
                422, "unprocessable", "the activation cannot be made", fields=problems
            )
        now = utcnow().isoformat()
        activation = {
            "id": str(ULID()),
            "organisationId": organisation_id,
            "environmentId": environment.environment_id,
            "userId": user["id"],
            "links": links,
            "dynamicVariables": body.get("dynamicVariables") or {},
            "createdAt": now,
            "updatedAt": now,
        }
        platform.add(activation)
        if action == "500_after":
            return error_response(500, "internal", "internal server error", details=_SCRIPT_DETAILS)
        return JSONResponse(platform.wire(activation))

    async def list_activations(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        environment = environment_of(request)
        if isinstance(environment, Response):
            return environment
        env_id = environment.environment_id
        made = [platform.wire(a) for a in platform.activations if a["environmentId"] == env_id]
        return JSONResponse(made)

    def activation_of(request: Request) -> dict[str, Any] | Response:
        environment = environment_of(request)
        if isinstance(environment, Response):
            return environment
        raw = request.path_params["activation_id"]
        if not is_ulid(raw):
            return bad_path("activation_id")
        activation = platform.by_id.get(normalise_ulid(raw))
        if activation is None or activation["environmentId"] != environment.environment_id:
            return not_found("activation", raw)
        return activation

    async def get_activation(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        activation = activation_of(request)
        if isinstance(activation, Response):
            return activation
        return JSONResponse(platform.wire(activation))

    async def delete_activation(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        activation = activation_of(request)
        if isinstance(activation, Response):
            return activation
        platform.remove(activation)
        return Response(status_code=204)

    async def user_activations(request: Request) -> Response:
        if (answer := await refused(request)) is not None:
            return answer
        environment = environment_of(request)
        if isinstance(environment, Response):
            return environment
        external_id = request.path_params["external_user_id"]
        user = oauth.user(request.path_params["organisation_id"], external_id)
        if user is None:
            return not_found("end user", external_id)
        held = platform.by_user.get((user["id"], environment.environment_id))
        return JSONResponse([platform.wire(held)] if held is not None else [])

    app.router.routes[:0] = [
        Route("/o/{organisation_id}/users", list_users, methods=["GET"]),
        Route("/o/{organisation_id}/users/{user_id}", get_user, methods=["GET"]),
        Route("/o/{organisation_id}/connections/{connection_id}", get_connection, methods=["GET"]),
        Route(
            "/o/{organisation_id}/connections/{connection_id}", update_connection, methods=["PUT"]
        ),
        Route(
            "/o/{organisation_id}/connections/{connection_id}",
            delete_connection,
            methods=["DELETE"],
        ),
        Route("/o/{organisation_id}/activations", activate, methods=["POST"]),
        Route(
            "/o/{organisation_id}/environments/{environment_id}/activations",
            list_activations,
            methods=["GET"],
        ),
        Route(
            "/o/{organisation_id}/environments/{environment_id}/activations/{activation_id}",
            get_activation,
            methods=["GET"],
        ),
        Route(
            "/o/{organisation_id}/environments/{environment_id}/activations/{activation_id}",
            delete_activation,
            methods=["DELETE"],
        ),
        Route(
            "/o/{organisation_id}/environment/{environment_id}/users/{external_user_id:path}"
            "/activations",
            user_activations,
            methods=["GET"],
        ),
    ]
    _count_versori_calls(app, platform)


def _count_versori_calls(app: Starlette, platform: PlatformRuntime) -> None:
    """Put a counter in front of every route of a Versori path (/o/...): each request received
    counts under "<METHOD> <path template>", whatever its answer."""
    routes = app.router.routes
    for position, route in enumerate(routes):
        if not isinstance(route, Route) or not route.path.startswith("/o/"):
            continue
        template = _CONVERTOR.sub("}", route.path)
        routes[position] = Route(
            route.path,
            _counted(route.endpoint, template, platform.calls),
            methods=sorted(route.methods or ()),
            name=route.name,
        )


def _counted(endpoint: Callable[..., Any], template: str, calls: dict[str, int]) -> Handler:
    async def counted(request: Request) -> Response:
        key = f"{request.method} {template}"
        calls[key] = calls.get(key, 0) + 1
        answer: Response = await endpoint(request)
        return answer

    return counted


def bad_path(name: str) -> JSONResponse:
    return error_response(
        400,
        "validation_failed",
        "path parameters are invalid",
        fields=[field_error(name, "must be a ULID")],
    )


def not_found(kind: str, raw: str) -> JSONResponse:
    return error_response(404, "not_found", f"{kind} {raw} not found")


async def json_body(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object, or the 400 (or 499, the client gone) that says why not."""
    try:
        body = json.loads(await request.body())
    except ClientDisconnect:
        return Response(status_code=499)
    except (ValueError, RecursionError):
        return error_response(400, "invalid_body", "request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "invalid_body", "request body must be a JSON object")
    return body


def check_links(
    oauth: OAuthRuntime,
    environment: EmulatedEnvironment,
    user: dict[str, Any],
    connections: list[dict[str, Any]],
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The activation's links ({connectionTemplateId, connectionId}, in the order of the
    environment's systems) and every reason they cannot be made."""
    problems: list[dict[str, str]] = []
    chosen: dict[str, str] = {}
    now = utcnow()
    for i, item in enumerate(connections):
        template_id = normalise_ulid(item["connectionTemplateId"])
        connection_id = normalise_ulid(item["existingConnectionId"])
        where = f"connections[{i}]"
        system_id = environment.system_of(template_id)
        if system_id is None:
            message = f"is not a connection template of environment {environment.environment_id}"
            problems.append(field_error(f"{where}.connectionTemplateId", message))
            continue
        if template_id in chosen:
            problems.append(field_error(f"{where}.connectionTemplateId", "is given twice"))
            continue
        chosen[template_id] = connection_id
        record = oauth.connection_index.get(connection_id)
        why = None
        if record is None or record["api"] != V2:
            why = "no such connection"
        elif record["endUserId"] != user["id"]:
            why = f"is not a connection of end user {user['externalId']}"
        elif record["connectionTemplateId"] != template_id:
            why = f"was made from template {record['connectionTemplateId']}, not {template_id}"
        elif record["systemId"] != system_id:
            why = f"is a connection of system {record['systemId']}, not {system_id}"
        else:
            why = _unusable(record, now)
        if why is not None:
            problems.append(field_error(f"{where}.existingConnectionId", why))
    for system_id, template_id in environment.systems:
        if template_id not in chosen:
            message = f"no connection for system {system_id} (template {template_id})"
            problems.append(field_error("connections", message))
    links = [
        {"connectionTemplateId": t, "connectionId": chosen[t]}
        for _, t in environment.systems
        if t in chosen
    ]
    return links, problems


def _unusable(record: dict[str, Any], now: datetime) -> str | None:
    """Why a connection's credential cannot be activated (broken or expired), or None."""
    for holder in record["credentials"]:
        credential = holder.get("credential") or {}
        if credential.get("errors"):
            return f"its credential is broken: {'; '.join(credential['errors'])}"
        expires = credential.get("expiresAt")
        if expires and datetime.fromisoformat(expires) <= now:
            return f"its credential expired at {expires}"
    return None
