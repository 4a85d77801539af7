"""Rosters: the tenants to onboard, from CSV, JSON, JSONL or YAML, a local path or a URL.

Loading reads the file once to check every row and report every problem at once, keeping only
the set of tenant ids; iterating reads it again as a stream, so a 100k-row roster never sits in
memory as objects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onboarding.errors import InputError, Problem
from onboarding.files import resolve_under, without_quotes
from onboarding.inputs.profile import ConnectorProfile, template_fields
from onboarding.inputs.roster_download import HOSTNAME, download
from onboarding.inputs.roster_formats import csv_header, raw_records
from onboarding.settings import InputSettings

REQUIRED_COLUMNS = ("tenant_id", "name", "admin_email")
FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".yaml": "yaml",
    ".yml": "yaml",
}
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
MAX_PROBLEMS = 200


class Tenant(BaseModel):
    model_config = ConfigDict(frozen=True)

    tenant_id: str
    name: str
    admin_email: str
    fields: dict[str, str] = {}

    @property
    def values(self) -> dict[str, str]:
        """Everything a template may use: the free fields and the three named ones."""
        return {
            **self.fields,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "admin_email": self.admin_email,
        }


class TenantRow(BaseModel):
    """One tenant passed inline (an API call), checked exactly like a roster row."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(description="Your stable id for this customer")
    name: str = Field(description="The customer's display name")
    admin_email: str = Field(description="Who receives the link")
    fields: dict[str, str] = Field(
        default_factory=dict, description='Template fields, e.g. {"subdomain": "acme"}'
    )


INLINE_SOURCE = "tenants parameter"


@dataclass
class Roster:
    source: str
    path: Path
    fmt: str
    count: int
    only: frozenset[str] | None = None
    _tmp: Any = field(default=None, repr=False)
    digest: str = ""  # SHA-256 of the file that was checked
    first: int = 0  # with `stop`, a slice: the tenants at positions first..stop-1
    stop: int | None = None

    def __iter__(self) -> Iterator[Tenant]:
        position = 0
        for _line, raw in raw_records(self.path, self.fmt, self.source):
            if self.stop is not None and position >= self.stop:
                return
            values, _ = _normalise(raw)
            tenant_id = values.get("tenant_id", "")
            if self.only is not None and tenant_id not in self.only:
                continue
            if position >= self.first:
                yield _tenant(values)
            position += 1

    def __len__(self) -> int:
        return self.count


def open_roster_slice(
    location: str | Path,
    digest: str,
    first: int,
    stop: int,
    only: Iterable[str] | None = None,
    *,
    root: str | Path | None = None,
    downloads: InputSettings | None = None,
) -> Roster:
    """Tenants first..stop-1 (counting those `only` selects) of a roster that `load_roster`
    checked as a whole, without checking every row again: a batch's chunk reads its part this
    way. The file must be the one that was checked: a changed roster is refused."""
    source, path, tmp = _fetch(
        location, where=" where this worker looked", root=root, downloads=downloads
    )
    if _digest(path) != digest:
        raise InputError(
            f"{source}: the roster changed after the batch checked it; start a new run so "
            "that it is checked again"
        )
    fmt = FORMATS[Path(urlsplit(source).path).suffix.lower()]
    wanted = frozenset(only) if only else None
    return Roster(source, path, fmt, stop - first, wanted, tmp, digest, first, stop)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def display_source(location: str | Path) -> str:
    """A roster's location fit for logs and run names: a URL loses its user info, query and
    fragment, where signed URLs keep their tokens."""
    text = str(location)
    if _URL.match(text):
        try:
            parts = urlsplit(text)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # a bad port or [host]: loading says so; a label must not fail
            return f"{text.split(':', 1)[0]}://(not a valid URL)"
        return f"{parts.scheme}://{host}{port}{parts.path}"
    return text


def load_roster(
    location: str | Path,
    profile: ConnectorProfile | Sequence[ConnectorProfile] | None = None,
    only: Iterable[str] | None = None,
    template_columns: Iterable[str] = (),
    *,
    root: str | Path | None = None,
    downloads: InputSettings | None = None,
) -> Roster:
    """Check every row (against each profile, for a campaign); raise InputError listing all
    problems, or return a streamable Roster.

    A URL is read only as `downloads` (the settings root's `inputs`, ONBOARD_ROSTER_*) allow
    (https, or http to loopback; allowed hosts; size and time caps); without them, under their
    defaults, which allow no URL. With `root` (runs started through a deployment), a local path
    must lie under it."""
    source, path, tmp = _fetch(location, root=root, downloads=downloads)
    fmt = FORMATS.get(Path(urlsplit(source).path).suffix.lower())
    if fmt is None:
        raise InputError(
            f"{source}: unknown roster format; name the file .csv, .json, .jsonl or .yaml"
        )
    digest = _digest(path)  # of the bytes about to be checked; a chunk reads only these
    problems, ids = _check(path, fmt, source, profile, list(template_columns))
    wanted = frozenset(only) if only else None
    if wanted:
        for tenant_id in sorted(wanted - ids):
            problems.append(Problem(source, None, "only", f"tenant_id {tenant_id!r} is not in it"))
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = len(problems) - len(shown)
        raise InputError(
            shown,
            hint=(f"…and {more} more. " if more else "")
            + f"Fix the roster ({len(problems)} problem(s)); nothing was sent to Versori.",
        )
    count = len(ids & wanted) if wanted else len(ids)
    return Roster(source, path, fmt, count, wanted, tmp, digest)


