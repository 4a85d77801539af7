"""ONBOARD_CONNECT_*: the connect service's (connect_service/) settings: where its links point,
how often a link may mint, its sweep and timeouts. A run that emails links reads them too."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from onboarding.net import is_loopback
from onboarding.settings.env import EnvSettings


class ConnectSettings(EnvSettings):
    """ONBOARD_CONNECT_BASE_URL: the service's public base (`https://connect.example.com`);
    emails carry `<base>/c/<token>` when it is set, the raw authorize URL when not.
    ONBOARD_CONNECT_MINTS_PER_HOUR: how many times one link's button may make a new state in
    an hour (each press calls Versori). ONBOARD_CONNECT_SWEEP_SECONDS: how often unfinished
    connections are resolved (default 300). ONBOARD_CONNECT_CREATE_TIMEOUT_SECONDS (10) and
    ONBOARD_CONNECT_LOOKUP_TIMEOUT_SECONDS (8): what a callback waits on Versori.
    ONBOARD_CONNECT_CONNECTING_GRACE_SECONDS (60): how old an unfinished claim must be before
    it is resolved by asking Versori (longer than any callback in flight).

    The pages' brand (ONBOARD_BRAND_*, onboarding/settings/brand.py) is checked with these when
    the root reads them (`Settings.connect`): whoever reads them (`onboard connect-server`
    before its workers start, a run that emails links) stops on a bad brand setting as on a bad
    one of these (exit 2)."""

    model_config = SettingsConfigDict(
        env_prefix="ONBOARD_CONNECT_", env_file=".env", extra="ignore"
    )

    base_url: str | None = None
    mints_per_hour: int = Field(10, ge=1, le=1000)
    # How often the service resolves connections left unfinished (a crash, a SIGTERM, an
    # outage) by asking Versori; also once on start.
    sweep_seconds: float = Field(300.0, ge=0.5, le=86400.0)
    # How long a callback waits on CreateConnection (tried once), then on the lookup that
    # settles an answer that never came: the browser waits at most their sum.
    create_timeout_seconds: float = Field(10.0, ge=0.5, le=60.0)
    lookup_timeout_seconds: float = Field(8.0, ge=0.5, le=60.0)
    # A claim younger than this may still have its CreateConnection in flight (in any replica,
    # a SIGTERM's grace included): the sweep and the tenant's next request leave it alone.
    connecting_grace_seconds: float = Field(60.0, ge=1.0, le=3600.0)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute https URL, e.g. https://connect.example.com")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must have no query, fragment or user info")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(
                "is plain http to a host other than this machine: links would carry their "
                "token in clear; use https (http only to 127.0.0.1, ::1 or localhost)"
            )
        return value
