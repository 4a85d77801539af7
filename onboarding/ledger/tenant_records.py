"""Tenant records: the ledger's writes about each (tenant, connector). Each is one statement (or
one short transaction) of its own, and a write about a tenant never lands on a connected
tenant or on a link that replaced its own. Their reads are in queries.RecordQueries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypedDict, Unpack

from sqlalchemy import Case, case, select

from onboarding.clock import utcnow
from onboarding.ledger.database import Database, Repository
from onboarding.ledger.engine import lock_tenants, reconnecting
from onboarding.ledger.group_commit import GroupCommit, Written
from onboarding.ledger.queries import HELD, RecordQueries, in_parts, past_expiry
from onboarding.ledger.records import (
    ConnectOutcome,
    ConnectResult,
    Record,
    superseded_from_row,
    utc,
)
from onboarding.ledger.schema import (
    HELD_STATUSES,
    LOST_STATUSES,
    Status,
    records,
    state_digest,
    superseded_links,
    tenant_row,
)


class _NewLinkFields(TypedDict):
    tenant_id: str
    connector_id: str
    profile: str
    tenant_name: str
    admin_email: str
    url: str
    state: str
    created_at: datetime
    expires_at: datetime


class NewLink(_NewLinkFields, total=False):
    """What record_link and submit_link take about a fresh link (their keyword arguments)."""

    run_id: str | None
    delivered_by: str | None
    tenant_fields: dict[str, str] | None


class TenantRecords(RecordQueries, Repository):
    """Reads and writes of onboarding records, one per (tenant, connector). Thread-safe."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # Links written at the same time by many threads go in one transaction.
        self._links = GroupCommit(self._write_links)

    def record_link(self, **link: Unpack[NewLink]) -> None:
        """A fresh link (see submit_link), committed before this returns."""
        self.submit_link(**link).wait()

    def submit_link(
        self, *, then: Callable[[], None] | None = None, **link: Unpack[NewLink]
    ) -> Written:
        """A fresh link, handed to the ledger's writer: returns at once; `wait()` on what it
        returns until the row is committed (it raises what kept the row out), and `then` is
        called once it is, never when it failed (record_link waits).

        A fresh link: status link_created, error cleared, one more attempt counted. The
        state it replaces, if any, goes to the history in the same transaction, so every state
        Versori returned is either the tenant's current one or in its history, whatever other
        processes write at the same time (see _write_links).

        A connected tenant keeps its row (connected is final): the new state goes straight to
        the history, so a callback with it is refused as superseded.

        With `delivered_by` (a channel that delivers by storing, like "store") the row goes
        straight to delivered in the same statement: one write per tenant, not two."""
        created_at, delivered_by = utc(link["created_at"]), link.get("delivered_by")
        values = {
            "tenant_id": link["tenant_id"],
            "connector_id": link["connector_id"],
            "profile": link["profile"],
            "tenant_name": link["tenant_name"],
            "admin_email": link["admin_email"],
            "status": (Status.DELIVERED if delivered_by else Status.LINK_CREATED).value,
            "url": link["url"],
            "state": link["state"],
            "created_at": created_at,
            "expires_at": utc(link["expires_at"]),
            "delivered_at": created_at if delivered_by else None,
            "delivery_channel": delivered_by,
            "run_id": link.get("run_id"),
            "updated_at": utcnow(),
            "tenant_fields": link.get("tenant_fields"),
            "state_hash": state_digest(link["state"]),
        }
        return self._links.submit(values, then)

    @reconnecting
    def _write_links(self, rows: list[dict[str, Any]]) -> None:
        """One transaction for a group of record_link calls: their old states to the history,
        then their rows (see GroupCommit).

        The history statement reads each tenant's current state, and the upsert replaces it;
        another process writing the same tenant in between would lose a state. So the two run
        under the tenant's lock: on PostgreSQL an advisory lock per tenant, taken first, in
        key order (no deadlock between groups), which also covers a tenant with no row yet
        (SELECT ... FOR UPDATE locks only rows that exist); on SQLite the history statement
        is a write, so the transaction holds the database's write lock from its start."""
        supersede, upsert = self.db.link_sql
        with self.engine.begin() as conn:
            lock_tenants(conn, [(r["tenant_id"], r["connector_id"]) for r in rows])
            conn.execute(supersede, rows)
            conn.execute(upsert, rows)

    def record_failure(
        self,
        *,
        tenant_id: str,
        connector_id: str,
        profile: str,
        tenant_name: str,
        admin_email: str,
        error_code: str,
        error_message: str,
        run_id: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        """Status failed with why. A link stored earlier stays in the row for history. A
        connected tenant stays connected."""
        values = {
            "profile": profile,
            "tenant_name": tenant_name,
            "admin_email": admin_email,
            "status": Status.FAILED.value,
            "error_code": error_code[:100],
            "error_message": error_message,
            "run_id": run_id,
            "updated_at": utcnow(),
        }
        step = 1 if count_attempt else 0
        self.db.upsert(
            records,
            {"tenant_id": tenant_id, "connector_id": connector_id},
            {**values, "attempts": step},
            {**values, "attempts": records.c.attempts + step},
            where=records.c.status.not_in(HELD),  # a working connection is final
        )

    @reconnecting
    def _update(self, tenant_id: str, connector_id: str, state: str | None, **values: Any) -> bool:
        """Update a row that is not connected (connected is final) and, with `state`, still
        holds that state (a write about a link must not land on the link that replaced it).
        Whether a row was written."""
        where = [*tenant_row(tenant_id, connector_id), records.c.status.not_in(HELD)]
        if state is not None:
            where.append(records.c.state_hash == state_digest(state))
        with self.engine.begin() as conn:
            done = conn.execute(
                records.update().where(*where).values(**values, updated_at=utcnow())
            )
        return bool(done.rowcount)

    def mark_delivered(
        self,
        tenant_id: str,
        connector_id: str,
        *,
        channel: str,
        at: datetime | None = None,
        state: str | None = None,
    ) -> bool:
        """`state`: the state of the link delivered, if known. False, and nothing written, when
        the tenant is connected or holds another state."""
        when = utc(at or utcnow())
        sent = _sent(Status.DELIVERED, channel, when)
        return self._update(tenant_id, connector_id, state, **sent, delivered_at=when)

    def mark_sending(
        self, tenant_id: str, connector_id: str, *, message_id: str, state: str | None = None
    ) -> bool:
        """Written before the SMTP transaction: a row left `sending` marks the one window in
        which a crash can lead to a second copy of the same message (same Message-ID).
        False, and nothing written, when the tenant is connected or holds another state. A
        broken or disconnected tenant keeps its status (its Message-ID is still written)."""
        return self._update(
            tenant_id,
            connector_id,
            state,
            status=_unless_lost(Status.SENDING),
            message_id=message_id,
        )

    def mark_reminded(
        self,
        tenant_id: str,
        connector_id: str,
        *,
        channel: str,
        at: datetime | None = None,
        state: str | None = None,
    ) -> bool:
        """False, and nothing written, when the tenant is connected or holds another state.
        A reconnect email leaves a broken or disconnected tenant so (its connection still does
        not work)."""
        sent: dict[str, Any] = _sent(Status.REMINDED, channel, utc(at or utcnow()))
        sent["status"] = _unless_lost(Status.REMINDED)
        return self._update(
            tenant_id, connector_id, state, **sent, reminders=records.c.reminders + 1
        )

    def mark_connected(
        self, tenant_id: str, connector_id: str, *, connection_id: str | None, at: datetime
    ) -> bool:
        """Connect a tenant that is not connected yet, whatever its link (an operator's
        override; a callback goes through connect_state, which checks the state). False when
        it was connected already: that connection stays as it is."""
        return self._update(tenant_id, connector_id, None, **_connected(connection_id, utc(at)))

    @reconnecting
    def connect_state(
        self, state: str, *, connection_id: str | None, at: datetime | None = None
    ) -> ConnectResult:
        """A callback's state: connect the tenant that holds it, once. Refused (nothing
        written) for a state no tenant holds now (unknown, or superseded by a newer link),
        for a link past its expiry or marked expired, and for a tenant connected already, so
        that a replayed state cannot rebind a tenant to another connection. Looked up by the
        state's hash; one conditional UPDATE decides, so two callbacks at once connect once."""
        digest = state_digest(state)
        when = utc(at or utcnow())
        accepts = (
            records.c.state_hash == digest,
            records.c.status.not_in([*HELD, Status.EXPIRED.value]),
            records.c.expires_at > when,
        )
        with self.engine.begin() as conn:
            row = conn.execute(select(records).where(records.c.state_hash == digest)).first()
            if row is None:
                old = conn.execute(
                    select(superseded_links).where(superseded_links.c.state_hash == digest)
                ).first()
                if old is None:
                    return ConnectResult(ConnectOutcome.UNKNOWN)
                return ConnectResult(ConnectOutcome.SUPERSEDED, superseded=superseded_from_row(old))
            key = tenant_row(row.tenant_id, row.connector_id)
            # The lock record_link takes: no re-issue half-way through.
            lock_tenants(conn, [(row.tenant_id, row.connector_id)])
            done = conn.execute(
                records.update()
                .where(*key, *accepts)
                .values(**_connected(connection_id, when), updated_at=utcnow())
            )
            now_row = conn.execute(select(records).where(*key)).first()
        record = Record.from_row(now_row) if now_row is not None else None
        if done.rowcount:
            return ConnectResult(ConnectOutcome.CONNECTED, record)
        if record is None or record.state_hash != digest:
            return ConnectResult(ConnectOutcome.SUPERSEDED, record)  # replaced meanwhile
        if record.status in HELD_STATUSES:
            return ConnectResult(ConnectOutcome.USED, record)
        return ConnectResult(ConnectOutcome.EXPIRED, record)

    @reconnecting
    def reset(self, tenant_id: str, connector_id: str) -> bool:
        """An operator's reset of a tenant, connected or not: back to pending, its link
        retired to the history (its state is refused from now on), ready for a new link."""
        with self.engine.begin() as conn:
            lock_tenants(conn, [(tenant_id, connector_id)])
            key = tenant_row(tenant_id, connector_id)
            row = conn.execute(select(records).where(*key)).first()
            if row is None:
                return False
            if row.state is not None:
                conn.execute(
                    self.db.insert(superseded_links)
                    .values(
                        state=row.state,
                        state_hash=row.state_hash or state_digest(row.state),
                        tenant_id=tenant_id,
                        connector_id=connector_id,
                        created_at=row.created_at,
                        superseded_at=utcnow(),
                    )
                    .on_conflict_do_nothing()
                )
            conn.execute(
                records.update()
                .where(*key)
                .values(
                    status=Status.PENDING.value,
                    reminders=0,
                    updated_at=utcnow(),
                    **dict.fromkeys(_RESET_TO_NONE),
                )
            )
        return True

    @reconnecting
    def expire_links(self, connector_id: str, now: datetime) -> list[str]:
        """Mark every link past its time and not connected `expired`; return their tenants."""
        past = (records.c.connector_id == connector_id, *past_expiry(now))
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(records.c.tenant_id).where(*past)).scalars())
            for part in in_parts(ids):
                conn.execute(
                    records.update()
                    .where(*past, records.c.tenant_id.in_(part))
                    .values(status=Status.EXPIRED.value, updated_at=utcnow())
                )
        return ids


def _sent(status: Status, channel: str, at: datetime) -> dict[str, Any]:
    """A message went out (a first delivery or a reminder): errors cleared."""
    return {
        "status": status.value,
        "delivery_channel": channel,
        "last_sent_at": at,
        "error_code": None,
        "error_message": None,
    }


def _unless_lost(status: Status) -> Case[str]:
    """`status`, unless the row is broken or disconnected: it stays so (its connection still
    does not work) while its reconnect email goes out."""
    lost = [s.value for s in LOST_STATUSES]
    return case((records.c.status.in_(lost), records.c.status), else_=status.value)


def _connected(connection_id: str | None, at: datetime) -> dict[str, Any]:
    """A tenant's connection, its errors cleared."""
    return {
        "status": Status.CONNECTED.value,
        "connection_id": connection_id,
        "connected_at": at,
        "error_code": None,
        "error_message": None,
        "reconnect_of": None,
    }


# What a reset clears, besides the status and reminders.
_RESET_TO_NONE = (
    *("url", "state", "state_hash", "expires_at"),  # the link
    *("delivered_at", "message_id", "last_sent_at", "connected_at", "connection_id"),  # its fate
)