def load_inline_roster(
    rows: Iterable[TenantRow | dict[str, Any]],
    profile: ConnectorProfile | Sequence[ConnectorProfile] | None = None,
    only: Iterable[str] | None = None,
    template_columns: Iterable[str] = (),
) -> Roster:
    """Tenants passed as a parameter, checked by the same rules as a roster file. Problems name
    `tenants parameter:N`, N counting the tenants from 1."""
    tmp = tempfile.TemporaryDirectory(prefix="onboard-inline-")
    path = Path(tmp.name) / "tenants.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            data = row if isinstance(row, dict) else row.model_dump()
            flat = {**data.get("fields", {}), **{k: v for k, v in data.items() if k != "fields"}}
            out.write(json.dumps(flat) + "\n")
    problems, ids = _check(path, "jsonl", INLINE_SOURCE, profile, list(template_columns))
    wanted = frozenset(only) if only else None
    if wanted:
        problems += [
            Problem(INLINE_SOURCE, None, "only", f"tenant_id {t!r} is not in it")
            for t in sorted(wanted - ids)
        ]
    if problems:
        raise InputError(problems, hint="Fix the tenants; nothing was sent to Versori.")
    count = len(ids & wanted) if wanted else len(ids)
    return Roster(INLINE_SOURCE, path, "jsonl", count, wanted, tmp, digest=_digest(path))


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _fetch(
    location: str | Path,
    where: str = "",
    root: str | Path | None = None,
    downloads: InputSettings | None = None,
) -> tuple[str, Path, Any]:
    """(label, local path, temporary folder or None): a URL is downloaded first, if the rules
    of `downloads` allow it (none given: their defaults, no URL at all); with `root`, a local
    path must lie under it."""
    source = display_source(location)
    if _URL.match(str(location)):
        rules = downloads if downloads is not None else InputSettings.model_construct()
        tmp, path = download(str(location), source, rules)
        return source, path, tmp
    path = resolve_under(Path(location), root, source, "roster")
    try:
        exists, folder, regular = path.exists(), path.is_dir(), path.is_file()
    except OSError as err:  # a name too long for the file system, a path it refuses
        raise InputError(
            f"{source}: cannot be read as a roster file ({err.strerror or type(err).__name__})"
        ) from None
    if not exists:
        raise InputError(f"{source}: roster file not found{where}")
    if folder:
        raise InputError(f"{source}: is a folder; give the roster file")
    if not regular:
        raise InputError(f"{source}: not a regular file; give the roster file")
    return source, path, None


def _check(
    path: Path,
    fmt: str,
    source: str,
    profile: ConnectorProfile | Sequence[ConnectorProfile] | None,
    template_columns: list[str],
) -> tuple[list[Problem], set[str]]:
    """Every problem of the roster, in one pass over its rows (a roster of millions is read
    once), each named with its line; and the tenant ids. `template_columns`: columns something
    other than the profiles read (the email templates)."""
    profiles = [profile] if isinstance(profile, ConnectorProfile) else list(profile or ())
    used_by_profiles = [name for p in profiles for name in p.fields_used]
    needed = list(dict.fromkeys([*used_by_profiles, *template_columns]))
    # Once each: admin_email is both required and, often, used by the templates.
    checked = list(dict.fromkeys([*REQUIRED_COLUMNS, *needed]))
    columns = csv_header(path, source) if fmt == "csv" else None
    header_missing = set(checked) - set(columns) if columns is not None else set()
    problems = [
        _missing_column(source, name, columns) for name in checked if name in header_missing
    ]
    first_line: dict[str, int] = {}
    for line, raw in raw_records(path, fmt, source):
        values, row_problems = _normalise(raw)
        # A missing column, or a value refused by _normalise, is reported once.
        reported = header_missing | {fld for fld, _ in row_problems}
        found = row_problems + _value_problems(values, checked, reported, first_line, line)
        if all(values.get(n) for n in needed):
            found += [problem for each in profiles for problem in _render_problems(each, values)]
        problems += [Problem(source, line, fld, message) for fld, message in found]
    return problems, set(first_line)


