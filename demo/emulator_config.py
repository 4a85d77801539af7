"""What the emulator knows and how it behaves: its connectors (with the credential and client id
stored under each), its API keys, and the faults, latency and rate limit it is told to play."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml
from ulid import ULID

DEFAULT_API_KEY = "emulator-key"


def is_ulid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ULID.from_str(value)
    except ValueError:
        return False
    return True


DEFAULT_REDIRECT_URI = "https://platform.versori.com/api/connect/v1/oauth2/callback"

# What a script entry may answer, in order: "ok" (normal answer), an HTTP error in Versori's
# shape ("404" is a credential miss of that tenant alone, "401"/"403" a key refused for it),
# "bad_url" (a 200 whose URL has no state), "stall" (200 headers, then `stall_seconds` of
# silence before the body). An action ending in "*" repeats for ever.
SCRIPT_ACTIONS = frozenset(
    {"ok", "500", "502", "503", "429", "400", "404", "401", "403", "bad_url", "stall"}
)

# How the rate limit counts (`EmulatorConfig.rate_limit_window`):
#   sliding  at most N accepted requests in any trailing 1 s (the strictest real APIs);
#   fixed    at most N per wall-clock second (a burst across a second's edge gets 2N through);
#   bucket   a token bucket of N tokens refilled at the rate (forgives bursts after a pause).
# N = max(1, floor(rate_limit)) for the two windows. Requests answered 429 never count.
RateLimitWindow = Literal["sliding", "fixed", "bucket"]
RATE_LIMIT_WINDOWS: tuple[RateLimitWindow, ...] = get_args(RateLimitWindow)
DEFAULT_STALL_SECONDS = 60.0

# What a CreateConnection script entry may answer (`EmulatorConfig.create_script`, matched on a
# substring of the request's externalId or connection name), in order: "ok" (the normal answer),
# "409" (refused as if the connection existed; nothing made), "500" (failed; nothing made),
# "500_after" (made, then a 500), "slow_after" (made, then `stall_seconds` before the answer),
# "drop_after" (made, then the socket closed mid-answer). "*" repeats, as in SCRIPT_ACTIONS.
CREATE_SCRIPT_ACTIONS = frozenset({"ok", "409", "500", "500_after", "slow_after", "drop_after"})
# A `script` key (and so a --script file's) with this prefix is a CreateConnection entry:
# `create:acme: [500_after, ok]` is `create_script={"acme": ["500_after", "ok"]}`.
CREATE_SCRIPT_PREFIX = "create:"


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


# A third, for the connect service's demo and tests (demo/connect_click.py): a Platform API v2
# system whose profile's authorize_url is the emulator's own consent page.
DEMO_CRM = EmulatedConnector(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    connector_id="01M8F12B95S4BX0QFB3TPDWZ0W",
    credential_id="01M8F12B95S4BX0QFB3TPDWZ0X",
    credential_organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    client_id="demo-crm-client-id",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class EmulatorConfig:
    """How the emulator behaves: who may call it, what it knows, and which faults it injects."""

    api_keys: frozenset[str] = frozenset({DEFAULT_API_KEY})
    connectors: tuple[EmulatedConnector, ...] = (DEMO_CONNECTOR, DEMO_SYSTEM, DEMO_CRM)
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float | None = None
    rate_limit_window: RateLimitWindow = "sliding"
    seed: int | None = None
    script: dict[str, list[str]] = field(default_factory=dict)
    stall_seconds: float = DEFAULT_STALL_SECONDS
    create_script: dict[str, list[str]] = field(default_factory=dict)

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

        if self.rate_limit_window not in RATE_LIMIT_WINDOWS:
            raise ValueError(
                f"rate_limit_window must be one of {', '.join(RATE_LIMIT_WINDOWS)}, "
                f"got {self.rate_limit_window!r}"
            )

        if (
            not _is_number(self.stall_seconds)
            or not math.isfinite(self.stall_seconds)
            or self.stall_seconds <= 0
        ):
            raise ValueError(
                f"stall_seconds must be a positive number of seconds, got {self.stall_seconds!r}"
            )

        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

        if not isinstance(self.script, dict):
            raise ValueError("script must map a substring to a list of actions")
        if not isinstance(self.create_script, dict):
            raise ValueError("create_script must map a substring to a list of actions")
        create_script = _checked_script(
            "create_script", self.create_script.items(), CREATE_SCRIPT_ACTIONS
        )
        # `create:` entries of `script` (a --script file's) are CreateConnection's too.
        prefixed = [(k, v) for k, v in self.script.items() if _is_create_key(k)]
        for pattern, actions in _checked_script("script", prefixed, CREATE_SCRIPT_ACTIONS).items():
            create_script[pattern.removeprefix(CREATE_SCRIPT_PREFIX)] = actions
        if "" in create_script:
            raise ValueError(f"script key {CREATE_SCRIPT_PREFIX!r} needs a substring after it")
        initialise = [(k, v) for k, v in self.script.items() if not _is_create_key(k)]
        self.script = _checked_script("script", initialise, SCRIPT_ACTIONS)
        self.create_script = create_script


def _is_create_key(key: object) -> bool:
    return isinstance(key, str) and key.startswith(CREATE_SCRIPT_PREFIX)


def _checked_script(
    name: str, entries: Iterable[tuple[object, object]], known: frozenset[str]
) -> dict[str, list[str]]:
    """A script's entries as a dict of lists, each action checked against `known`."""
    script: dict[str, list[str]] = {}
    for pattern, given in entries:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{name} keys must be non-empty strings")
        if isinstance(given, str) or not isinstance(given, Iterable):
            raise ValueError(f"{name}[{pattern!r}] must be a list of actions, not a string")
        actions = list(given)
        for action in actions:
            if not isinstance(action, str) or action.removesuffix("*") not in known:
                raise ValueError(
                    f"{name}[{pattern!r}] has unknown action {action!r}; expected one of "
                    f"{', '.join(sorted(known))}, optionally ending in '*'"
                )
        script[pattern] = actions
    return script


def step_script(
    actions: list[str], progress: dict[tuple[str, str], int], key: tuple[str, str]
) -> str | None:
    """The next of a script entry's `actions` for `key` (a request's identity), advancing its
    cursor in `progress`; an action ending in "*" repeats for ever; None past the last."""
    index = progress.get(key, 0)
    if index >= len(actions):
        return None
    action = actions[index]
    if action.endswith("*"):
        return action[:-1]
    progress[key] = index + 1
    return action


def load_script(path: str | Path) -> dict[str, list[str]]:
    """A script from a YAML or JSON file: a mapping of a substring of authorizeUrl?additionalParams
    to its list of actions; a key `create:<substring>` scripts CreateConnection instead (a
    substring of the externalId or connection name; CREATE_SCRIPT_ACTIONS). Bare numbers
    (`[404, ok]` in YAML) are taken as their text. The actions are checked by EmulatorConfig;
    the file's shape here, with a ValueError that says what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML or JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a mapping of a substring of the authorize URL or additionalParams "
            'to a list of actions, e.g. {"tenant=acme": ["503", "ok"]}'
        )
    script: dict[str, list[str]] = {}
    for pattern, actions in data.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{path}: every key must be a non-empty string, got {pattern!r}")
        if not isinstance(actions, list):
            raise ValueError(f"{path}: {pattern!r} must map to a list of actions")
        script[pattern] = [
            str(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in actions
        ]
    return script
