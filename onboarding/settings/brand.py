"""The brand's settings: who is asking (the product's name, logo, accent colour, support
contact, privacy and terms links, and why it asks), as the operator sets it, each key checked.

Read from ONBOARD_BRAND_*, over the `brand:` mapping of the YAML file ONBOARD_BRAND_FILE names,
by the settings root (`onboarding.settings.Settings.brand`) of whoever shows it (a run's email
templates, the connect service); a profile's own `brand:` mapping (the same keys, each optional)
wins for its connector. A bad value is an InputError naming the variable, or the file, line and
key (exit 2), never a traceback. What emails and pages show of them, every key resolved, is
`onboarding.inputs.brand.Brand`.

    BrandValues    the keys, each optional and checked (the file's and a profile's mapping)
    BrandSettings  ONBOARD_BRAND_* (and ONBOARD_BRAND_FILE) from the environment and .env: the
                   settings root's `brand` section
    SenderSettings what names the sender until ONBOARD_BRAND_NAME does: its `sender` section
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from onboarding.errors import InputError, Problem
from onboarding.files import load_yaml_with_lines, problems_from_validation
from onboarding.net import is_loopback
from onboarding.settings.env import EnvSettings

# The accent (the button, links) when none is set: 6.2:1 with white text.
DEFAULT_COLOR = "#1a56db"
# WCAG 2.1 AA (1.4.3): normal-size text needs 4.5:1 against its background. The accent is
# the background of white button text and the colour of links on white: the same ratio.
MIN_CONTRAST = 4.5
BRAND_FILE_MAX_BYTES = 64 * 1024
BRAND_HINT = (
    "Set ONBOARD_BRAND_* in the environment or in .env, or the keys of the `brand:` mapping "
    "in the file ONBOARD_BRAND_FILE names (see docs/configuration.md, Branding)."
)

# What a one-line value (a name, a reason, a URL, a From line's display name) may not hold.
LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
_HOST = re.compile(r"[a-z0-9.-]+")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _one_line(value: str, max_chars: int) -> str:
    value = value.strip()
    if LINE_BREAKS.search(value):
        raise ValueError("must be one line of text, with no control characters")
    if len(value) > max_chars:
        raise ValueError(f"is longer than {max_chars} characters")
    return value


def _name(value: str) -> str:
    value = _one_line(value, 100)
    if not value:
        raise ValueError("is empty; set it to your product's name, e.g. Acme Analytics")
    return value


def _reason(value: str) -> str:
    return _one_line(value, 300).rstrip(".")


def _web_url(value: str) -> str:
    """An https URL (plain http only to this machine) with a host and no user info: a logo
    or a link shown to every admin."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError("is not a URL; use https://…") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or LINE_BREAKS.search(value):
        raise ValueError("must be an absolute https URL, e.g. https://www.example.com/privacy")
    if " " in value or '"' in value or parts.username or parts.password:
        raise ValueError("must have no spaces, quotes or user info")
    if not (_HOST.fullmatch(parts.hostname) or _is_ip(parts.hostname)):
        raise ValueError("has a host that is not a plain host name or address")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            "is plain http: mail clients and the pages' https would refuse or flag it; use "
            "https (http only to 127.0.0.1, ::1 or localhost)"
        )
    if len(value) > 2000:
        raise ValueError("is longer than 2000 characters")
    return value


def contrast_with_white(color: str) -> float:
    """WCAG 2.1's contrast ratio between white and `color` (#rrggbb): 1 to 21."""

    def channel(hex2: str) -> float:
        c = int(hex2, 16) / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(color[i : i + 2]) for i in (1, 3, 5))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return 1.05 / (luminance + 0.05)


def _color(value: str) -> str:
    value = value.strip()
    if not _COLOR.fullmatch(value):
        raise ValueError(f"must be a colour as #rrggbb, e.g. {DEFAULT_COLOR}")
    value = value.lower()
    ratio = contrast_with_white(value)
    if ratio < MIN_CONTRAST:
        raise ValueError(
            f"{value} has a contrast of {ratio:.2f}:1 with white text, under the "
            f"{MIN_CONTRAST}:1 that WCAG 2.1 AA asks of the button's white text (and of links "
            f"in this colour on white); choose a darker colour (the default is {DEFAULT_COLOR})"
        )
    return value


