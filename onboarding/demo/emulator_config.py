"""What the emulator knows and how it behaves: its connectors (with the credential and client id
stored under each), its API keys, and the faults, latency and rate limit it is told to play."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onboarding.demo.versori_rules import is_ulid

DEFAULT_API_KEY = "emulator-key"
DEFAULT_REDIRECT_URI = "https://platform.versori.com/api/connect/v1/oauth2/callback"

SCRIPT_ACTIONS = frozenset({"ok", "500", "502", "503", "429", "400", "bad_url"})


@dataclass(frozen=True)
class EmulatedConnector:
    """One connector the emulator knows, with the credential and client id stored under it.

    It answers under both APIs: `connector_id` is also its system id on the Platform API v2
    path (`/o/{organisation_id}/systems/{system_id}/oauth2/initialise`). `redirect_uri` is
    the redirect the returned URL carries unless a v2 request sets redirectUrl."""

    organisation_id: str
    connector_id: str
    credential_id: str
    credential_organisation_id: str
    client_id: str
    redirect_uri: str = DEFAULT_REDIRECT_URI

    def __post_init__(self) -> None:
        # A connector whose credential ids are not ULIDs could never be matched by a valid
        # request; failing here beats a confusing 404 at request time.
        for name in ("organisation_id", "connector_id", "client_id", "redirect_uri"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"EmulatedConnector.{name} must be a non-empty string")
        for name in ("credential_id", "credential_organisation_id"):
            if not is_ulid(getattr(self, name)):
                raise ValueError(f"EmulatedConnector.{name} must be a ULID")


DEMO_CONNECTOR = EmulatedConnector(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    connector_id="01M8F12B95S4BX0QFB3TPDWZ0Q",
    credential_id="01M8F12B95S4BX0QFB3TPDWZ0R",
    credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    client_id="demo-client-id",
)

# A second one, which examples/profile-v2.yaml names as its Platform API v2 system.
DEMO_SYSTEM = EmulatedConnector(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    connector_id="01M8F12B95S4BX0QFB3TPDWZ0S",
    credential_id="01M8F12B95S4BX0QFB3TPDWZ0T",
    credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    client_id="demo-system-client-id",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class EmulatorConfig:
    """How the emulator behaves: who may call it, what it knows, and which faults it injects."""

    api_keys: frozenset[str] = frozenset({DEFAULT_API_KEY})
    connectors: tuple[EmulatedConnector, ...] = (DEMO_CONNECTOR, DEMO_SYSTEM)
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float | None = None
    seed: int | None = None
    script: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Callers (CLI flags, YAML) hand over lists and sets; coerce so the app can rely on types.
        if isinstance(self.api_keys, str):
            raise ValueError("api_keys must be a collection of keys, not a single string")
        self.api_keys = frozenset(self.api_keys)
        if not self.api_keys:
            raise ValueError("api_keys must not be empty: the emulator would reject every request")
        if not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must hold non-empty strings only")

        self.connectors = tuple(self.connectors)
        if not self.connectors:
            raise ValueError("connectors must not be empty")
        seen: set[tuple[str, str]] = set()
        for connector in self.connectors:
            if not isinstance(connector, EmulatedConnector):
                raise ValueError("connectors must hold EmulatedConnector instances")
            key = (connector.organisation_id, connector.connector_id)
            if key in seen:
                raise ValueError(
                    f"connectors holds organisation {key[0]} connector {key[1]} more than once"
                )
            seen.add(key)

        if not _is_number(self.latency_ms) or not math.isfinite(self.latency_ms):
            raise ValueError("latency_ms must be a finite number")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")

        if not _is_number(self.error_rate) or not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(
                f"error_rate must be a fraction between 0 and 1, got {self.error_rate}"
            )

        if self.rate_limit is not None and (
            not _is_number(self.rate_limit)
            or not math.isfinite(self.rate_limit)
            or self.rate_limit <= 0
        ):
            raise ValueError(
                f"rate_limit must be a positive number of requests per second or None, "
                f"got {self.rate_limit}"
            )

        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

        if not isinstance(self.script, dict):
            raise ValueError("script must map a substring to a list of actions")
        script: dict[str, list[str]] = {}
        for pattern, actions in self.script.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("script keys must be non-empty strings")
            if isinstance(actions, str):
                raise ValueError(f"script[{pattern!r}] must be a list of actions, not a string")
            actions = list(actions)
            for action in actions:
                if not isinstance(action, str) or action.removesuffix("*") not in SCRIPT_ACTIONS:
                    raise ValueError(
                        f"script[{pattern!r}] has unknown action {action!r}; expected one of "
                        f"{', '.join(sorted(SCRIPT_ACTIONS))}, optionally ending in '*'"
                    )
            script[pattern] = actions
        self.script = script
