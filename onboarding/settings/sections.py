"""The sections of a run's settings: VERSORI_* (VersoriSettings), the ledger (LedgerSettings),
where rosters and profiles may come from (InputSettings), retries (RetrySettings)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from onboarding import constants
from onboarding.net import is_loopback
from onboarding.settings.env import EnvSettings

# Said wherever a Versori call needs a key and none is set (the run's check, the client).
API_KEY_NOT_SET = (
    "VERSORI_API_KEY is not set: set it to a Versori API key, or set VERSORI_API_KEY_BLOCK to "
    "the name of a Prefect Secret block that holds one"
)


def check_api_key(api_key: str) -> str:
    """A key with whitespace, control or non-ASCII characters cannot go in a header: httpx or
    h11 would raise an error that quotes the header, key included. Never quote the key."""
    if not all("!" <= c <= "~" for c in api_key):
        raise ValueError(
            "contains whitespace, control or non-ASCII characters (a trailing newline?); "
            "set it to the key alone"
        )
    return api_key


def check_base_url(base_url: str, production: str = constants.PRODUCTION_BASE_URL) -> str:
    """An http(s) URL with a host, no query or fragment; plain http only to this machine (the
    API key goes in every request's header: never in clear over a network). Not quoted in
    the error: it may hold credentials."""
    try:
        parts = urlsplit(base_url)
        _ = parts.port  # raises ValueError on a bad port
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        usable = usable and not parts.query and not parts.fragment and " " not in base_url
    except ValueError:
        usable = False
    if not usable:
        raise ValueError(
            "is not an http(s) URL with a host and no query or fragment (not quoted here: it "
            f"may hold credentials); production is {production}"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            f"is plain http to {parts.hostname}, not a loopback host: the API key would cross "
            "the network in clear; use https (http only to 127.0.0.1, ::1 or localhost, e.g. "
            f"the emulator); production is {production}"
        )
    return base_url.rstrip("/")


class VersoriSettings(EnvSettings):
    """VERSORI_*: where and how to call Versori."""

    model_config = SettingsConfigDict(env_prefix="VERSORI_", env_file=".env", extra="ignore")

    base_url: str = constants.PRODUCTION_BASE_URL
    api_key: SecretStr | None = None
    # Name of a Prefect Secret block holding the API key; read by the flow layer only.
    api_key_block: str | None = None
    connect_timeout: float = Field(constants.CONNECT_TIMEOUT_SECONDS, gt=0)
    read_timeout: float = Field(constants.READ_TIMEOUT_SECONDS, gt=0)
    call_deadline: float = Field(constants.CALL_DEADLINE_SECONDS, gt=0)

    @field_validator("base_url")
    @classmethod
    def _usable_base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("api_key")
    @classmethod
    def _usable_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_api_key(value.get_secret_value())
        return value

    @property
    def base_url_if_set(self) -> str | None:
        """VERSORI_BASE_URL when it is set; None lets the client take its API's production URL
        (the `base_url` default is the Connect API's only)."""
        return self.base_url if "base_url" in self.model_fields_set else None


class LedgerSettings(EnvSettings):
    """ONBOARD_DB_URL: the ledger database; ONBOARD_RUN_LEASE_SECONDS: a run's claims."""

    model_config = SettingsConfigDict(env_prefix="ONBOARD_", env_file=".env", extra="ignore")

    db_url: str = "sqlite:///onboarding.db"
    # ONBOARD_RUN_LEASE_SECONDS: how long a run's claims on its tenants outlive its last sign
    # of life (a run killed without letting go frees them this long after).
    run_lease_seconds: float = Field(20.0, ge=2, le=3600)


class InputSettings(EnvSettings):
    """Where rosters and profiles may come from, and how much of them is read.

    ONBOARD_ROSTER_ALLOWED_HOSTS: hosts a roster URL (and every redirect) may name, separated by
    commas; `*.example.com` allows its subdomains. Empty (the default): no roster URLs at all.
    ONBOARD_ROSTER_MAX_BYTES, ONBOARD_ROSTER_DOWNLOAD_SECONDS: a download's size cap and whole
    deadline. ONBOARD_FILES_ROOT: for runs started through a deployment, the folder every local
    profile and roster must lie in (unset: the run's working folder, the project checkout).
    """

    model_config = SettingsConfigDict(env_prefix="ONBOARD_", env_file=".env", extra="ignore")

    roster_allowed_hosts: str = ""
    roster_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    roster_download_seconds: float = Field(120.0, gt=0)
    files_root: str | None = None

    @property
    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower().rstrip(".") for h in self.roster_allowed_hosts.split(",") if h.strip()
        )


class RetrySettings(EnvSettings):
    """How failed tenants are retried, and when a batch stops.

    ONBOARD_RETRY_BACKOFF_SECONDS: how long a slice with transient failures waits before its
    first retry (default 1); each next retry waits twice as long, plus up to half as much again
    at random so that slices failing together do not retry together. A Retry-After the server
    sent is waited first. Unset, the tasks keep the backoff they are declared with."""

    model_config = SettingsConfigDict(env_prefix="ONBOARD_", env_file=".env", extra="ignore")

    retry_backoff_seconds: float = Field(constants.TASK_RETRY_BACKOFF_SECONDS, ge=0, le=600)
    # ONBOARD_TENANT_DEADLINE_SECONDS: no new try of a tenant starts this long after its first
    # (onboarding.batch.retry_policy.RetryRule). ONBOARD_STOP_AFTER: distinct tenants in a row that
    # must fail with the same 401, 403 or 404 before the batch stops (BatchStop).
    tenant_deadline_seconds: float = Field(constants.TENANT_DEADLINE_SECONDS, gt=0)
    stop_after: int = Field(constants.STOP_AFTER, ge=1, le=1000)

    @property
    def is_set(self) -> bool:
        return "retry_backoff_seconds" in self.model_fields_set
