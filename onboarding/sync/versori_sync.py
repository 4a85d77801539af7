"""`onboard sync`: each profile's tenants in the ledger compared with what Versori holds, and
the ledger brought in line (see reconcile.decide); tenants connected for every profile of an
environment activated (connections.activation).

Calls, for a Platform API v2 organisation: its end users, paged (once per organisation); each
environment's activations (one call); and, only for a tenant with an end user whose activation
does not hold this system's connection, that end user's connections in the system (paged).
So a sync of tenants that are all activated costs about users/100 + 1 calls, whatever the
roster; one of tenants connected but not activated, one more call each. For the Connect API
v1: the connector's connections, paged, matched by the connection's name (v1 has no end
users, no activations and no credential health: it knows connected and disconnected only).

Sync writes nothing to Versori but activations. Each ledger write is conditional on the record
being as sync read it, so it is safe beside a running batch and the connect service."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from onboarding import constants
from onboarding.clock import utcnow
from onboarding.connections.activation import (
    Activated,
    Wanted,
    activate,
    already_activated,
    wanted_of,
)
from onboarding.connections.record_connection import tenant_of
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Held, Ledger, Record, Status
from onboarding.sync.reconcile import Seen, SeenConnection, credential_problem, decide
from onboarding.versori.client import VersoriClient
from onboarding.versori.wire import ActivationResponse, ConnectionResponse


@dataclass(frozen=True)
class SyncChange:
    """A tenant's status as sync changed it (or would, in a dry run)."""

    tenant_id: str
    connector_id: str
    profile: str
    before: Status
    after: Status
    connection_id: str | None = None
    reason: str | None = None
    error_code: str | None = None  # why, as a code (broken: credential_errors, ...)


@dataclass
class ProfileSync:
    """One profile's sync: its tenants, what changed, what raced (a write that did not land
    because the record changed meanwhile: the next sync reads it again)."""

    profile: str
    connector_id: str
    api: str
    tenants: int = 0
    changes: list[SyncChange] = field(default_factory=list)
    raced: int = 0
    # Its reads' share of the sync: Versori calls and seconds (activations come after, apart).
    versori_calls: int = 0
    seconds: float = 0.0


@dataclass
class SyncReport:
    profiles: list[ProfileSync]
    activations: list[tuple[str, Activated]] = field(default_factory=list)
    versori_calls: int = 0
    dry_run: bool = False
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None

    @property
    def changes(self) -> list[SyncChange]:
        return [c for p in self.profiles for c in p.changes]

    def counts(self) -> dict[str, int]:
        """How many changes went to each status (activations included)."""
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.after.value] = counts.get(change.after.value, 0) + 1
        return counts


def held_of(record: Record) -> Held:
    return Held(
        record.tenant_id,
        record.connector_id,
        record.profile,
        record.status,
        record.connection_id,
        record.end_user_id,
        record.activation_id,
        record.connected_at,
    )


def sync(
    ledger: Ledger,
    profiles: Sequence[ConnectorProfile],
    client_for: Callable[[ConnectorProfile], VersoriClient],
    *,
    dry_run: bool = False,
    concurrency: int = constants.DEFAULT_CONCURRENCY,
    now: Callable[[], datetime] = utcnow,
) -> SyncReport:
    """Sync every profile's tenants; then activate those connected for every profile of an
    environment (not in a dry run)."""
    report = SyncReport([], dry_run=dry_run)
    reader = _VersoriReader(concurrency)
    clients: list[VersoriClient] = []
    for profile in profiles:
        client = client_for(profile)
        clients.append(client)
        calls, started = client.calls, time.monotonic()
        synced = _sync_profile(ledger, profile, client, reader, dry_run, now())
        synced.versori_calls, synced.seconds = client.calls - calls, time.monotonic() - started
        report.profiles.append(synced)
    if not dry_run:
        for (org, env), group in _by_environment(profiles).items():
            client = client_for(group[0])
            activations = reader.activations(client, org, env)
            templates = {p.target_id: str(p.connection_template_id) for p in group}
            names = {p.target_id: p.name for p in group}
            report.activations += _activate_ready(
                ledger, client, org, env, templates, names, activations, now(), reader.concurrency
            )
    report.versori_calls = sum(c.calls for c in {id(c): c for c in clients}.values())
    report.finished_at = now()
    return report


def _sync_profile(
    ledger: Ledger,
    profile: ConnectorProfile,
    client: VersoriClient,
    reader: _VersoriReader,
    dry_run: bool,
    at: datetime,
) -> ProfileSync:
    result = ProfileSync(profile.name, profile.target_id, profile.api)
    # This profile's tenants only: another profile of the same system (another template or
    # environment) keeps its own (a renamed profile finds none of its old name's).
    records = [r for r in ledger.iter_records(profile.target_id) if r.profile == profile.name]
    result.tenants = len(records)
    seen = (
        _seen_v2(records, profile, client, reader, at)
        if profile.api == constants.PLATFORM_V2
        else _seen_v1(records, profile, client)
    )
    unchanged: list[tuple[str, str]] = []
    for record, view, end_user_id in seen:
        held = held_of(record)
        if end_user_id and not dry_run and record.end_user_id != end_user_id:
            ledger.note_end_user(record.tenant_id, end_user_id)
        settled = decide(held, view)
        if settled is None:
            unchanged.append((record.tenant_id, record.connector_id))
            continue
        if not dry_run and not ledger.settle(held, settled, at):
            result.raced += 1
            continue
        result.changes.append(
            SyncChange(
                record.tenant_id,
                record.connector_id,
                record.profile,
                record.status,
                settled.status,
                settled.connection_id,
                settled.error_message,
                settled.error_code,
            )
        )
    if not dry_run:
        ledger.note_checked(unchanged, at)
    return result


