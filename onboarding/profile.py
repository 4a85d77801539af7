"""Connector profiles: what one Versori OAuth2 connector needs, templated over tenant fields."""

from __future__ import annotations

import os
import re
import stat
import string
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml.composer import Composer

from onboarding import constants
from onboarding.errors import InputError, Problem
from onboarding.models import (
    Api,
    CredentialRef,
    InitialiseRequest,
    Ulid,
    check_absolute_url,
    parse_additional_params,
)
from onboarding.net import is_loopback

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
            redirect_url=self.redirect_url,
        )


class _Sample(dict[str, str]):
    """Stands in for any tenant when a template is checked on its own."""

    def __missing__(self, key: str) -> str:
        return "sample"


# Bounds on any YAML this package reads (profiles, YAML rosters): no aliases at all (an alias
# bomb expands a few hundred bytes into millions of values), at most MAX_YAML_DEPTH levels of
# nesting (deeper would exhaust the stack) and `max_nodes` values (each costs memory).
MAX_YAML_DEPTH = 32
PROFILE_MAX_BYTES = 1024 * 1024
PROFILE_MAX_NODES = 10_000
PROFILE_SUFFIXES = (".yaml", ".yml")

# libyaml's scanner and parser where installed (several times faster), with this module's own
# composer on top, which is where aliases, depth and size are refused.
_ParserBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _BoundedLoader(_ParserBase):  # type: ignore[misc]
    def __init__(self, stream: str, max_nodes: int) -> None:
        super().__init__(stream)
        Composer.__init__(self)
        self._depth = 0
        self._nodes = 0
        self._max_nodes = max_nodes
        self.at: Any = None

    def get_single_node(self) -> Any:
        return Composer.get_single_node(self)

    def compose_document(self) -> Any:
        return Composer.compose_document(self)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(line, "uses a YAML alias (*name), which is not accepted; write it out")
        self._nodes += 1
        if self._nodes > self._max_nodes:
            raise _Refused(line, f"has more than {self._max_nodes:,} values")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(line, f"is nested more than {MAX_YAML_DEPTH} levels deep")
        try:
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def compose_scalar_node(self, anchor: Any) -> Any:
        return Composer.compose_scalar_node(self, anchor)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        self.at = node  # where a constructor's ValueError (a 5,000-digit int) came from
        return super().construct_object(node, deep)

    def compose_sequence_node(self, anchor: Any) -> Any:
        return Composer.compose_sequence_node(self, anchor)

    def compose_mapping_node(self, anchor: Any) -> Any:
        return Composer.compose_mapping_node(self, anchor)


_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_KEPT = re.compile(
    r"^['\"](<[a-z ]+>|\\[tnr0]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|[ -/:-@\[-`{-~])['\"]$"
)


def without_quotes(message: str) -> str:
    """A parser's message without the pieces of input it quotes (a tag, an anchor, a scalar),
    keeping token names ('<scalar>') and single punctuation or control characters."""
    return _QUOTED.sub(lambda m: m.group(0) if _KEPT.match(m.group(0)) else "…", message)


def _yaml_reason(err: BaseException) -> tuple[int | None, str]:
    """(line, what is wrong) for a YAML error, never the snippet of the file PyYAML's own
    message carries."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(err, yaml.MarkedYAMLError):
        parts = [p for p in (err.context, err.problem) if p]
        reason = without_quotes(", ".join(parts)) if parts else "cannot parse it"
    elif isinstance(err, RecursionError):
        reason = "nested too deeply"
    elif isinstance(err, ValueError) and "digits" in str(err):
        reason = "a number too long"
    else:
        reason = "a value of the wrong form"
    return line, f"not valid YAML: {reason}"


def resolve_under(path: Path, root: str | Path | None, source: str, what: str) -> Path:
    """The path itself, or, with a root, the path with symlinks resolved, refused unless it
    lies in root. Checked before the file is looked at, so the answer is the same whether or
    not it exists."""
    if root is None:
        return path
    real = Path(path).resolve()
    if not real.is_relative_to(Path(root).resolve()):
        raise InputError(
            f"{source}: outside the folder runs may read ({root}, ONBOARD_FILES_ROOT); "
            f"put the {what} there"
        )
    return real


def read_bounded_text(path: Path, source: str, max_bytes: int, what: str = "file") -> str:
    """A regular file's text (UTF-8, BOM dropped), refused past max_bytes."""
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{source}: not a regular file; give the {what} file")
            data = f.read(max_bytes + 1)
    except FileNotFoundError as err:
        raise InputError(f"{source}: file not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{source}: is a folder; give the {what} file") from err
    except OSError as err:
        raise InputError(f"{source}: cannot read it ({err.strerror})") from err
    if len(data) > max_bytes:
        raise InputError(f"{source}: larger than {max_bytes} bytes; this is not a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            [Problem(source, None, "", f"not UTF-8 text (byte {err.start}); save it as UTF-8")]
        ) from err


def load_yaml_with_lines(
    path: Path,
    source: str | None = None,
    *,
    max_bytes: int = PROFILE_MAX_BYTES,
    max_nodes: int = PROFILE_MAX_NODES,
    what: str = "file",
) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    """Parse YAML and map each key path to its 1-based line, so errors can say where.

    Bounded (no aliases, MAX_YAML_DEPTH, max_bytes, max_nodes), and every failure is an
    InputError naming `source` (default: the path) and the line, never quoting the file."""
    source = str(path) if source is None else source
    text = read_bounded_text(path, source, max_bytes, what)
    loader = _BoundedLoader(text, max_nodes)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refused as err:
        raise InputError([Problem(source, err.line, "", err.message)]) from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as err:
        line, reason = _yaml_reason(err)
        if line is None and loader.at is not None:
            line = loader.at.start_mark.line + 1
        raise InputError([Problem(source, line, "", reason)]) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: Any, at: tuple[str | int, ...]) -> None:
        # A mapping value keeps its key's line: "additional_params: ..." names the key's line,
        # not the line its block value starts on.
        lines.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue
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
        value = e.get("input")
        if isinstance(value, str) and value and repr(value) in message:
            message = message.replace(repr(value), "the value")  # never quote the file
        out.append(Problem(source, line, field, message))
    return out


def load_profile(path: str | Path, *, root: str | Path | None = None) -> ConnectorProfile:
    """Load and check a profile. With `root` (runs started through a deployment), the file and
    its email_templates folder must lie under it."""
    source = str(path)
    path = resolve_under(Path(path), root, source, "profile")
    if path.suffix.lower() not in PROFILE_SUFFIXES:
        raise InputError([Problem(source, None, "", "name the profile .yaml (a YAML file)")])
    data, lines = load_yaml_with_lines(path, source, what="profile")
    if not isinstance(data, dict):
        raise InputError(
            [Problem(source, 1, "", "a profile is a YAML mapping of keys (name, organisation_id…)")]
        )
    try:
        profile = ConnectorProfile.model_validate(data)
    except ValidationError as err:
        raise InputError(
            problems_from_validation(err, source, lines),
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
    return profile


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""
