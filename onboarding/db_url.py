"""A database URL as it may be shown (passwords and credential-like query values hidden), and
whether it is one at all: its form checked without connecting."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from onboarding import constants
from onboarding.errors import InputError

_SECRET_QUERY_KEY = constants.SECRET_QUERY_WORDS


def _secret_key(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_QUERY_KEY)


def redact(url: str) -> str:
    """The URL as it may be shown: its password and every password-like query value hidden."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparsable URL>"
    query = {k: ("***" if _secret_key(k) else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def _secrets_of(url: str) -> list[str]:
    """The secret values in a database URL, to scrub from a driver's message."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return []
    found = [parsed.password] if parsed.password else []
    for name, value in parsed.query.items():
        if _secret_key(name):
            found.extend([value] if isinstance(value, str) else value)
    return [str(v) for v in found if v]


def scrub(message: str, url: str) -> str:
    for secret in _secrets_of(url):
        message = message.replace(secret, "***")
    return message.replace(url, redact(url))


# What SQLAlchemy raises for a URL it cannot use: unparsable, or of a dialect or driver it does
# not know (or whose driver is not installed).
UNUSABLE_URL_ERRORS = (ArgumentError, NoSuchModuleError, ImportError, ValueError)


def unusable_url(url: str, err: BaseException) -> InputError:
    """The error for ONBOARD_DB_URL when it is not a usable database URL (`err` says why)."""
    return InputError(
        f"ONBOARD_DB_URL {redact(url)!r} is not a usable database URL "
        f"({scrub(str(err), url)}); use sqlite:///path/to/onboarding.db or "
        "postgresql+psycopg://user@host:5432/db"
    )


def check_url_form(url: str) -> None:
    """A ledger URL checked without opening it: one SQLAlchemy parses, of a dialect and driver
    it knows; else the InputError opening the ledger would raise (`unusable_url`). Whether
    the ledger answers there is known when it is opened."""
    try:
        make_url(url).get_dialect()
    except UNUSABLE_URL_ERRORS as err:
        raise unusable_url(url, err) from None