def _seen_v2(
    records: list[Record],
    profile: ConnectorProfile,
    client: VersoriClient,
    reader: _VersoriReader,
    at: datetime,
) -> Iterator[tuple[Record, Seen, str | None]]:
    org = profile.organisation_id
    users = reader.end_users(client, org)
    activations: dict[str, ActivationResponse] = {}
    if profile.environment_id is not None:
        activations = {
            a.user.external_id: a
            for a in reader.activations(client, org, str(profile.environment_id))
        }
    system = profile.target_id
    template = str(profile.connection_template_id or "")

    def mine(connections: Sequence[ConnectionResponse]) -> ConnectionResponse | None:
        for c in connections:
            if c.system_id and c.system_id.upper() != system.upper():
                continue
            if (
                template
                and c.connection_template_id
                and c.connection_template_id.upper() != (template.upper())
            ):
                continue
            return c
        return None

    # Activated tenants are known from the activation; the others ask for their connections
    # (in parallel: each is one paged GET).
    pending: list[tuple[Record, str]] = []
    for record in records:
        user_id = users.get(record.tenant_id)
        if user_id is None:
            yield record, Seen(None), None
            continue
        activation = activations.get(record.tenant_id)
        held = mine(activation.connections) if activation is not None else None
        if held is not None and activation is not None:
            yield record, Seen(_seen_connection(held, at), activation.id), user_id
        else:
            pending.append((record, user_id))
    with ThreadPoolExecutor(max_workers=reader.concurrency) as pool:
        found = pool.map(lambda p: client.connections_of(org, p[1], system), pending)
        for (record, user_id), connections in zip(pending, found, strict=True):
            connection = mine(connections)
            view = Seen(_seen_connection(connection, at) if connection else None)
            yield record, view, user_id


def _seen_v1(
    records: list[Record], profile: ConnectorProfile, client: VersoriClient
) -> Iterator[tuple[Record, Seen, str | None]]:
    by_name = {
        c.name: c for c in client.connector_connections(profile.organisation_id, profile.target_id)
    }
    for record in records:
        name = profile.connection_name_for(tenant_of(record).values)
        connection = by_name.get(name)
        yield record, Seen(SeenConnection(connection.id) if connection else None), None


def _seen_connection(connection: ConnectionResponse, at: datetime) -> SeenConnection:
    errors, expires_at = connection.credential_health()
    problem = credential_problem(errors, expires_at, at)
    if problem is None:
        return SeenConnection(connection.id)
    return SeenConnection(connection.id, broken=problem[1], broken_code=problem[0])


def _by_environment(
    profiles: Sequence[ConnectorProfile],
) -> dict[tuple[str, str], list[ConnectorProfile]]:
    groups: dict[tuple[str, str], list[ConnectorProfile]] = {}
    for profile in profiles:
        if profile.api == constants.PLATFORM_V2 and profile.environment_id is not None:
            key = (profile.organisation_id, str(profile.environment_id))
            groups.setdefault(key, []).append(profile)
    return groups


def _activate_ready(
    ledger: Ledger,
    client: VersoriClient,
    org: str,
    env: str,
    templates: dict[str, str],
    names: dict[str, str],
    activations: list[ActivationResponse],
    at: datetime,
    concurrency: int = 1,
) -> list[tuple[str, Activated]]:
    """Activate every tenant held for every connector of `templates` and not activated yet,
    `concurrency` at once (each tenant's activation is its own: one POST, and its lookup)."""
    by_user = {a.user.external_id: a for a in activations}
    tenants: dict[str, list[Held]] = {}
    for connector_id in templates:
        for record in ledger.iter_records(connector_id):
            if record.profile != names[connector_id]:
                continue
            tenants.setdefault(record.tenant_id, []).append(held_of(record))
    ready = [
        wanted
        for tenant_id, rows in tenants.items()
        if (wanted := wanted_of(tenant_id, rows, templates)) is not None
        and not already_activated(rows, wanted)
    ]

    def one(wanted: Wanted) -> tuple[str, Activated]:
        existing = by_user.get(wanted.tenant_id)
        return wanted.tenant_id, activate(
            client, ledger, org, env, wanted, existing=existing, now=at
        )

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, ready))


class _VersoriReader:
    """Versori's lists that serve several profiles, read once per sync: an organisation's end
    users, an environment's activations."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self._users: dict[str, dict[str, str]] = {}
        self._activations: dict[tuple[str, str], list[ActivationResponse]] = {}

    def end_users(self, client: VersoriClient, org: str) -> dict[str, str]:
        """externalId -> the end user's Versori id."""
        if org not in self._users:
            self._users[org] = {u.external_id: u.id for u in client.end_users(org)}
        return self._users[org]

    def activations(self, client: VersoriClient, org: str, env: str) -> list[ActivationResponse]:
        if (org, env) not in self._activations:
            self._activations[(org, env)] = client.environment_activations(org, env)
        return self._activations[(org, env)]
