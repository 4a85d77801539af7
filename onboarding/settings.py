"""Settings from the environment (and a .env file), one class per area."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from onboarding import constants


class VersoriSettings(BaseSettings):
    """VERSORI_*: where and how to call Versori."""

    model_config = SettingsConfigDict(env_prefix="VERSORI_", env_file=".env", extra="ignore")

    base_url: str = constants.PRODUCTION_BASE_URL
    api_key: SecretStr | None = None
    # Name of a Prefect Secret block holding the API key; read by the flow layer only.
    api_key_block: str | None = None
    connect_timeout: float = Field(constants.CONNECT_TIMEOUT_SECONDS, gt=0)
    read_timeout: float = Field(constants.READ_TIMEOUT_SECONDS, gt=0)
    call_deadline: float = Field(constants.CALL_DEADLINE_SECONDS, gt=0)


class LedgerSettings(BaseSettings):
    """ONBOARD_DB_URL: the ledger database."""

    model_config = SettingsConfigDict(env_prefix="ONBOARD_", env_file=".env", extra="ignore")

    db_url: str = "sqlite:///onboarding.db"
