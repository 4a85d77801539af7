"""Versori's wire models for InitialiseOAuth2Connection: camelCase on the wire, snake_case here."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel
from ulid import ULID

from onboarding.constants import RESERVED_QUERY_KEYS

# Which Versori API a profile calls: the Connect API v1 (connectors) or the Platform API v2
# (systems). Spelled as in onboarding.constants (CONNECT_V1, PLATFORM_V2).
Api = Literal["connect-v1", "platform-v2"]


@functools.lru_cache(maxsize=256)
def _check_ulid(value: str) -> str:
    """The ULID `value`, canonical. Kept (a pure function): a profile's ids are checked in
    every tenant's request, 20 us each time (a tenth of a batch's roster check)."""
    try:
        return str(ULID.from_str(value.strip()))
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{value!r} is not a ULID (26 characters of Crockford base32, e.g. "
            "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0)"
        ) from err


Ulid = Annotated[str, AfterValidator(_check_ulid)]


def parse_additional_params(query: str) -> list[tuple[str, str]]:
    """Parse a URL-encoded query string and refuse keys the initialise call sets itself."""
    if not query:
        return []
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as err:
        raise ValueError(f"not a URL-encoded query string ({err})") from err
    clashes = sorted({k for k, _ in pairs} & RESERVED_QUERY_KEYS)
    if clashes:
        reserved = ", ".join(sorted(RESERVED_QUERY_KEYS))
        raise ValueError(
            f"sets {', '.join(clashes)}, which Versori sets itself; remove it "
            f"(reserved keys: {reserved})"
        )
    return pairs


def absolute_url_parts(value: str) -> SplitResult:
    """`value` split, when it is an absolute http(s) URL with a host and no fragment."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL with a host")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return parts


def check_absolute_url(value: str) -> str:
    absolute_url_parts(value)
    return value


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class CredentialRef(_Wire):
    id: Ulid
    organisation_id: Ulid


class InitialiseRequest(_Wire):
    credential: CredentialRef
    authorize_url: Annotated[str, AfterValidator(check_absolute_url)]
    client_id: str = Field(min_length=1)
    scopes: list[str] = Field(default_factory=list)
    disable_offline_access: bool = False
    prompt: str | None = None
    additional_params: str = ""
    # Platform API v2 only (sent as redirectUrl): where the provider sends the user back.
    # Left out of the body when None, so a Connect API v1 body is unchanged.
    redirect_url: Annotated[str, AfterValidator(check_absolute_url)] | None = None

    # The two fields a tenant fills, as validation parsed them (for_tenant), so the link check
    # need not parse them again; None until asked for (authorize_parts, additional_pairs).
    _authorize_parts: SplitResult | None = PrivateAttr(None)
    _additional_pairs: list[tuple[str, str]] | None = PrivateAttr(None)

    @field_validator("additional_params")
    @classmethod
    def _no_reserved_keys(cls, value: str) -> str:
        parse_additional_params(value)
        return value

    def for_tenant(self, authorize_url: str, additional_params: str) -> InitialiseRequest:
        """This request with a tenant's authorize_url and additional_params, each checked by
        the rules validation applies to it; the other fields were validated with this one, and
        are the same for every tenant of a profile. A value the rules refuse is validated with
        the rest in full, so the ValidationError is the constructor's, word for word.

        A roster's every row is rendered twice (checked, then called): validating the whole
        model each time was about a fifth of a tenant's CPU outside the HTTP call (39 us of
        ~220, one thread; docs/performance.md)."""
        try:
            parts = absolute_url_parts(authorize_url)
            pairs = parse_additional_params(additional_params)
        except ValueError:
            return InitialiseRequest.model_validate(
                {
                    **self.model_dump(),
                    "authorize_url": authorize_url,
                    "additional_params": additional_params,
                }
            )
        request = self.model_copy(
            update={"authorize_url": authorize_url, "additional_params": additional_params}
        )
        request._authorize_parts, request._additional_pairs = parts, pairs
        return request

    def __eq__(self, other: object) -> bool:
        """Equal when the fields are: what was parsed and kept (the private attributes) is
        not part of a request's value."""
        if not isinstance(other, InitialiseRequest):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, as BaseModel's

    def authorize_parts(self) -> SplitResult:
        """authorize_url, split (once)."""
        if self._authorize_parts is None:
            self._authorize_parts = urlsplit(self.authorize_url)
        return self._authorize_parts

    def additional_pairs(self) -> list[tuple[str, str]]:
        """additional_params as (key, value) pairs (parsed once)."""
        if self._additional_pairs is None:
            self._additional_pairs = parse_additional_params(self.additional_params)
        return self._additional_pairs

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)


