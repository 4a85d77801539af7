"""Settings from the environment (and a .env file): one root, `Settings`, with a section per
area, each a class that reads and checks its variables (a bad value is an InputError naming
the variable, never the value):

    versori   VersoriSettings   VERSORI_*: where and how to call Versori
    ledger    LedgerSettings    ONBOARD_DB_URL, ONBOARD_RUN_LEASE_SECONDS
    inputs    InputSettings     ONBOARD_ROSTER_*, ONBOARD_FILES_ROOT
    retry     RetrySettings     ONBOARD_RETRY_BACKOFF_SECONDS, ONBOARD_TENANT_DEADLINE_SECONDS,
                                ONBOARD_STOP_AFTER
    smtp      SmtpSettings      ONBOARD_SMTP_*, ONBOARD_EMAIL_FROM
    connect   ConnectSettings   ONBOARD_CONNECT_*, checked with the brand
    brand     BrandSettings     ONBOARD_BRAND_* (brand.py, beside its checks)
    sender    SenderSettings    ONBOARD_EMAIL_FROM and ONBOARD_CONNECT_BASE_URL read leniently:
                                what names the sender until ONBOARD_BRAND_NAME does

An entry point (a CLI command, a flow at its start, the connect service at its start, the
demo) calls `load_settings()` once and passes the root, or the section a function needs, down;
nothing below it constructs a section. A section is read the first time it is asked for, then
kept: one a process never asks for (SMTP, for a run that sends no email) never stops it, and
one that does not pass its check raises its InputError each time it is asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from onboarding.settings.connect import ConnectSettings
from onboarding.settings.env import ENV_HINT, EnvSettings, validation_reason
from onboarding.settings.sections import (
    API_KEY_NOT_SET,
    InputSettings,
    LedgerSettings,
    RetrySettings,
    VersoriSettings,
    check_api_key,
    check_base_url,
)
from onboarding.settings.smtp import (
    DEFAULT_PORTS,
    SETTINGS_SOURCE,
    Security,
    SmtpServerSettings,
    SmtpSettings,
)

if TYPE_CHECKING:
    from onboarding.settings.brand import BrandSettings, SenderSettings

__all__ = [
    "API_KEY_NOT_SET",
    "DEFAULT_PORTS",
    "ENV_HINT",
    "SETTINGS_SOURCE",
    "ConnectSettings",
    "EnvSettings",
    "InputSettings",
    "LedgerSettings",
    "RetrySettings",
    "Security",
    "Settings",
    "SmtpServerSettings",
    "SmtpSettings",
    "VersoriSettings",
    "check_api_key",
    "check_base_url",
    "files_root",
    "load_settings",
    "validation_reason",
]

_S = TypeVar("_S", bound=EnvSettings)


class Settings:
    """Every setting of a process, one section per area (see the module's docstring), each read
    from the environment the first time it is asked for and kept. Sections given here are used
    as they are (a test's, a benchmark's); the rest are read when asked for. Thread-safe."""

    __slots__ = ("_lock", "_sections")

    def __init__(
        self,
        *,
        versori: VersoriSettings | None = None,
        ledger: LedgerSettings | None = None,
        inputs: InputSettings | None = None,
        retry: RetrySettings | None = None,
        smtp: SmtpSettings | None = None,
        connect: ConnectSettings | None = None,
        brand: BrandSettings | None = None,
        sender: SenderSettings | None = None,
    ) -> None:
        given: dict[str, EnvSettings | None] = {
            "versori": versori,
            "ledger": ledger,
            "inputs": inputs,
            "retry": retry,
            "smtp": smtp,
            "connect": connect,
            "brand": brand,
            "sender": sender,
        }
        self._sections = {name: section for name, section in given.items() if section is not None}
        # Re-entrant: reading `connect` reads `brand` too.
        self._lock = threading.RLock()

    @property
    def versori(self) -> VersoriSettings:
        return self._section("versori", VersoriSettings)

    @property
    def ledger(self) -> LedgerSettings:
        return self._section("ledger", LedgerSettings)

    @property
    def inputs(self) -> InputSettings:
        return self._section("inputs", InputSettings)

    @property
    def retry(self) -> RetrySettings:
        return self._section("retry", RetrySettings)

    @property
    def smtp(self) -> SmtpSettings:
        return self._section("smtp", SmtpSettings)

    @property
    def connect(self) -> ConnectSettings:
        """ONBOARD_CONNECT_*, read with the brand's settings (and its file): whoever reads them
        (`onboard connect-server` before its workers start, a run that emails links) stops on
        a bad brand setting as on a bad one of these."""
        return self._section("connect", ConnectSettings, then=lambda: self.brand.values())

    @property
    def brand(self) -> BrandSettings:
        # Imported when first asked for: its checks (email addresses, the brand file's YAML)
        # cost a command that reads no brand (`onboard status`) their import.
        from onboarding.settings.brand import BrandSettings

        return self._section("brand", BrandSettings)

    @property
    def sender(self) -> SenderSettings:
        from onboarding.settings.brand import SenderSettings

        return self._section("sender", SenderSettings)

    def _section(self, name: str, kind: type[_S], then: Callable[[], object] | None = None) -> _S:
        """The section `name`: kept, or read now (and `then` checked with it) and kept."""
        with self._lock:
            section = self._sections.get(name)
            if section is None:
                section = kind()
                if then is not None:
                    then()
                self._sections[name] = section
        assert isinstance(section, kind)
        return section


def load_settings() -> Settings:
    """The root an entry point reads once and passes down; each section is read from the
    environment (and .env in the working folder) when first asked for."""
    return Settings()


def files_root(from_deployment: bool, settings: Settings) -> Path | None:
    """The folder a run's local profile and roster must lie in: none for a run started by hand
    (the CLI, a flow called in Python), ONBOARD_FILES_ROOT (default: the working folder, the
    project checkout) for a run started through a deployment, where the caller chose them.
    The inputs section is read only for the latter."""
    if not from_deployment:
        return None
    configured = settings.inputs.files_root
    return Path(configured) if configured else Path.cwd()
