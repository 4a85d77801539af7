"""What the emulator knows and how it behaves: its connectors (with the credential and client id
stored under each), its environments (the systems an end user is activated on), its API keys,
and the faults, latency and rate limit it is told to play."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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

# What an ActivateUser script entry may answer (`EmulatorConfig.activate_script`, or
# `activate:<substring>` keys of `script`, matched on a substring of the request's userId or of
# the end user's externalId), in order: "ok", an HTTP error in Versori's shape and nothing made
# ("400", "403", "404", "409", "422", "429", "500", "502", "503"), "500_after" (the activation
# made, then a 500). "*" repeats, as in SCRIPT_ACTIONS.
ACTIVATE_SCRIPT_ACTIONS = frozenset(
    {"ok", "400", "403", "404", "409", "422", "429", "500", "502", "503", "500_after"}
)
ACTIVATE_SCRIPT_PREFIX = "activate:"


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


@dataclass(frozen=True)
class EmulatedEnvironment:
    """One environment of a project in an organisation: the systems an end user must have a
    connection to before it can be activated there (ActivateUser), one connection template
    each. `systems` maps a system id (one of the organisation's EmulatedConnector ids) to its
    connection template id; a mapping given is kept as a tuple of (system, template) pairs,
    ULIDs in canonical form. A template belongs to one environment only (it is an
    environment's system)."""

    organisation_id: str
    environment_id: str
    systems: tuple[tuple[str, str], ...]
    name: str = "production"

    def __post_init__(self) -> None:
        for name in ("organisation_id", "environment_id"):
            if not is_ulid(getattr(self, name)):
                raise ValueError(f"EmulatedEnvironment.{name} must be a ULID")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("EmulatedEnvironment.name must be a non-empty string")
        given = self.systems
        pairs = list(given.items()) if isinstance(given, Mapping) else list(given)
        if not pairs:
            raise ValueError(f"environment {self.environment_id} needs at least one system")
        canonical: list[tuple[str, str]] = []
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2 or not all(map(is_ulid, pair)):
                raise ValueError(
                    f"environment {self.environment_id}: systems must map a system id to a "
                    "connection template id, both ULIDs"
                )
            canonical.append((str(ULID.from_str(pair[0])), str(ULID.from_str(pair[1]))))
        for position, what in ((0, "system"), (1, "connection template")):
            ids = [pair[position] for pair in canonical]
            if len(set(ids)) != len(ids):
                raise ValueError(f"environment {self.environment_id} names a {what} more than once")
        object.__setattr__(self, "environment_id", str(ULID.from_str(self.environment_id)))
        object.__setattr__(self, "systems", tuple(canonical))

    def template_of(self, system_id: str) -> str | None:
        return next((t for s, t in self.systems if s == system_id), None)

    def system_of(self, template_id: str) -> str | None:
        return next((s for s, t in self.systems if t == template_id), None)


# The demo's environment: the connect service's system (DEMO_CRM) with the template that
# examples/profile-connect.yaml names, so a tenant connected through the service can be
# activated on it.
DEMO_TEMPLATE_ID = "01M8F12B95S4BX0QFB3TPDWZ0V"
DEMO_ENVIRONMENT = EmulatedEnvironment(
    organisation_id="01M8F12B95S4BX0QFB3TPDWZ0P",
    environment_id="01M8F12B95S4BX0QFB3TPDWZ1E",
    systems=((DEMO_CRM.connector_id, DEMO_TEMPLATE_ID),),
)
# EmulatorConfig's default: kept only if the config's connectors hold DEMO_CRM (a config of
# other connectors has no environment unless it names some).
DEMO_ENVIRONMENTS: tuple[EmulatedEnvironment, ...] = (DEMO_ENVIRONMENT,)


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
    environments: tuple[EmulatedEnvironment, ...] = DEMO_ENVIRONMENTS
    activate_script: dict[str, list[str]] = field(default_factory=dict)

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
        for name in ("create_script", "activate_script"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must map a substring to a list of actions")
        # `create:` and `activate:` entries of `script` (a --script file's) are CreateConnection's
        # and ActivateUser's.
        self.create_script = _prefixed_script(
            "create_script", self.create_script, self.script, CREATE_SCRIPT_PREFIX
        )
        self.activate_script = _prefixed_script(
            "activate_script", self.activate_script, self.script, ACTIVATE_SCRIPT_PREFIX
        )
        initialise = [(k, v) for k, v in self.script.items() if not _is_prefixed_key(k)]
        self.script = _checked_script("script", initialise, SCRIPT_ACTIONS)
        self._check_environments()

    def _check_environments(self) -> None:
        """Each environment's systems are connectors of its organisation; ids and templates are
        each in one environment only. The default (DEMO_ENVIRONMENTS) is kept only if DEMO_CRM
        is among the connectors."""
        known = {(c.organisation_id, c.connector_id) for c in self.connectors}
        if self.environments is DEMO_ENVIRONMENTS:
            self.environments = tuple(
                environment
                for environment in DEMO_ENVIRONMENTS
                if all((environment.organisation_id, s) in known for s, _ in environment.systems)
            )
            return
        self.environments = tuple(self.environments)
        ids: set[str] = set()
        templates: set[str] = set()
        for environment in self.environments:
            if not isinstance(environment, EmulatedEnvironment):
                raise ValueError("environments must hold EmulatedEnvironment instances")
            if environment.environment_id in ids:
                raise ValueError(
                    f"environments holds environment {environment.environment_id} more than once"
                )
            ids.add(environment.environment_id)
            for system_id, template_id in environment.systems:
                if (environment.organisation_id, system_id) not in known:
                    raise ValueError(
                        f"environment {environment.environment_id} names system {system_id}, "
                        f"which is not a connector of organisation {environment.organisation_id}"
                    )
                if template_id in templates:
                    raise ValueError(
                        f"connection template {template_id} is in more than one environment"
                    )
                templates.add(template_id)


def _is_prefixed_key(key: object) -> bool:
    return isinstance(key, str) and key.startswith((CREATE_SCRIPT_PREFIX, ACTIVATE_SCRIPT_PREFIX))


_PREFIXED_ACTIONS = {
    CREATE_SCRIPT_PREFIX: CREATE_SCRIPT_ACTIONS,
    ACTIVATE_SCRIPT_PREFIX: ACTIVATE_SCRIPT_ACTIONS,
}


def _prefixed_script(
    name: str, own: dict[str, list[str]], script: dict[str, list[str]], prefix: str
) -> dict[str, list[str]]:
    """A script of its own (`own`, checked as `name`) plus `script`'s `prefix` entries (checked
    as "script"), the prefix taken off their keys."""
    known = _PREFIXED_ACTIONS[prefix]
    merged = _checked_script(name, own.items(), known)
    prefixed = [(k, v) for k, v in script.items() if isinstance(k, str) and k.startswith(prefix)]
    for pattern, actions in _checked_script("script", prefixed, known).items():
        merged[pattern.removeprefix(prefix)] = actions
    if "" in merged:
        raise ValueError(f"script key {prefix!r} needs a substring after it")
    return merged


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
    substring of the externalId or connection name; CREATE_SCRIPT_ACTIONS), a key
    `activate:<substring>` ActivateUser (a substring of the userId or the end user's externalId;
    ACTIVATE_SCRIPT_ACTIONS). Bare numbers
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