def _missing_column(source: str, name: str, columns: Sequence[str] | None) -> Problem:
    used = "" if name in REQUIRED_COLUMNS else " (the profile's templates use it)"
    # The header is not quoted: a file that is no roster may hold anything there.
    message = (
        f"no such column among the header's {len(columns or ())}{used}; check the first line's"
    )
    return Problem(source, 1, name, message + " spelling")


def _value_problems(
    values: dict[str, str],
    checked: list[str],
    reported: set[str],
    first_line: dict[str, int],
    line: int,
) -> list[tuple[str, str]]:
    """One record's empty required or used values, its tenant_id (well-formed, not seen at an
    earlier line: `first_line` keeps where each was) and its admin_email."""
    found = [
        (name, "is required" if name in REQUIRED_COLUMNS else _EMPTY_USED)
        for name in checked
        if name not in reported and not values.get(name)
    ]
    tenant_id = values.get("tenant_id", "")
    if tenant_id and not _TENANT_ID.match(tenant_id):
        found.append(("tenant_id", _TENANT_ID_RULE))
    elif tenant_id in first_line:
        found.append(
            ("tenant_id", f"duplicate {tenant_id!r} (first at line {first_line[tenant_id]})")
        )
    elif tenant_id:
        first_line[tenant_id] = line
    if email := values.get("admin_email", ""):
        try:
            validate_email(email, check_deliverability=False)
        except EmailNotValidError as err:
            found.append(("admin_email", without_quotes(str(err))))
    return found


_EMPTY_USED = "is empty, and the profile's templates use it"
_TENANT_ID_RULE = "use 1-128 letters, digits and . _ : @ + - (first a letter or digit)"


_IN_PATH_REFUSED = frozenset("/?#%\\")


@functools.lru_cache(maxsize=64)
def _path_fields(template: str) -> tuple[str, ...]:
    """The {fields} of an authorize_url template that land in its path."""
    names = template_fields(template)
    markers = {name: f"zq{i}qz" for i, name in enumerate(names)}
    path = urlsplit(template.format_map(markers)).path
    return tuple(name for name in names if markers[name] in path)


def _render_problems(profile: ConnectorProfile, values: dict[str, str]) -> list[tuple[str, str]]:
    in_path = _path_fields(profile.authorize_url)
    walks = [
        (name, "lands in the authorize_url path: no / ? # % \\ and not . or ..; fix the value")
        for name in in_path
        if values.get(name, "") in (".", "..") or _IN_PATH_REFUSED & set(values.get(name, ""))
    ]
    if walks:
        return walks
    try:
        request = profile.render(values)
    except ValidationError as err:
        return [
            (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))
            for e in err.errors()
        ]
    parts = request.authorize_parts()
    if {".", ".."} & set(parts.path.split("/")):
        return [(", ".join(in_path), "make a . or .. segment of the authorize_url path")]
    host = parts.hostname or ""
    if not HOSTNAME.match(host):
        used = ", ".join(template_fields(profile.authorize_url)) or "authorize_url"
        return [(used, "makes the authorize_url host invalid (letters, digits, - and . only)")]
    return []


def _tenant(values: dict[str, str]) -> Tenant:
    extra = {k: v for k, v in values.items() if k not in REQUIRED_COLUMNS}
    return Tenant(
        tenant_id=values.get("tenant_id", ""),
        name=values.get("name", ""),
        admin_email=values.get("admin_email", ""),
        fields=extra,
    )


def _normalise(raw: Any) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Row values as trimmed text; problems for values that cannot be text or carry CR/LF."""
    if not isinstance(raw, dict):
        return {}, [("", "a row must be an object of column: value")]
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for key, value in raw.items():
        if key is None and isinstance(value, list):  # surplus CSV cells come under None
            problems.append(("", f"has {len(value)} more value(s) than the header has columns"))
            continue
        key = str(key).strip()
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        elif not isinstance(value, str):
            problems.append((key, "must be text, not a list or object"))
            continue
        value = value.strip()
        if "\r" in value or "\n" in value or "\x00" in value:
            # Values end up in email headers and URLs; a line break could inject either.
            problems.append((key, "contains a line break or NUL; remove it"))
            continue
        if not (value.isascii() or _encodes(value)) or not (key.isascii() or _encodes(key)):
            problems.append((key, "is not valid Unicode text (a lone surrogate); fix it"))
            continue
        values[key] = value
    return values, problems


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
