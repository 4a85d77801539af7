"""ONBOARD_SMTP_* and ONBOARD_EMAIL_FROM: the server the onboarding emails go through. Each
value's own range is checked here, on the environment's values and on values given in code
alike; what they must be together to send safely is checked by the mail package
(`onboarding.mail.smtp_settings.check_for_sending`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from onboarding.settings.env import EnvSettings

# What a problem with a mail setting is located in, as the error shows it.
SETTINGS_SOURCE = "SMTP settings"

Security = Literal["starttls", "ssl", "none"]
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "ssl": 465, "none": 25}


class SmtpServerSettings(BaseModel):
    """The server the onboarding emails go through, from any source: the environment
    (`SmtpSettings`), a Prefect block's values or a caller's (`SmtpServerSettings.of`)."""

    model_config = ConfigDict(populate_by_name=True)

    host: str | None = None
    # None: the usual port of the security mode (587 starttls, 465 ssl, 25 none).
    port: int | None = None
    username: str | None = None
    password: SecretStr | None = None
    security: Security = "starttls"
    timeout: float = 30.0
    # A PEM bundle of the CA(s) to trust instead of the system's, for a private CA.
    ca_file: str | None = None
    email_from: str | None = Field(None, validation_alias="ONBOARD_EMAIL_FROM")

    @classmethod
    def of(cls, **values: Any) -> SmtpServerSettings:
        """Settings given in code, not read from the environment; a bad value is an InputError
        naming its variable, as one in the environment would be named."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise SmtpSettings.input_error(err) from None

    @field_validator("security", mode="before")
    @classmethod
    def _known_security(cls, value: object) -> object:
        if value not in DEFAULT_PORTS:
            raise ValueError(f"is {value!r}; use starttls, ssl or none")
        return value

    @field_validator("port")
    @classmethod
    def _tcp_port(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value < 65536:
            raise ValueError(f"{value} is not a TCP port")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be more than 0 seconds")
        return value

    @model_validator(mode="after")
    def _default_port(self) -> SmtpServerSettings:
        if self.port is None:
            self.port = DEFAULT_PORTS[self.security]
        return self


class SmtpSettings(SmtpServerSettings, EnvSettings):
    """ONBOARD_SMTP_* and ONBOARD_EMAIL_FROM: the server the onboarding emails go through."""

    model_config = SettingsConfigDict(
        env_prefix="ONBOARD_SMTP_",
        env_file=".env",
        extra="ignore",
        env_ignore_empty=True,
        populate_by_name=True,
    )

    settings_source: ClassVar[str] = SETTINGS_SOURCE

    # Name of a prefect-email EmailServerCredentials block; resolved by the flow layer only.
    block: str | None = None
