"""Connector profiles: what one Versori OAuth2 connector needs, templated over tenant fields."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onboarding import constants
from onboarding.errors import InputError, Problem
from onboarding.links import is_loopback
from onboarding.models import (
    CredentialRef,
    InitialiseRequest,
    Ulid,
    check_absolute_url,
    parse_additional_params,
)

_FORMATTER = string.Formatter()


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
    organisation_id: Ulid
    connector_id: Ulid
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

    @field_validator("redirect_uri")
    @classmethod
    def _redirect_uri_pin(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
    def _redirect_pins_agree(self) -> ConnectorProfile:
        if self.redirect_uri is not None and self.redirect_host is not None:
            host = (urlsplit(self.redirect_uri).hostname or "").rstrip(".")
            if host != self.redirect_host:
                raise ValueError(
                    "redirect_uri's host is not redirect_host; set one or make them agree"
                )
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

    @model_validator(mode="after")
    def _default_credential_organisation(self) -> ConnectorProfile:
        if self.credential_organisation_id is None:
            object.__setattr__(self, "credential_organisation_id", self.organisation_id)
        return self

    @property
    def fields_used(self) -> list[str]:
        """Tenant fields the templates need, in first-use order."""
        names = template_fields(self.authorize_url)
        if isinstance(self.additional_params, dict):
            for template in self.additional_params.values():
                names += template_fields(template)
        else:
            names += template_fields(self.additional_params)
        return list(dict.fromkeys(names))

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
        return InitialiseRequest(
            credential=CredentialRef(
                id=self.credential_id,
                organisation_id=self.credential_organisation_id or self.organisation_id,
            ),
            authorize_url=fill(self.authorize_url, values),
            client_id=self.client_id,
            scopes=self.scopes,
            disable_offline_access=self.disable_offline_access,
            prompt=self.prompt,
            additional_params=additional,
        )


class _Sample(dict[str, str]):
    """Stands in for any tenant when a template is checked on its own."""

    def __missing__(self, key: str) -> str:
        return "sample"


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    """Parse YAML and map each key path to its 1-based line, so errors can say where."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({err})") from err
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise InputError([Problem(str(path), line, "", f"not valid YAML: {err}")]) from err
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: Any, at: tuple[str | int, ...]) -> None:
        # A mapping value keeps its key's line: "additional_params: ..." names the key's line,
        # not the line its block value starts on.
        lines.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                lines[(*at, key.value)] = key.start_mark.line + 1
                walk(value, (*at, key.value))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*at, i))

    if node is not None:
        walk(node, ())
    return data, lines


def problems_from_validation(
    err: ValidationError, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        field = ".".join(str(p) for p in loc)
        message = e["msg"].removeprefix("Value error, ")
        out.append(Problem(source, line, field, message))
    return out


def load_profile(path: str | Path) -> ConnectorProfile:
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise InputError(
            [
                Problem(
                    str(path), 1, "", "a profile is a YAML mapping of keys (name, organisation_id…)"
                )
            ]
        )
    try:
        profile = ConnectorProfile.model_validate(data)
    except ValidationError as err:
        raise InputError(
            problems_from_validation(err, str(path), lines),
            hint="See examples/profile.yaml for a complete profile.",
        ) from err
    if profile.email_templates is not None:
        folder = (path.parent / profile.email_templates).resolve()
        if not folder.is_dir():
            line = lines.get(("email_templates",))
            raise InputError([Problem(str(path), line, "email_templates", f"no folder {folder}")])
        profile = profile.model_copy(update={"email_templates": str(folder)})
    return profile


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""
