"""A tenant activated on an environment (Platform API v2's ActivateUser) once it is connected
for every profile of that environment: from the connect service's callback and from sync.

Versori refuses an activation unless it names a connection for every system of the
environment, and (strictly read) refuses a second activation of the same end user. So: one
POST; a 409 is looked up (the activation made by a concurrent callback, or a stale one whose
connection was replaced, which is deleted and made again); any other refusal is noted on the
tenant's records with Versori's code, and the next sync tries again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from onboarding.clock import utcnow
from onboarding.errors import APIError, ConflictError, VersoriError
from onboarding.ledger import Held, Status, VersoriView
from onboarding.versori.client import VersoriClient
from onboarding.versori.wire import ActivationResponse


@dataclass(frozen=True)
class Wanted:
    """What an activation of one tenant must hold: per connector (system) id, its connection
    template and the tenant's connection."""

    tenant_id: str
    connections: Mapping[str, tuple[str, str]]  # system id -> (template id, connection id)

    def holds(self, activation: ActivationResponse) -> bool:
        """Whether `activation` holds every connection wanted."""
        held = {c.id.upper() for c in activation.connections}
        return all(conn.upper() in held for _, conn in self.connections.values())


@dataclass(frozen=True)
class Activated:
    """How an activation went: its id, or Versori's refusal (code, message)."""

    activation_id: str | None
    refused: tuple[str, str] | None = None
    connectors: tuple[str, ...] = ()


def wanted_of(
    tenant_id: str, records: Sequence[Held], templates: Mapping[str, str]
) -> Wanted | None:
    """The activation a tenant is ready for: every connector of `templates` (the environment's
    profiles: connector id -> template id) held (connected or activated) with a connection
    id; None while one is not."""
    by_connector = {r.connector_id: r for r in records}
    connections: dict[str, tuple[str, str]] = {}
    for connector_id, template_id in templates.items():
        record = by_connector.get(connector_id)
        if record is None or record.connection_id is None:
            return None
        if record.status not in (Status.CONNECTED, Status.ACTIVATED):
            return None
        connections[connector_id] = (template_id, record.connection_id)
    return Wanted(tenant_id, connections) if connections else None


def already_activated(records: Sequence[Held], wanted: Wanted) -> bool:
    """Every wanted record is activated by one activation already."""
    ids = {r.activation_id for r in records if r.connector_id in wanted.connections}
    return (
        len(ids) == 1
        and None not in ids
        and all(
            r.status is Status.ACTIVATED for r in records if r.connector_id in wanted.connections
        )
    )


def activate(
    client: VersoriClient,
    ledger: VersoriView,
    organisation_id: str,
    environment_id: str,
    wanted: Wanted,
    *,
    existing: ActivationResponse | None = None,
    now: datetime | None = None,
) -> Activated:
    """Activate `wanted.tenant_id` on the environment with its connections (or record the
    activation that holds them already), and write it to the ledger."""
    when = now or utcnow()
    if existing is not None and wanted.holds(existing):
        return _recorded(ledger, wanted, existing.id, when)
    try:
        if existing is not None:  # holds a connection that was replaced: made again
            client.delete_activation(organisation_id, environment_id, existing.id)
        made = client.activate_user(
            organisation_id,
            user_id=wanted.tenant_id,
            environment_id=environment_id,
            connections=list(wanted.connections.values()),
        )
    except ConflictError:
        return _look_up(client, ledger, organisation_id, environment_id, wanted, when)
    except APIError as err:
        return _refused(ledger, wanted, err.code, err.message)
    except VersoriError as err:
        return _refused(ledger, wanted, "unreachable", type(err).__name__)
    return _recorded(ledger, wanted, made.id, when)


def _look_up(
    client: VersoriClient,
    ledger: VersoriView,
    organisation_id: str,
    environment_id: str,
    wanted: Wanted,
    when: datetime,
) -> Activated:
    """After a 409: the tenant's activation that holds the connections (one made at the same
    time by another callback or sync), else one stale activation, deleted and made again."""
    try:
        found = client.user_activations(organisation_id, environment_id, wanted.tenant_id)
    except VersoriError as err:
        return _refused(ledger, wanted, "conflict", f"activation exists; lookup failed: {err}")
    for activation in found:
        if wanted.holds(activation):
            return _recorded(ledger, wanted, activation.id, when)
    if len(found) != 1:
        return _refused(ledger, wanted, "conflict", "Versori holds another activation")
    try:
        client.delete_activation(organisation_id, environment_id, found[0].id)
        made = client.activate_user(
            organisation_id,
            user_id=wanted.tenant_id,
            environment_id=environment_id,
            connections=list(wanted.connections.values()),
        )
    except APIError as err:
        return _refused(ledger, wanted, err.code, err.message)
    except VersoriError as err:
        return _refused(ledger, wanted, "unreachable", type(err).__name__)
    return _recorded(ledger, wanted, made.id, when)


def _recorded(ledger: VersoriView, wanted: Wanted, activation_id: str, when: datetime) -> Activated:
    by_connector = {c: conn for c, (_, conn) in wanted.connections.items()}
    landed = ledger.record_activation(wanted.tenant_id, by_connector, activation_id, when)
    return Activated(activation_id, connectors=tuple(landed))


def _refused(ledger: VersoriView, wanted: Wanted, code: str, message: str) -> Activated:
    ledger.note_activation_refused(wanted.tenant_id, list(wanted.connections), code, message)
    return Activated(None, refused=(code, message))