def _support(value: str) -> str:
    """An email address, or an https URL (a help centre, a contact form)."""
    value = value.strip()
    if "://" in value:
        return _web_url(value)
    if value.lower().startswith("mailto:"):
        value = value[len("mailto:") :]
    try:
        checked = validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        raise ValueError(
            "must be an email address (support@example.com) or an https URL "
            "(https://help.example.com)"
        ) from None
    return checked.normalized


Name = Annotated[str, AfterValidator(_name)]
WebUrl = Annotated[str, AfterValidator(_web_url)]
Color = Annotated[str, AfterValidator(_color)]
Support = Annotated[str, AfterValidator(_support)]
Reason = Annotated[str, AfterValidator(_reason)]


class BrandValues(BaseModel):
    """The brand's keys, each optional: what a `brand:` mapping (ONBOARD_BRAND_FILE's, a
    profile's) may hold, each checked as ONBOARD_BRAND_<KEY> is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The product's name as admins know it: "Acme Analytics would like to connect to…".
    name: Name | None = None
    # An https image (http only to a loopback host); the pages' CSP allows its origin only.
    logo_url: WebUrl | None = None
    logo_width: int | None = Field(None, ge=1, le=600)
    logo_height: int | None = Field(None, ge=1, le=200)
    # The accent: the button's background under white text, and links; at least 4.5:1.
    color: Color | None = None
    # An email address or an https URL.
    support: Support | None = None
    privacy_url: WebUrl | None = None
    terms_url: WebUrl | None = None
    # Why the product asks, as a clause after "<name> asks for this": "so that your tickets
    # sync to Acme Analytics".
    reason: Reason | None = None

    def set_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class BrandSettings(BrandValues, EnvSettings):
    """ONBOARD_BRAND_NAME, _LOGO_URL, _LOGO_WIDTH, _LOGO_HEIGHT, _COLOR, _SUPPORT,
    _PRIVACY_URL, _TERMS_URL, _REASON; ONBOARD_BRAND_FILE: a YAML file whose `brand:` mapping
    holds any of them (the environment wins)."""

    model_config = SettingsConfigDict(
        env_prefix="ONBOARD_BRAND_",
        env_file=".env",
        extra="ignore",
        env_ignore_empty=True,
        frozen=True,
    )

    settings_source: ClassVar[str] = "environment"

    file: str | None = None

    def values(self) -> BrandValues:
        """The file's values under the environment's (each checked, named where it is)."""
        merged = load_brand_file(self.file).set_values() if self.file else {}
        merged.update({k: v for k, v in self.model_dump(exclude={"file"}).items() if v is not None})
        return BrandValues.model_validate(merged)


class SenderSettings(EnvSettings):
    """What names the sender until ONBOARD_BRAND_NAME does (read leniently: SmtpSettings and
    ConnectSettings check them, and the connect service, which reads no SMTP settings, must not
    stop on a bad one)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    email_from: str | None = Field(None, validation_alias="ONBOARD_EMAIL_FROM")
    connect_base_url: str | None = Field(None, validation_alias="ONBOARD_CONNECT_BASE_URL")


def load_brand_file(path: str | Path) -> BrandValues:
    """The `brand:` mapping of a YAML file; problems name the file, line and key."""
    source = str(path)
    try:
        data, lines = load_yaml_with_lines(
            Path(path), source, max_bytes=BRAND_FILE_MAX_BYTES, max_nodes=1000, what="brand file"
        )
    except InputError as err:
        raise InputError(
            err.problems, hint=f"ONBOARD_BRAND_FILE names this file. {BRAND_HINT}"
        ) from None
    mapping = data.get("brand") if isinstance(data, dict) else None
    if not isinstance(mapping, dict):
        raise InputError(
            [
                Problem(
                    source,
                    lines.get(("brand",)),
                    "brand",
                    "the file needs a `brand:` mapping (name, logo_url, color, support, …)",
                )
            ],
            hint=BRAND_HINT,
        )
    try:
        return BrandValues.model_validate(mapping)
    except ValidationError as err:
        nested = {(k[1:] if k[:1] == ("brand",) else k): v for k, v in lines.items()}
        problems = [
            replace(p, field=f"brand.{p.field}")
            for p in problems_from_validation(err, source, nested, BrandValues)
        ]
        raise InputError(problems, hint=BRAND_HINT) from None
