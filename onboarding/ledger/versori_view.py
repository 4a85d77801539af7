"""What `onboard sync` and activation write: the ledger brought in line with what Versori holds.

Each write is conditional on the row being as sync read it (its status and connection), so a
callback, a run or another sync that wrote the tenant in between wins, and the next sync reads
it again: sync is safe beside a running batch and the connect service."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, select

from onboarding.clock import utcnow
from onboarding.ledger.database import Repository
from onboarding.ledger.engine import reconnecting
from onboarding.ledger.queries import HELD, in_parts
from onboarding.ledger.records import aware, utc
from onboarding.ledger.schema import Status, records, tenant_row


@dataclass(frozen=True)
class Held:
    """A tenant record as sync reads it: what it must still be for sync's write to land."""

    tenant_id: str
    connector_id: str
    profile: str
    status: Status
    connection_id: str | None
    end_user_id: str | None
    activation_id: str | None
    connected_at: datetime | None


@dataclass(frozen=True)
class Settled:
    """What sync or activation decided for one record: its new status and the columns that go
    with it (only those named change)."""

    status: Status
    connection_id: str | None = None
    end_user_id: str | None = None
    activation_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    reconnect_of: str | None = None
    # Which of the optional columns above to write (the others keep their value).
    columns: tuple[str, ...] = ()


class VersoriView(Repository):
    """Sync's reads of the ledger, and its conditional writes."""

    @reconnecting
    def held(self, connector_id: str) -> list[Held]:
        """Every record of `connector_id`, as sync compares it with Versori."""
        c = records.c
        query = (
            select(
                c.tenant_id,
                c.connector_id,
                c.profile,
                c.status,
                c.connection_id,
                c.end_user_id,
                c.activation_id,
                c.connected_at,
            )
            .where(c.connector_id == connector_id)
            .order_by(c.tenant_id)
        )
        with self.engine.connect() as conn:
            return [
                Held(t, cid, p, Status(s), conn_id, user, act, aware(at))
                for t, cid, p, s, conn_id, user, act, at in conn.execute(query)
            ]

    @reconnecting
    def tenant_records(self, tenant_id: str) -> list[Held]:
        """Every connector's record of one tenant (what activation checks)."""
        c = records.c
        query = select(
            c.tenant_id,
            c.connector_id,
            c.profile,
            c.status,
            c.connection_id,
            c.end_user_id,
            c.activation_id,
            c.connected_at,
        ).where(c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return [
                Held(t, cid, p, Status(s), conn_id, user, act, aware(at))
                for t, cid, p, s, conn_id, user, act, at in conn.execute(query)
            ]

    @reconnecting
    def settle(self, was: Held, to: Settled, at: datetime | None = None) -> bool:
        """Write `to` on the record `was` describes, only if it still has `was`'s status and
        connection; whether it landed."""
        when = utc(at or utcnow())
        values: dict[str, object] = {"status": to.status.value, "updated_at": utcnow()}
        values["checked_at"] = when
        for name in to.columns:
            values[name] = getattr(to, name)
        if to.status in (Status.CONNECTED, Status.ACTIVATED) and was.connected_at is None:
            values["connected_at"] = when
        if to.status is Status.ACTIVATED and was.status is not Status.ACTIVATED:
            values["activated_at"] = when
        if to.status in (Status.BROKEN, Status.DISCONNECTED) and was.status in (
            Status.CONNECTED,
            Status.ACTIVATED,
        ):
            values["reminders"] = 0  # a reconnect email starts its own count
        guard: ColumnElement[bool] = records.c.connection_id.is_(None)
        if was.connection_id is not None:
            guard = records.c.connection_id == was.connection_id
        with self.engine.begin() as conn:
            done = conn.execute(
                records.update()
                .where(
                    *tenant_row(was.tenant_id, was.connector_id),
                    records.c.status == was.status.value,
                    guard,
                )
                .values(**values)
            )
        return bool(done.rowcount)

    @reconnecting
    def note_checked(self, keys: Sequence[tuple[str, str]], at: datetime | None = None) -> None:
        """When sync last read these records (those whose status did not change)."""
        when = utc(at or utcnow())
        tenants: dict[str, list[str]] = {}
        for tenant_id, connector_id in keys:
            tenants.setdefault(connector_id, []).append(tenant_id)
        with self.engine.begin() as conn:
            for connector_id, ids in tenants.items():
                for part in in_parts(ids):
                    conn.execute(
                        records.update()
                        .where(
                            records.c.connector_id == connector_id, records.c.tenant_id.in_(part)
                        )
                        .values(checked_at=when)
                    )

    @reconnecting
    def note_end_user(self, tenant_id: str, end_user_id: str) -> None:
        """The tenant's end user in Versori (its id), on every connector's record."""
        with self.engine.begin() as conn:
            conn.execute(
                records.update()
                .where(records.c.tenant_id == tenant_id, records.c.end_user_id.is_(None))
                .values(end_user_id=end_user_id)
            )

    @reconnecting
    def record_activation(
        self, tenant_id: str, connections: dict[str, str], activation_id: str, at: datetime
    ) -> list[str]:
        """The tenant's activation holds `connections` (connector id → connection id): each of
        those records still connected to that connection becomes `activated`. The connectors
        whose record it landed on."""
        landed: list[str] = []
        when = utc(at)
        with self.engine.begin() as conn:
            for connector_id, connection_id in connections.items():
                done = conn.execute(
                    records.update()
                    .where(
                        *tenant_row(tenant_id, connector_id),
                        records.c.status.in_(HELD),
                        records.c.connection_id == connection_id,
                    )
                    .values(
                        status=Status.ACTIVATED.value,
                        activation_id=activation_id,
                        activated_at=when,
                        error_code=None,
                        error_message=None,
                        updated_at=utcnow(),
                    )
                )
                if done.rowcount:
                    landed.append(connector_id)
        return landed

    @reconnecting
    def note_activation_refused(
        self, tenant_id: str, connector_ids: Sequence[str], code: str, message: str
    ) -> None:
        """Versori refused the tenant's activation: noted on its connected records (status
        kept), tried again by the next sync."""
        with self.engine.begin() as conn:
            for part in in_parts(list(connector_ids)):
                conn.execute(
                    records.update()
                    .where(
                        records.c.tenant_id == tenant_id,
                        records.c.connector_id.in_(part),
                        records.c.status == Status.CONNECTED.value,
                    )
                    .values(
                        error_code=f"activation_refused:{code}"[:100],
                        error_message=message,
                        updated_at=utcnow(),
                    )
                )


def keys_of(rows: Sequence[Held]) -> Iterator[tuple[str, str]]:
    return ((r.tenant_id, r.connector_id) for r in rows)
