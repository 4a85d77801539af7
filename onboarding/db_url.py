"""A database URL as it may be shown: passwords and credential-like query values hidden."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from onboarding import constants

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
