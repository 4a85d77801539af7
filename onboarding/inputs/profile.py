"""Connector profiles: what one Versori OAuth2 connector needs, templated over tenant fields."""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from onboarding import constants
from onboarding.errors import InputError, Problem
from onboarding.files import load_yaml_with_lines, problems_from_validation, resolve_under
from onboarding.net import is_loopback
from onboarding.settings.brand import BrandValues
from onboarding.versori.wire import (
    Api,
    CredentialRef,
    InitialiseRequest,
    Ulid,
    check_absolute_url,
    parse_additional_params,
)

_FORMATTER = string.Formatter()
DEFAULT_CONNECT_LINK_DAYS = 30.0


def template_fields(template: str) -> list[str]:
    """The {field} names a template uses; refuses format specs and attribute/index access."""
    names: list[str] = []
    for _literal, name, spec, conversion in _FORMATTER.parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                "is not a plain {field} placeholder (use letters, digits and _ only)"
            )
        names.append(name)
    return names


def fill(template: str, values: dict[str, str]) -> str:
    """Fill a template, URL-encoding each value, so a value can never add a parameter or path."""
    return template.format_map(_Quoted(values))


class _Quoted(dict[str, str]):
    def __init__(self, values: dict[str, str]) -> None:
        super().__init__()
        self._values = values

    def __missing__(self, key: str) -> str:
        return quote(self._values[key], safe="")


class ConnectorProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    # What people read (emails, `onboard status`); default: `readable(name)`.
    display_name: str = Field("", max_length=200)
    # What access is asked, in plain words for the admin ("read your tickets and users");
    # unset, emails and the link page list `scopes`.
    access_summary: str = Field("", max_length=500)
    # This connector's branding over ONBOARD_BRAND_* (onboarding/settings/brand.py): the same
    # keys, each optional.
    brand: BrandValues | None = None
    # Which API the initialise call goes to. Declared before the ids: their checks read it.
    api: Api = "connect-v1"
    organisation_id: Ulid
    # connect-v1 names a connector, platform-v2 a system; exactly one of them (see target_id).
    connector_id: Ulid | None = Field(None, validate_default=True)
    system_id: Ulid | None = Field(None, validate_default=True)
    credential_id: Ulid
    credential_organisation_id: Ulid | None = None
    client_id: str = Field(min_length=1)
    authorize_url: str
    scopes: list[str] = Field(default_factory=list)
    prompt: str | None = None
    disable_offline_access: bool = False
    # A URL-encoded query string template, or a mapping of key to value template.
    additional_params: str | dict[str, str] = ""
    link_ttl_hours: float = Field(constants.DEFAULT_LINK_TTL_HOURS, gt=0)
    # Pacing: calls per second across every process running this profile (None: no limit),
    # and a cap on the tenants in flight in one process, whatever a run asks for.
    rate_limit_per_second: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    # A folder of email templates (subject.txt, body.txt, body.html) overriding the defaults;
    # relative to the profile file.
    email_templates: str | None = None
    # Pins on the authorize URL Versori returns: its redirect_uri must be exactly this, or
    # its host this one. Unset: any https redirect_uri is accepted.
    redirect_uri: str | None = None
    redirect_host: str | None = None
    # platform-v2 only: sent as the request's redirectUrl, and then the returned URL's
    # redirect_uri must be exactly this (as with redirect_uri).
    redirect_url: str | None = None
    # onboard connect-server (connect_service/): the durable link's lifetime; and, for
    # platform-v2 profiles whose redirect_url is the service's /callback, what CreateConnection
    # is called with (the connection's template, its name: a {field} template over the tenant,
    # default its name) and where a connected admin is sent (a fixed URL, never the request's).
    connect_link_days: float = Field(DEFAULT_CONNECT_LINK_DAYS, gt=0, le=366)
    connection_template_id: Ulid | None = None
    connection_name: str = Field("{name}", min_length=1, max_length=200)
    success_url: str | None = None
    # platform-v2 only: the environment a tenant is activated on (ActivateUser) once it is
    # connected for every profile of this environment in a run (a campaign: each system).
    environment_id: Ulid | None = None
    # Where the profile was read from (load_profile): the file as given and each key's line,
    # for the checks made after it loads (check_finishable). A profile built in code has none.
    _source: str | None = PrivateAttr(None)
    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)

    @field_validator("connection_name")
    @classmethod
    def _connection_name_template(cls, value: str) -> str:
        template_fields(value)
        return value

    @field_validator("success_url")
    @classmethod
    def _success_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_absolute_url(value)
        parts = urlsplit(value)
        if parts.scheme != "https" and not is_loopback(parts.hostname):
            raise ValueError("must be an https URL (http only to a loopback host)")
        return value

    def connection_name_for(self, values: dict[str, str]) -> str:
        """The name CreateConnection gives the tenant's connection (not URL-encoded: a name)."""
        return self.connection_name.format_map(values)

    @field_validator("connector_id", "system_id")
    @classmethod
    def _id_for_the_api(cls, value: str | None, info: ValidationInfo) -> str | None:
        api = info.data.get("api")
        if api is None:  # api itself is wrong, and reported as such
            return value
        wanted = "system_id" if api == constants.PLATFORM_V2 else "connector_id"
        if info.field_name == wanted and value is None:
            raise ValueError(f"required for api: {api}")
        if info.field_name != wanted and value is not None:
            if api == constants.PLATFORM_V2:
                raise ValueError(
                    "a platform-v2 profile names system_id, not connector_id; "
                    "remove connector_id (or set api: connect-v1)"
                )
            raise ValueError(
                "system_id is for api: platform-v2; set api: platform-v2 and remove "
                "connector_id, or keep connector_id and remove system_id"
            )
        return value

    @field_validator("environment_id")
    @classmethod
    def _environment_for_v2(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("api") == constants.CONNECT_V1:
            raise ValueError(
                "environment_id is for api: platform-v2 (the Connect API v1 has no "
                "activations); set api: platform-v2, or remove environment_id"
            )
        return value

    @field_validator("redirect_uri", "redirect_url")
    @classmethod
    def _redirect_uri_pin(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.field_name == "redirect_url" and info.data.get("api") == constants.CONNECT_V1:
            raise ValueError(
                "redirect_url is sent only by api: platform-v2; set api: platform-v2 (with "
                "system_id), or use redirect_uri to pin the redirect Versori returns"
            )
        check_absolute_url(value)
        parts = urlsplit(value)
        if parts.scheme != "https" and not is_loopback(parts.hostname):
            raise ValueError("must be an https URL (http only to a loopback host)")
        return value

    @field_validator("redirect_host")
    @classmethod
    def _redirect_host_pin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower().rstrip(".")
        try:
            parsed = urlsplit(f"https://{host}/")
            port = parsed.port
        except ValueError:
            parsed, port = None, None
        if not host or parsed is None or port is not None or parsed.hostname != host.strip("[]"):
            raise ValueError(
                "must be a host name alone (e.g. platform.versori.com): no scheme, port or path"
            )
        return host.strip("[]")

    @model_validator(mode="after")
    def _activation_names_its_template(self) -> ConnectorProfile:
        if self.environment_id is not None and self.connection_template_id is None:
            raise ValueError(
                "environment_id needs connection_template_id: an activation names each "
                "system's connection by its template; set connection_template_id"
            )
        return self

    @model_validator(mode="after")
    def _redirect_pins_agree(self) -> ConnectorProfile:
        if (
            self.redirect_url is not None
            and self.redirect_uri is not None
            and self.redirect_url != self.redirect_uri
        ):
            raise ValueError(
                "redirect_uri differs from redirect_url, and the returned redirect_uri must "
                "equal redirect_url; remove redirect_uri"
            )
        pinned, key = (
            (self.redirect_url, "redirect_url")
            if self.redirect_url is not None
            else (self.redirect_uri, "redirect_uri")
        )
        if pinned is not None and self.redirect_host is not None:
            host = (urlsplit(pinned).hostname or "").rstrip(".")
            if host != self.redirect_host:
                raise ValueError(f"{key}'s host is not redirect_host; set one or make them agree")
        return self

    @field_validator("authorize_url")
    @classmethod
    def _authorize_url_template(cls, value: str) -> str:
        template_fields(value)
        sample = fill(value, _Sample())
        check_absolute_url(sample)
        return value

    @field_validator("additional_params")
    @classmethod
    def _additional_params_template(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(value, dict):
            for template in value.values():
                template_fields(template)
            parse_additional_params(urlencode(value))
        else:
            template_fields(value)
            parse_additional_params(fill(value, _Sample()))
        return value

    @field_validator("display_name")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if len(value.strip().splitlines()) > 1:
            raise ValueError("must be one line: email subjects show it")
        return value.strip()

    @field_validator("access_summary")
    @classmethod
    def _plain_words(cls, value: str) -> str:
        return " ".join(value.split())

    @property
    def access(self) -> list[str]:
        """What access is asked, as shown to the admin: the summary, else the scopes."""
        return [self.access_summary] if self.access_summary else list(self.scopes)

    @model_validator(mode="after")
    def _defaults(self) -> ConnectorProfile:
        if self.credential_organisation_id is None:
            object.__setattr__(self, "credential_organisation_id", self.organisation_id)
        if not self.display_name:
            object.__setattr__(self, "display_name", readable(self.name))
        return self

    def check_finishable(
        self, connect_base_url: str | None, *, through_service: bool | None = None
    ) -> None:
        """Refuse (InputError naming the file, line and key) a profile whose links could never
        finish: see `finish_problems`."""
        problems = self.finish_problems(connect_base_url, through_service=through_service)
        if problems:
            raise InputError(problems, hint=FINISH_HINT)

    def finish_problems(
        self, connect_base_url: str | None, *, through_service: bool | None = None
    ) -> list[Problem]:
        """Why this profile's links, sent through the connect service, could never finish; []
        when they can. They go through the service when ONBOARD_CONNECT_BASE_URL
        (`connect_base_url`) is set (`through_service` defaults to that); unset, emails carry
        the raw authorize URL, which the service has no part in, and nothing is refused.

        Only a platform-v2 profile is the service's to finish (a Connect API v1 profile
        redirects to Versori's own redirect_uri): its callback calls CreateConnection, which
        needs `connection_template_id`; and the provider must send the admin back to the
        service's `<connect_base_url>/callback`, so a `redirect_url` set to anything else never
        reaches it (an unset one is left to Versori, as today)."""
        if through_service is None:
            through_service = connect_base_url is not None
        if not through_service or self.api != constants.PLATFORM_V2:
            return []
        problems = []
        if self.connection_template_id is None:
            problems.append(
                self._problem(
                    "connection_template_id",
                    ("api",),
                    "not set, and this api: platform-v2 profile's links go through the "
                    "connect service (ONBOARD_CONNECT_BASE_URL is set), whose callback creates "
                    "each connection from that template (CreateConnection): every admin who "
                    "presses Allow would be told to try again later; set "
                    "connection_template_id to the id of the system's connection template",
                )
            )
        if connect_base_url is not None and self.redirect_url is not None:
            callback = f"{connect_base_url.rstrip('/')}/callback"
            if not same_endpoint(self.redirect_url, callback):
                problems.append(
                    self._problem(
                        "redirect_url",
                        ("redirect_url",),
                        f"is not the connect service's callback ({callback}, from "
                        "ONBOARD_CONNECT_BASE_URL): the provider would send each admin there, "
                        "and the service would never see the code to finish the connection; "
                        f"set redirect_url: {callback}",
                    )
                )
        return problems

    def _problem(self, key: str, at: tuple[str | int, ...], message: str) -> Problem:
        source = self._source if self._source is not None else f"profile {self.name}"
        return Problem(source, self._lines.get(at), key, message)

    @property
    def fields_used(self) -> list[str]:
        """Tenant fields the templates need, in first-use order."""
        names = template_fields(self.authorize_url)
        if isinstance(self.additional_params, dict):
            for template in self.additional_params.values():
                names += template_fields(template)
        else:
            names += template_fields(self.additional_params)
        if self.connection_template_id is not None:  # only then is a connection named
            names += template_fields(self.connection_name)
        return list(dict.fromkeys(names))

    @property
    def target_id(self) -> str:
        """The connector's id (connect-v1) or the system's id (platform-v2): what the initialise
        path names, what the ledger keys this profile's records by (its connector_id column)
        and what labels and Message-IDs carry."""
        target = self.system_id if self.api == constants.PLATFORM_V2 else self.connector_id
        if target is None:  # only a model built without validation gets here
            raise ValueError(f"the profile {self.name!r} names no connector_id or system_id")
        return target

    @property
    def slug(self) -> str:
        """The name as Prefect artifact keys and tags want it: lowercase letters, digits, dashes."""
        out = "".join(c if c.isalnum() else "-" for c in self.name.lower())
        return "-".join(p for p in out.split("-") if p) or "profile"

    def render(self, values: dict[str, str]) -> InitialiseRequest:
        """The initialise request body for one tenant (values: the tenant's template fields)."""
        if isinstance(self.additional_params, dict):
            additional = urlencode(
                {k: v.format_map(values) for k, v in self.additional_params.items()},
                quote_via=quote,
            )
        else:
            additional = fill(self.additional_params, values)
        authorize_url = fill(self.authorize_url, values)
        base = _request_base(self)
        if base is None:  # a field every tenant shares is refused: say so as validation does
            return self._request(authorize_url, additional)
        return base.for_tenant(authorize_url, additional)

    def _request(self, authorize_url: str, additional_params: str) -> InitialiseRequest:
        return InitialiseRequest(
            credential=CredentialRef(
                id=self.credential_id,
                organisation_id=self.credential_organisation_id or self.organisation_id,
            ),
            authorize_url=authorize_url,
            client_id=self.client_id,
            scopes=self.scopes,
            disable_offline_access=self.disable_offline_access,
            prompt=self.prompt,
            additional_params=additional_params,
            redirect_url=self.redirect_url,
        )


# Each profile's request with the fields every tenant shares validated once, by the profile's
# identity (a profile is frozen); None when one of those fields is refused. Bounded: a process
# renders for a handful of profiles.
_REQUEST_BASES: dict[int, tuple[ConnectorProfile, InitialiseRequest | None]] = {}
_PLACEHOLDER_URL = "https://tenant.invalid/"


def _request_base(profile: ConnectorProfile) -> InitialiseRequest | None:
    kept = _REQUEST_BASES.get(id(profile))
    if kept is not None and kept[0] is profile:
        return kept[1]
    try:
        base: InitialiseRequest | None = profile._request(_PLACEHOLDER_URL, "")
    except ValidationError:
        base = None
    if len(_REQUEST_BASES) >= 64:
        _REQUEST_BASES.clear()
    _REQUEST_BASES[id(profile)] = (profile, base)
    return base


FINISH_HINT = (
    "With ONBOARD_CONNECT_BASE_URL set, emails carry links to onboard connect-server, which "
    "finishes Platform API v2 connections itself (see docs/connect-service.md); unset, they "
    "carry the raw authorize URL."
)


def same_endpoint(url: str, other: str) -> bool:
    """Whether two absolute URLs reach the same endpoint: scheme, host (any case) and port
    (the scheme's default when unnamed) and path alike; a query is not compared."""

    def endpoint(value: str) -> tuple[str, str, int | None, str] | None:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or {"http": 80, "https": 443}.get(scheme)
        except ValueError:
            return None
        return scheme, (parts.hostname or "").rstrip("."), port, parts.path or "/"

    mine = endpoint(url)
    return mine is not None and mine == endpoint(other)


def readable(name: str) -> str:
    """A profile name as people read it: zendesk-demo is Zendesk Demo; each word's first letter
    made upper case, the rest kept (HubSpot stays HubSpot)."""
    words = name.replace("_", " ").replace("-", " ").split()
    return " ".join(word[:1].upper() + word[1:] for word in words) or name


class _Sample(dict[str, str]):
    """Stands in for any tenant when a template is checked on its own."""

    def __missing__(self, key: str) -> str:
        return "sample"


PROFILE_MAX_BYTES = 1024 * 1024
PROFILE_MAX_NODES = 10_000
PROFILE_SUFFIXES = (".yaml", ".yml")


# Profiles read in this process, by file and its size and time: a run names its profiles in
# several places (its inputs' check, its run name, an interrupted run's report), one read each.
_READ: dict[tuple[str, str, int, int], ConnectorProfile] = {}


def load_profile(path: str | Path, *, root: str | Path | None = None) -> ConnectorProfile:
    """Load and check a profile (once per process while its file is unchanged). With `root`
    (runs started through a deployment), the file and its email_templates folder must lie
    under it."""
    source = str(path)
    path = resolve_under(Path(path), root, source, "profile")
    try:
        stat = path.stat()
    except OSError:
        return _read_profile(path, source, root)
    key = (str(path), str(root), stat.st_mtime_ns, stat.st_size)
    if key not in _READ:
        _READ[key] = _read_profile(path, source, root)
    return _READ[key]


def _read_profile(path: Path, source: str, root: str | Path | None) -> ConnectorProfile:
    if path.suffix.lower() not in PROFILE_SUFFIXES:
        raise InputError([Problem(source, None, "", "name the profile .yaml (a YAML file)")])
    data, lines = load_yaml_with_lines(
        path, source, max_bytes=PROFILE_MAX_BYTES, max_nodes=PROFILE_MAX_NODES, what="profile"
    )
    if not isinstance(data, dict):
        raise InputError(
            [Problem(source, 1, "", "a profile is a YAML mapping of keys (name, organisation_id…)")]
        )
    try:
        profile = ConnectorProfile.model_validate(data)
    except ValidationError as err:
        raise InputError(
            problems_from_validation(err, source, lines, ConnectorProfile),
            hint=(
                "See examples/profile.yaml (examples/profile-v2.yaml for api: platform-v2) "
                "for a complete profile."
            ),
        ) from err
    if profile.email_templates is not None:
        line = lines.get(("email_templates",))
        folder = (path.parent / profile.email_templates).resolve()
        resolve_under(folder, root, f"{source}:{line}: email_templates", "templates folder")
        if not folder.is_dir():
            raise InputError([Problem(source, line, "email_templates", f"no folder {folder}")])
        profile = profile.model_copy(update={"email_templates": str(folder)})
    profile._source = source
    profile._lines = lines
    return profile


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""