class InitialiseResponse(BaseModel):
    url: str


class ErrorFieldBody(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: list[ErrorFieldBody] = Field(default_factory=list)
    details: str = ""

    @field_validator("fields", "details", mode="before")
    @classmethod
    def _lenient(cls, value: object, info: ValidationInfo) -> object:
        # Optional members may come as null, and details as any JSON: neither may cost the
        # error its Versori code and message.
        if value is None:
            return [] if info.field_name == "fields" else ""
        if info.field_name == "details" and not isinstance(value, str):
            return json.dumps(value, separators=(",", ":"))
        return value


# CreateConnection (completing an OAuth2 connection with the provider's code): the Platform
# API v2 `POST /o/{org}/connections` and the Connect API v1
# `POST /o/{org}/connectors/{connector_id}/connections`. Built by VersoriClient.
def oauth2_code_credential(
    organisation_id: str, name: str, code: str, state: str, redirect_url: str | None
) -> dict[str, object]:
    """The `oauth2-code` credential both APIs take: the code and state the provider sent."""
    data: dict[str, object] = {"code": code, "state": state}
    if redirect_url is not None:
        data["redirectUrl"] = redirect_url
    return {
        "authSchemeConfig": {"type": "oauth2"},
        "credential": {
            "name": name,
            "organisationId": organisation_id,
            "type": "oauth2-code",
            "data": data,
        },
    }


class ConnectionResponse(BaseModel):
    """What both APIs answer a CreateConnection with, and list (only what this project reads):
    a Platform API v2 `Connection` or a Connect API v1 `ConnectionSummary`. `system_id` and
    `connection_template_id` are the v2 connection's (None from v1, or when Versori omits
    them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    id: str = Field(min_length=1)
    name: str = ""
    system_id: str | None = None
    connection_template_id: str | None = None
    base_url: str | None = None
    # v2: each credential's health (sync reads it); v1 summaries carry none.
    credentials: list[ConnectionCredential] | None = None

    def credential_health(self) -> tuple[list[str] | None, datetime | None]:
        """(errors, expires_at) over the connection's credentials: every error listed (None when
        no credential was ever validated), and the soonest expiry."""
        errors: list[str] | None = None
        expiries: list[datetime] = []
        for item in self.credentials or []:
            credential = item.credential
            if credential is None:
                continue
            if credential.errors is not None:
                errors = [*(errors or []), *credential.errors]
            if credential.expires_at is not None:
                expiries.append(credential.expires_at)
        return errors, min(expiries, default=None)


class CredentialHealth(BaseModel):
    """A v2 Credential's validation: `errors` absent = never validated (unknown), [] = valid,
    non-empty = broken; `expiresAt`, when it will be deleted."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    errors: list[str] | None = None
    expires_at: datetime | None = None


class ConnectionCredential(BaseModel):
    """One of a v2 Connection's `credentials`."""

    credential: CredentialHealth | None = None


def _none_is_empty(value: object) -> object:
    # Versori's Go server writes an empty list as null.
    return [] if value is None else value


class EndUserResponse(BaseModel):
    """A Platform API v2 `EndUser` (only what this project reads): `id` is Versori's own, the
    one ListConnections' `end_user_id` takes; `external_id` is the caller's."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    id: str = Field(min_length=1)
    external_id: str


class EnvironmentRef(BaseModel):
    id: str = ""


class ActivationResponse(BaseModel):
    """A v2 `Activation` (only what this project reads): the end user, and the connection it
    holds for each system of the environment."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    id: str = Field(min_length=1)
    user: EndUserResponse
    environment: EnvironmentRef | None = None
    environment_id: str | None = None
    connections: Annotated[list[ConnectionResponse], BeforeValidator(_none_is_empty)] = Field(
        default_factory=list
    )


class _Page(BaseModel):
    """Versori's PageInfo: `next` is the cursor of the next page, "" or absent on the last."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    next: str | None = None
    total_count: int | None = None


class EndUserPage(_Page):
    """ListEndUsers' answer."""

    users: Annotated[list[EndUserResponse], BeforeValidator(_none_is_empty)]


class ConnectionPage(_Page):
    """ListConnections' (v2) and ListConnectorConnections' (v1) answer."""

    items: Annotated[list[ConnectionResponse], BeforeValidator(_none_is_empty)] = Field(
        default_factory=list
    )
