"""A synchronous client for Versori's InitialiseOAuth2Connection, CreateConnection, and the
lists that say which connection Versori holds for a tenant (`find_connection`).

It makes exactly one HTTP attempt per call: retries belong to the caller (the Prefect task), so
attempts never multiply. It turns every failure into one of the types in `onboarding.errors`
and never lets a raw httpx exception out. A call is bounded by a deadline: every socket
operation gets at most the time left when the request starts, and the body is read in chunks
checked against it. Known gap: a server that trickles its status line and headers a byte at a
time, each within the read timeout, is not cut off at the deadline (httpx exposes no hook
between header reads).
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import math
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import TypeAdapter, ValidationError

from onboarding import constants
from onboarding.clock import utcnow
from onboarding.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    FieldError,
    InputError,
    RateLimitedError,
    error_class_for,
)
from onboarding.settings import API_KEY_NOT_SET, VersoriSettings, check_api_key, check_base_url
from onboarding.versori.wire import (
    ActivationResponse,
    Api,
    ConnectionPage,
    ConnectionResponse,
    EndUserPage,
    EndUserResponse,
    ErrorBody,
    InitialiseRequest,
    InitialiseResponse,
    oauth2_code_credential,
)

log = logging.getLogger(__name__)
_PageT = TypeVar("_PageT", EndUserPage, ConnectionPage)
_ModelT = TypeVar("_ModelT", ActivationResponse, ConnectionResponse)
_ACTIVATIONS: TypeAdapter[list[ActivationResponse] | None] = TypeAdapter(
    list[ActivationResponse] | None
)

_MAX_BODY_BYTES = 1 << 20
# An environment's activations come in one unpaged array (ListActivations), ~1 KB each: room
# for some 100,000 (1 MiB held 1,300 and stopped sync beyond them).
_WHOLE_ENVIRONMENT_BYTES = 128 << 20
# find_connection's lists: items asked for per page (Versori's maximum), and how many pages it
# follows before it calls the list broken.
PAGE_SIZE = 100
MAX_PAGES = 50
# A whole organisation's list (sync): 100,000 items.
_WHOLE_LIST = 1000
# Paths whose parsed URL a client keeps (see VersoriClient._url).
_URLS_KEPT = 64
__version__ = "0.1.0"


def parse_retry_after(value: str | None, now: Callable[[], datetime] | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if unusable.

    Clamped to 0..`constants.MAX_RETRY_AFTER_SECONDS`: a hostile or broken header (`86400`,
    `Fri, 31 Dec 9999 23:59:59 GMT`) must not stall every worker, or overflow a sleep."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            seconds = (when - (now or utcnow)()).total_seconds()
        except OverflowError:
            return None
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return min(max(0.0, seconds), constants.MAX_RETRY_AFTER_SECONDS)


class VersoriClient:
    """Calls one Versori API: the Connect API v1 (`api="connect-v1"`, connectors) or the Platform
    API v2 (`api="platform-v2"`, systems). Thread-safe: one instance serves every worker of a
    batch. Takes its key, base URL (None: the API's production one) and timeouts from its
    caller; `from_settings` takes them from VERSORI_* (the settings root's `versori`)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        connect_timeout: float = constants.CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = constants.READ_TIMEOUT_SECONDS,
        call_deadline: float = constants.CALL_DEADLINE_SECONDS,
        max_connections: int = constants.DEFAULT_CONCURRENCY,
        transport: httpx.BaseTransport | None = None,
        api: Api = "connect-v1",
    ) -> None:
        if api not in constants.PRODUCTION_BASE_URLS:
            raise InputError(
                f"api must be {constants.CONNECT_V1} or {constants.PLATFORM_V2}, not {api!r}"
            )
        self.api: Api = api
        production = constants.PRODUCTION_BASE_URLS[api]
        # How an error names where it called: the base URL, and the setting that chose it.
        self.base_url_source = (
            "VERSORI_BASE_URL" if base_url else f"the {api} default; VERSORI_BASE_URL sets another"
        )
        if not api_key:
            raise InputError(API_KEY_NOT_SET)
        try:
            check_api_key(api_key)
        except ValueError as err:
            raise InputError(f"VERSORI_API_KEY {err}") from None
        try:
            base_url = check_base_url(base_url or production, production)
        except ValueError as err:
            raise InputError(f"VERSORI_BASE_URL {err}") from None
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        # As errors show it: with its port, never with a user or password it may carry.
        netloc = parts.netloc.rpartition("@")[2]
        self.shown_url = f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._call_deadline = call_deadline
        self._headers = _request_headers(api_key)
        # The URL of each path called without a query, parsed once (a batch calls one path).
        self._urls: dict[str, httpx.URL] = {}
        self._new_transport = _transport_factory(self.base_url, transport)
        self._local = threading.local()
        self._transports: list[httpx.BaseTransport] = []
        self._transports_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        # Requests sent (what `onboard sync` reports); itertools.count is atomic under the GIL.
        self._sent = itertools.count()
        self.calls = 0

    @classmethod
    def from_settings(
        cls,
        settings: VersoriSettings,
        *,
        api: Api = "connect-v1",
        api_key: str | None = None,
        max_connections: int = constants.DEFAULT_CONCURRENCY,
        deadline: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> VersoriClient:
        """A client as VERSORI_* set it: `api_key` (one read from a Prefect Secret block) or
        VERSORI_API_KEY, VERSORI_BASE_URL when set (else `api`'s production URL), the timeouts
        and call deadline, the last two within `deadline` when given (a browser waiting)."""
        env_key = settings.api_key.get_secret_value() if settings.api_key else None
        read_timeout, call_deadline = settings.read_timeout, settings.call_deadline
        if deadline is not None:
            read_timeout, call_deadline = min(read_timeout, deadline), min(call_deadline, deadline)
        return cls(
            api=api,
            api_key=api_key or env_key,
            base_url=settings.base_url_if_set,
            connect_timeout=settings.connect_timeout,
            read_timeout=read_timeout,
            call_deadline=call_deadline,
            max_connections=max_connections,
            transport=transport,
        )

    @property
    def _transport(self) -> httpx.BaseTransport:
        """This thread's connection pool (see _transport_factory)."""
        transport: httpx.BaseTransport | None = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = self._new_transport()
            with self._transports_lock:
                self._transports.append(transport)
        return transport

    def __enter__(self) -> VersoriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._transports_lock:
            transports, self._transports = self._transports, []
        for transport in {id(t): t for t in transports}.values():  # a given one is shared
            transport.close()

    def initialise(
        self, organisation_id: str, connector_id: str, request: InitialiseRequest
    ) -> str:
        """Ask Versori for an authorize URL; return it unchecked (see
        `onboarding.versori.authorize_url`).

        `connector_id` is the connector's id for the Connect API v1, the system's id for the
        Platform API v2 (the path's `systems/{system_id}`)."""
        if self.api == constants.PLATFORM_V2:
            collection = "systems"
        elif request.redirect_url is not None:
            # The Connect API v1 has no redirectUrl: it would refuse the body as a whole.
            raise InputError(
                "redirect_url is a Platform API v2 field: set api: platform-v2 in the profile "
                "(with system_id), or remove redirect_url"
            )
        else:
            collection = "connectors"
        path = (
            f"/o/{quote(organisation_id, safe='')}/{collection}/"
            f"{quote(connector_id, safe='')}/oauth2/initialise"
        )
        status, headers, body = self._post(path, request.to_wire())
        if 200 <= status < 300:
            try:
                return InitialiseResponse.model_validate_json(body).url
            except ValidationError as err:
                raise APIError(
                    status, "invalid_response", "Versori answered 2xx without a JSON 'url'"
                ) from err
        raise self._error_for(status, headers, body)

    def create_connection(
        self,
        organisation_id: str,
        connector_id: str,
        *,
        code: str,
        state: str,
        name: str,
        external_id: str,
        template_id: str | None = None,
        redirect_url: str | None = None,
        deadline: float | None = None,
    ) -> ConnectionResponse:
        """Complete an OAuth2 connection with the code and state the provider sent back: the
        Platform API v2's CreateConnection (`template_id`: the connection template, required
        there) or the Connect API v1's CreateConnectorConnection. One attempt, the same error
        types as `initialise`; the code and state are never in an error's message.
        `deadline`: seconds for this call, if shorter than the client's call deadline.

        A timeout, a connection error or a 5xx leaves the outcome unknown (the connection may
        have been made), and a 409 (ConflictError) says one exists: `find_connection` says
        which connection Versori holds."""
        budget = self._budget(deadline)
        credential = oauth2_code_credential(organisation_id, name, code, state, redirect_url)
        org = quote(organisation_id, safe="")
        payload: dict[str, Any]
        if self.api == constants.PLATFORM_V2:
            if not template_id:
                raise InputError(
                    "connection_template_id is not set in the profile: a Platform API v2 "
                    "connection is created from its template; set connection_template_id"
                )
            path = f"/o/{org}/connections"
            payload = {
                "connectionTemplateId": template_id,
                "externalId": external_id,
                "connection": {"name": name, "credentials": [credential]},
            }
        else:
            path = f"/o/{org}/connectors/{quote(connector_id, safe='')}/connections"
            # The Connect API v1 has no end users: the connector's connection is the tenant's.
            payload = {
                "name": name,
                "credentials": {"action": [credential]},
                "variables": [],
            }
        status, headers, body = self._post(path, payload, budget)
        if 200 <= status < 300:
            try:
                return ConnectionResponse.model_validate_json(body)
            except ValidationError as err:
                raise APIError(
                    status, "invalid_response", "Versori answered 2xx without a connection id"
                ) from err
        raise self._error_for(status, headers, body)

    def find_connection(
        self,
        organisation_id: str,
        connector_id: str,
        *,
        external_id: str,
        name: str,
        template_id: str | None = None,
        deadline: float | None = None,
    ) -> ConnectionResponse | None:
        """The connection Versori holds for this tenant, or None: what to ask after a
        CreateConnection whose outcome is unknown (a timeout, a 5xx, a dropped connection) or
        refused with a 409.

        Platform API v2: the end user whose externalId is exactly `external_id` (ListEndUsers'
        search matches substrings, so the match is made here), then that end user's
        connections in the system `connector_id` (by the end user's Versori id, never its
        externalId), the one from `template_id` if given, else the first. Connect API v1: the
        connector's connection named exactly `name`. Read-only; the whole lookup is bounded by
        `deadline` seconds (or the client's call deadline, if shorter) and MAX_PAGES pages per
        list; the same error types as `initialise`."""
        if not (name if self.api == constants.CONNECT_V1 else external_id):
            missing = "name" if self.api == constants.CONNECT_V1 else "external_id"
            raise InputError(f"find_connection needs the connection's {missing}")
        budget = self._budget(deadline)
        ends_at = time.monotonic() + budget
        org = quote(organisation_id, safe="")
        if self.api == constants.CONNECT_V1:
            path = f"/o/{org}/connectors/{quote(connector_id, safe='')}/connections"
            for page in self._pages(path, {}, ConnectionPage, ends_at, budget):
                for connection in page.items:
                    if connection.name == name:
                        return connection
            return None
        user_id = None
        search = {"search": external_id}
        for users in self._pages(f"/o/{org}/users", search, EndUserPage, ends_at, budget):
            user_id = next((u.id for u in users.users if u.external_id == external_id), None)
            if user_id is not None:
                break
        if user_id is None:
            return None
        params = {"end_user_id": user_id, "system_id": connector_id}
        for page in self._pages(f"/o/{org}/connections", params, ConnectionPage, ends_at, budget):
            for connection in page.items:
                # Versori filters by system already; a connection that says otherwise is not
                # this system's. ULIDs compare in any case.
                if connection.system_id and not _same_id(connection.system_id, connector_id):
                    continue
                if not template_id or _same_id(
                    connection.connection_template_id or "", template_id
                ):
                    return connection
        return None

    # Sync, activation and reconnect: Platform API v2 (connector_connections: the Connect API
    # v1). Reads page through whole lists; writes are one attempt each, as above.

    def end_users(self, organisation_id: str) -> Iterator[EndUserResponse]:
        """Every end user of the organisation (ListEndUsers, 100 a page)."""
        path = f"/o/{self._v2_org(organisation_id)}/users"
        for page in self._pages(path, {}, EndUserPage, None, self._call_deadline, _WHOLE_LIST):
            yield from page.users

    def connections_of(
        self, organisation_id: str, end_user_id: str, system_id: str
    ) -> list[ConnectionResponse]:
        """An end user's connections in a system (ListConnections; `end_user_id` is the end
        user's Versori id, never its externalId)."""
        path = f"/o/{self._v2_org(organisation_id)}/connections"
        params = {"end_user_id": end_user_id, "system_id": system_id}
        budget = self._call_deadline
        return [
            c
            for page in self._pages(path, params, ConnectionPage, None, budget)
            for c in page.items
        ]

    def connector_connections(
        self, organisation_id: str, connector_id: str
    ) -> Iterator[ConnectionResponse]:
        """Every connection of a Connect API v1 connector (ListConnectorConnections)."""
        org, connector = quote(organisation_id, safe=""), quote(connector_id, safe="")
        path = f"/o/{org}/connectors/{connector}/connections"
        budget = self._call_deadline
        for page in self._pages(path, {}, ConnectionPage, None, budget, _WHOLE_LIST):
            yield from page.items

    def environment_activations(
        self, organisation_id: str, environment_id: str
    ) -> list[ActivationResponse]:
        """Every activation on an environment (ListActivations: one array)."""
        env = quote(environment_id, safe="")
        path = f"/o/{self._v2_org(organisation_id)}/environments/{env}/activations"
        return self._read_list(path, max_bytes=_WHOLE_ENVIRONMENT_BYTES)

    def user_activations(
        self, organisation_id: str, environment_id: str, external_id: str
    ) -> list[ActivationResponse]:
        """One end user's activations on an environment (ListUserActivations, by externalId)."""
        env, user = quote(environment_id, safe=""), quote(external_id, safe="")
        org = self._v2_org(organisation_id)
        return self._read_list(f"/o/{org}/environment/{env}/users/{user}/activations")

    def activate_user(
        self,
        organisation_id: str,
        *,
        user_id: str,
        environment_id: str,
        connections: list[tuple[str, str]],
    ) -> ActivationResponse:
        """ActivateUser: the end user (`user_id`: its id or externalId) on the environment, with
        an existing connection per system (`connections`: (template id, connection id))."""
        payload: dict[str, Any] = {
            "userId": user_id,
            "environmentId": environment_id,
            "connections": [
                {"connectionTemplateId": template, "existingConnectionId": connection}
                for template, connection in connections
            ],
        }
        path = f"/o/{self._v2_org(organisation_id)}/activations"
        status, headers, body = self._post(path, payload)
        return self._answer(status, headers, body, ActivationResponse, "an activation")

    def delete_activation(
        self, organisation_id: str, environment_id: str, activation_id: str
    ) -> None:
        """DeleteActivation (one that holds a connection that was replaced); gone already is
        fine."""
        env, act = quote(environment_id, safe=""), quote(activation_id, safe="")
        path = f"/o/{self._v2_org(organisation_id)}/environments/{env}/activations/{act}"
        status, headers, body = self._call("DELETE", path)
        if not (200 <= status < 300 or status == 404):
            raise self._error_for(status, headers, body)

    def get_connection(
        self, organisation_id: str, connection_id: str, *, deadline: float | None = None
    ) -> ConnectionResponse | None:
        """GetConnection; None when Versori holds no such connection."""
        conn = quote(connection_id, safe="")
        path = f"/o/{self._v2_org(organisation_id)}/connections/{conn}"
        status, headers, body = self._call("GET", path, deadline=deadline)
        if status == 404:
            return None
        return self._answer(status, headers, body, ConnectionResponse, "a connection")

    def update_connection(
        self,
        organisation_id: str,
        connection_id: str,
        *,
        code: str,
        state: str,
        name: str,
        base_url: str,
        redirect_url: str | None = None,
        deadline: float | None = None,
    ) -> ConnectionResponse:
        """UpdateConnection: the same connection given the new credential the provider's code
        makes (a broken connection reconnected in place, never a second one). One attempt; the
        code and state are never in an error's message. A lost answer is settled by reading the
        connection (`get_connection`): its credential valid again means it landed."""
        credential = oauth2_code_credential(organisation_id, name, code, state, redirect_url)
        payload = {"name": name, "baseUrl": base_url, "credentials": [credential]}
        conn = quote(connection_id, safe="")
        path = f"/o/{self._v2_org(organisation_id)}/connections/{conn}"
        status, headers, body = self._call("PUT", path, payload, deadline=deadline)
        return self._answer(status, headers, body, ConnectionResponse, "a connection")

    def _v2_org(self, organisation_id: str) -> str:
        if self.api != constants.PLATFORM_V2:
            raise InputError("end users, activations and UpdateConnection are Platform API v2's")
        return quote(organisation_id, safe="")

    def _call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        deadline: float | None = None,
        max_bytes: int = _MAX_BODY_BYTES,
    ) -> tuple[int, httpx.Headers, bytes]:
        budget = self._budget(deadline)
        return self._send(
            method, path, time.monotonic() + budget, budget, json=payload, max_bytes=max_bytes
        )

    def _read_list(self, path: str, max_bytes: int = _MAX_BODY_BYTES) -> list[ActivationResponse]:
        status, headers, body = self._call("GET", path, max_bytes=max_bytes)
        if not 200 <= status < 300:
            raise self._error_for(status, headers, body)
        try:
            return _ACTIVATIONS.validate_json(body or b"null") or []
        except ValidationError as err:
            raise APIError(
                status, "invalid_response", "Versori answered 2xx without a list"
            ) from err

    def _answer(
        self, status: int, headers: httpx.Headers, body: bytes, model: type[_ModelT], what: str
    ) -> _ModelT:
        if not 200 <= status < 300:
            raise self._error_for(status, headers, body)
        try:
            return model.model_validate_json(body)
        except ValidationError as err:
            raise APIError(
                status, "invalid_response", f"Versori answered 2xx without {what}"
            ) from err

    def _pages(
        self,
        path: str,
        params: dict[str, str],
        model: type[_PageT],
        ends_at: float | None,
        budget: float,
        max_pages: int = MAX_PAGES,
    ) -> Iterator[_PageT]:
        """Each page of a Versori list, following `next` for at most `max_pages` pages; the
        whole list within `ends_at` (a monotonic time), or each page within `budget` seconds
        when `ends_at` is None (a whole organisation's list)."""
        after = ""
        seen: set[str] = set()
        for _ in range(max_pages):
            query = {**params, "first": str(PAGE_SIZE)}
            if after:
                query["after"] = after
            deadline = time.monotonic() + budget if ends_at is None else ends_at
            status, headers, body = self._get(path, query, deadline, budget)
            if not 200 <= status < 300:
                raise self._error_for(status, headers, body)
            try:
                page = model.model_validate_json(body)
            except ValidationError as err:
                raise APIError(
                    status, "invalid_response", "Versori answered 2xx without a valid page"
                ) from err
            yield page
            after = page.next or ""
            if not after:
                return
            if after in seen:
                raise APIError(status, "invalid_response", "Versori's pages go round in a loop")
            seen.add(after)
        raise APIError(200, "invalid_response", f"Versori's list goes on past {max_pages} pages")

    def _budget(self, deadline: float | None) -> float:
        """The seconds a call may take: `deadline` if given and shorter than the client's."""
        if deadline is None:
            return self._call_deadline
        if not (isinstance(deadline, int | float) and 0 < deadline < math.inf):
            raise InputError(f"deadline must be a positive number of seconds, not {deadline!r}")
        return min(float(deadline), self._call_deadline)

    def _post(
        self, path: str, payload: dict[str, Any], budget: float | None = None
    ) -> tuple[int, httpx.Headers, bytes]:
        budget = self._call_deadline if budget is None else budget
        return self._send("POST", path, time.monotonic() + budget, budget, json=payload)

    def _get(
        self, path: str, params: dict[str, str], deadline: float, budget: float
    ) -> tuple[int, httpx.Headers, bytes]:
        return self._send("GET", path, deadline, budget, params=params)

    def _send(
        self,
        method: str,
        path: str,
        deadline: float,
        budget: float,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        max_bytes: int = _MAX_BODY_BYTES,
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request within one of the `max_connections` slots; waiting for a slot counts
        against `deadline` (a monotonic time), as `budget` (its seconds) says in the error."""
        self.calls = next(self._sent) + 1
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise APITimeoutError(
                f"no free connection to Versori at {self.host} within {budget:g} s"
            )
        try:
            return self._request_within(method, path, deadline, budget, json, params, max_bytes)
        finally:
            self._slots.release()

    def _request_within(
        self,
        method: str,
        path: str,
        deadline: float,
        budget: float,
        payload: dict[str, Any] | None,
        params: dict[str, str] | None,
        max_bytes: int = _MAX_BODY_BYTES,
    ) -> tuple[int, httpx.Headers, bytes]:
        request = httpx.Request(
            method,
            self._url(path, params),
            headers=self._headers,
            json=payload,
            extensions={"timeout": self._timeout(deadline)},
        )
        try:
            # Straight to this thread's transport: what httpx.Client adds on the way (merging
            # the base URL and headers, cookies, auth and redirect hooks) cost a third of a
            # call's CPU, none of which a call to Versori uses (bench/run.py under cProfile).
            response = self._transport.handle_request(request)
            try:
                body = bytearray()
                try:
                    for chunk in response.iter_bytes():
                        body += chunk
                        if time.monotonic() > deadline:
                            raise APITimeoutError(
                                f"Versori at {self.host} did not finish answering within "
                                f"{budget:g} s"
                            )
                        if len(body) > max_bytes:
                            raise APIError(
                                response.status_code, "invalid_response", "response body too large"
                            )
                except httpx.DecodingError:
                    # A body that fails its Content-Encoding is no body: keep the status, so a
                    # 5xx stays a ServerError and a 2xx becomes invalid_response.
                    body = bytearray()
                return response.status_code, response.headers, bytes(body)
            finally:
                response.close()
        except httpx.TimeoutException as err:
            raise APITimeoutError(
                f"Versori at {self.shown_url} ({self.base_url_source}) timed out "
                f"({type(err).__name__})"
            ) from err
        except httpx.TransportError as err:
            raise APIConnectionError(
                f"could not reach Versori at {self.shown_url} ({self.base_url_source}): "
                f"{type(err).__name__}: {err}"
            ) from err

    def _url(self, path: str, params: dict[str, str] | None) -> httpx.URL:
        if params is not None:
            return httpx.URL(self.base_url + path, params=params)
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < _URLS_KEPT:
                self._urls[path] = url
        return url

    def _timeout(self, deadline: float) -> dict[str, float]:
        """Each socket operation's timeout, as httpx.Timeout.as_dict() gives them."""
        left = max(0.001, deadline - time.monotonic())
        write = min(self._read_timeout, left)
        return {
            "connect": min(self._connect_timeout, left),
            "read": write,
            "write": write,
            "pool": left,
        }

    @staticmethod
    def _error_for(status: int, headers: httpx.Headers, body: bytes) -> APIError:
        try:
            parsed = ErrorBody.model_validate_json(body)
            code, message, details = parsed.code, parsed.message, parsed.details
            fields = [FieldError(f.field, f.message) for f in parsed.fields]
        except ValidationError:
            code, message, details, fields = f"http_{status}", _reason(status), "", []
        cls = error_class_for(status)
        if cls is RateLimitedError:
            return RateLimitedError(
                status,
                code,
                message,
                fields,
                details,
                retry_after=parse_retry_after(headers.get("retry-after")),
            )
        return cls(status, code, message, fields, details)


def _same_id(a: str, b: str) -> bool:
    """Versori's ids are ULIDs, which compare in any case."""
    return a.upper() == b.upper()


def _reason(status: int) -> str:
    return httpx.codes.get_reason_phrase(status) or "error without a Versori error body"


def _request_headers(api_key: str) -> httpx.Headers:
    """Every request's headers: httpx.Client's defaults, with the key, JSON and our name."""
    return httpx.Headers(
        {
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
            "User-Agent": f"versori-onboarding/{__version__}",
            "Authorization": f"Bearer {api_key}",
        }
    )


def environment_proxy(url: str) -> str | None:
    """The proxy httpx.Client would send a request for `url` through: HTTPS_PROXY or
    HTTP_PROXY (by the URL's scheme), else ALL_PROXY, as urllib reads them, unless NO_PROXY
    names its host. The client sends straight to a transport, which reads no environment."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _transport_factory(
    base_url: str, transport: httpx.BaseTransport | None
) -> Callable[[], httpx.BaseTransport]:
    """Makes each calling thread's connection pool (a given `transport` is shared instead),
    through the environment's proxy for `base_url` if it names one."""
    if transport is not None:
        return lambda: transport
    # One TLS context for every thread's connection pool, for http too: httpx builds one
    # per pool otherwise (the CA bundle loaded each time, ~30 ms of CPU here), and 16
    # threads doing that at once delayed a batch's first calls by a quarter of a second.
    tls = httpx.create_ssl_context()
    proxy = environment_proxy(base_url)

    def new_transport() -> httpx.BaseTransport:
        return httpx.HTTPTransport(
            verify=tls,
            proxy=proxy,
            limits=httpx.Limits(
                max_connections=1,
                max_keepalive_connections=1,
                keepalive_expiry=constants.KEEPALIVE_EXPIRY_SECONDS,
            ),
        )

    # A connection pool per calling thread, not one shared by all: httpcore guards a pool
    # with one lock, taken on every request and response close, and with 16 threads and
    # the ledger's and Prefect's work competing for the GIL, tenant threads spent 43% of
    # their time waiting for it (bench/run.py under py-spy --idle). A semaphore keeps the
    # number of calls in flight at `max_connections`, as the shared pool did.
    return new_transport
