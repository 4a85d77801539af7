"""The ledger: one onboarding record per (tenant_id, connector_id), in SQLite or PostgreSQL.

It makes every run idempotent (a re-run skips tenants with a live link and retries the rest) and
answers "which tenant owns this state?" for the app's OAuth callback. Every write is one
statement in its own transaction, so a crash never leaves a half-written row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    String,
    bindparam,
    case,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from onboarding.clock import utcnow
from onboarding.db_url import redact, scrub
from onboarding.errors import InputError, LedgerSchemaError
from onboarding.group_commit import GroupCommit
from onboarding.ledger_schema import (
    DONE_STATUSES,
    LIVE_STATUSES,
    SENDING_CHANNELS,
    Status,
    batch_chunks,
    create_private_sqlite_file,
    migrate_schema,
    records,
    sqlite_pragmas,
    state_digest,
    superseded_links,
)

# What the ledger's users need, its tables and statuses included (onboarding/ledger_schema.py).
__all__ = [
    "DONE_STATUSES",
    "EXPORT_KEYS",
    "LIVE_STATUSES",
    "SENDING_CHANNELS",
    "ConnectOutcome",
    "ConnectResult",
    "Ledger",
    "Record",
    "Status",
    "SupersededLink",
    "batch_chunks",
    "records",
    "state_digest",
    "superseded_links",
]

log = logging.getLogger(__name__)
IN_LIST_MAX = 900


@dataclass(frozen=True)
class SupersededLink:
    state: str
    tenant_id: str
    connector_id: str
    created_at: datetime | None
    superseded_at: datetime


@dataclass(frozen=True)
class Record:
    tenant_id: str
    connector_id: str
    profile: str
    tenant_name: str
    admin_email: str
    status: Status
    url: str | None
    state: str | None
    created_at: datetime | None
    expires_at: datetime | None
    delivered_at: datetime | None
    connected_at: datetime | None
    delivery_channel: str | None
    attempts: int
    error_code: str | None
    error_message: str | None
    run_id: str | None
    updated_at: datetime
    tenant_fields: dict[str, str] | None = None
    message_id: str | None = None
    last_sent_at: datetime | None = None
    reminders: int = 0
    connection_id: str | None = None
    # Derived from `state` (see state_digest): not part of a record's identity.
    state_hash: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Any) -> Record:
        values = dict(row._mapping)
        for key in _DATETIME_COLUMNS:
            values[key] = _aware(values[key])
        values["status"] = Status(values["status"])
        values["reminders"] = values["reminders"] or 0
        return cls(**values)


_DATETIME_COLUMNS = (
    "created_at",
    "expires_at",
    "delivered_at",
    "connected_at",
    "updated_at",
    "last_sent_at",
)


# What record_link writes, keys first.
_LINK_COLUMNS = (
    "tenant_id",
    "connector_id",
    "profile",
    "tenant_name",
    "admin_email",
    "status",
    "url",
    "state",
    "created_at",
    "expires_at",
    "delivered_at",
    "delivery_channel",
    "run_id",
    "updated_at",
    "tenant_fields",
    "state_hash",
)


EXPORT_KEYS = (
    "tenant_id",
    "connector_id",
    "status",
    "url",
    "state",
    "created_at",
    "expires_at",
    "attempts",
    "error_code",
    "error_message",
)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything written here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _utc(value: datetime) -> datetime:
    # SQLite stores the wall time and drops the offset, so a +02:00 time must become UTC first.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Query keys whose value is a secret (libpq's `password`, `sslpassword`, a driver's `pwd`...).
def _lock_key(tenant_id: str, connector_id: str) -> int:
    """A tenant's PostgreSQL advisory lock key (64 bits; one key space, see _MIGRATION_LOCK)."""
    digest = hashlib.sha256(f"{tenant_id}\0{connector_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ConnectOutcome(StrEnum):
    CONNECTED = "connected"  # recorded now
    UNKNOWN = "unknown"  # no tenant was ever given this state
    SUPERSEDED = "superseded"  # a newer link replaced it
    EXPIRED = "expired"  # its link is past its expiry
    USED = "used"  # the tenant is connected already: a state is accepted once


@dataclass(frozen=True)
class ConnectResult:
    outcome: ConnectOutcome
    record: Record | None = None
    superseded: SupersededLink | None = None


class Ledger:
    """Reads and writes onboarding records. Thread-safe: share one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._link_sql: tuple[Any, Any] | None = None
        self._links = GroupCommit(self._write_links)
        try:
            # hide_parameters: a failed statement must not print the link it was writing.
            kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
            if url.startswith("sqlite"):
                kwargs = {
                    "hide_parameters": True,
                    "connect_args": {"check_same_thread": False, "timeout": 30},
                }
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as err:
            raise InputError(
                f"ONBOARD_DB_URL {redact(url)!r} is not a usable database URL "
                f"({scrub(str(err), url)}); use sqlite:///path/to/onboarding.db or "
                "postgresql+psycopg://user@host:5432/db"
            ) from None
        self.postgres = self.engine.dialect.name == "postgresql"
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", sqlite_pragmas)
            create_private_sqlite_file(url)
        else:
            event.listen(self.engine, "handle_error", _hide_failing_row)
        self._insert = postgresql.insert if self.postgres else sqlite.insert
        try:
            with self.engine.connect():
                pass
        except DBAPIError as err:  # unreachable, refused, or a bad option in the URL's query
            self.engine.dispose()
            raise InputError(
                f"cannot open the ledger at {redact(url)}: {scrub(str(err.orig), url)}; "
                "check ONBOARD_DB_URL"
            ) from None
        try:
            migrate_schema(self.engine)
        except DBAPIError as err:  # it answered: the schema is what failed, not the input
            self.engine.dispose()
            raise LedgerSchemaError(
                f"cannot create or update the ledger's tables at {redact(url)}: "
                f"{scrub(str(err.orig), url)}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    def _upsert(self, key: dict[str, str], insert: dict[str, Any], update: dict[str, Any]) -> None:
        """Insert, or update a row that is not connected (connected is final)."""
        stmt = self._insert(records).values(**key, **insert)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant_id", "connector_id"],
            set_=update,
            where=records.c.status != Status.CONNECTED.value,
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def record_link(
        self,
        *,
        tenant_id: str,
        connector_id: str,
        profile: str,
        tenant_name: str,
        admin_email: str,
        url: str,
        state: str,
        created_at: datetime,
        expires_at: datetime,
        run_id: str | None = None,
        delivered_by: str | None = None,
        tenant_fields: dict[str, str] | None = None,
    ) -> None:
        """A fresh link: status link_created, error cleared, one more attempt counted. The
        state it replaces, if any, goes to the history in the same transaction, so every state
        Versori returned is either the tenant's current one or in its history, whatever other
        processes write at the same time (see _write_links).

        A connected tenant keeps its row (connected is final): the new state goes straight to
        the history, so a callback with it is refused as superseded.

        With `delivered_by` (a channel that delivers by storing, like "store") the row goes
        straight to delivered in the same statement: one write per tenant, not two."""
        values = {
            "tenant_id": tenant_id,
            "connector_id": connector_id,
            "profile": profile,
            "tenant_name": tenant_name,
            "admin_email": admin_email,
            "status": (Status.DELIVERED if delivered_by else Status.LINK_CREATED).value,
            "url": url,
            "state": state,
            "created_at": _utc(created_at),
            "expires_at": _utc(expires_at),
            "delivered_at": _utc(created_at) if delivered_by else None,
            "delivery_channel": delivered_by,
            "run_id": run_id,
            "updated_at": utcnow(),
            "tenant_fields": tenant_fields,
            "state_hash": state_digest(state),
        }
        self._links.write(values)

    def _write_links(self, rows: list[dict[str, Any]]) -> None:
        """One transaction for a group of record_link calls: their old states to the history,
        then their rows (see GroupCommit).

        The history statement reads each tenant's current state, and the upsert replaces it;
        another process writing the same tenant in between would lose a state. So the two run
        under the tenant's lock: on PostgreSQL an advisory lock per tenant, taken first, in
        key order (no deadlock between groups), which also covers a tenant with no row yet
        (SELECT ... FOR UPDATE locks only rows that exist); on SQLite the history statement
        is a write, so the transaction holds the database's write lock from its start."""
        supersede, upsert = self._link_statements()
        with self.engine.begin() as conn:
            if self.postgres:
                self._lock_tenants(conn, [(r["tenant_id"], r["connector_id"]) for r in rows])
            conn.execute(supersede, rows)
            conn.execute(upsert, rows)

    @staticmethod
    def _lock_tenants(conn: Connection, keys: list[tuple[str, str]]) -> None:
        """PostgreSQL: each tenant's advisory lock, held to the end of the transaction."""
        ordered = sorted({_lock_key(t, c) for t, c in keys})
        conn.execute(
            text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
            {"keys": ordered},
        )

    def _link_statements(self) -> tuple[Any, Any]:
        """record_link's two statements, built once per ledger: building and hashing a
        statement of this size cost more CPU than the rest of a tenant's path together
        (bench/run.py under py-spy), so each call only binds new values to them."""
        if self._link_sql is None:
            now: Any = bindparam("updated_at", type_=DateTime(timezone=True))
            connected = records.c.status == Status.CONNECTED.value
            # The state that leaves: the current one; for a connected tenant (whose row stays)
            # the new one.
            current = select(
                case((connected, bindparam("state", type_=String)), else_=records.c.state),
                case(
                    (connected, bindparam("state_hash", type_=String)),
                    else_=records.c.state_hash,
                ),
                records.c.tenant_id,
                records.c.connector_id,
                case(
                    (connected, bindparam("created_at", type_=DateTime(timezone=True))),
                    else_=records.c.created_at,
                ),
                now,
            ).where(
                records.c.tenant_id == bindparam("tenant_id"),
                records.c.connector_id == bindparam("connector_id"),
                records.c.state.is_not(None),
                records.c.state != bindparam("state"),
            )
            supersede = (
                self._insert(superseded_links)
                .from_select(
                    [
                        "state",
                        "state_hash",
                        "tenant_id",
                        "connector_id",
                        "created_at",
                        "superseded_at",
                    ],
                    current,
                )
                .on_conflict_do_nothing()
            )
            insert = self._insert(records).values(
                {**{name: bindparam(name) for name in _LINK_COLUMNS}, "attempts": 1}
            )
            cleared = dict.fromkeys(
                (
                    "last_sent_at",
                    "message_id",
                    "connected_at",
                    "connection_id",
                    "error_code",
                    "error_message",
                )
            )
            upsert = insert.on_conflict_do_update(
                index_elements=["tenant_id", "connector_id"],
                set_={
                    **{name: insert.excluded[name] for name in _LINK_COLUMNS[2:]},
                    **cleared,
                    # A caller that does not know the tenant's fields keeps the stored ones.
                    "tenant_fields": func.coalesce(
                        insert.excluded.tenant_fields, records.c.tenant_fields
                    ),
                    "attempts": records.c.attempts + 1,
                },
                where=~connected,
            )
            self._link_sql = (supersede, upsert)
        return self._link_sql

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
        self._upsert(
            {"tenant_id": tenant_id, "connector_id": connector_id},
            {**values, "attempts": step},
            {**values, "attempts": records.c.attempts + step},
        )

    def _update(self, tenant_id: str, connector_id: str, state: str | None, **values: Any) -> bool:
        """Update a row that is not connected (connected is final) and, with `state`, still
        holds that state (a write about a link must not land on the link that replaced it).
        Whether a row was written."""
        where = [
            records.c.tenant_id == tenant_id,
            records.c.connector_id == connector_id,
            records.c.status != Status.CONNECTED.value,
        ]
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
        count_attempt: bool = False,
        state: str | None = None,
    ) -> bool:
        """`count_attempt`: this write ends an attempt that recorded nothing else (it reused a
        stored link), so it counts it. `state`: the state of the link delivered, if known.
        False, and nothing written, when the tenant is connected or holds another state."""
        when = _utc(at or utcnow())
        return self._mark_sent(
            tenant_id,
            connector_id,
            state,
            Status.DELIVERED,
            channel,
            when,
            count_attempt,
            delivered_at=when,
        )

    def mark_sending(
        self, tenant_id: str, connector_id: str, *, message_id: str, state: str | None = None
    ) -> bool:
        """Written before the SMTP transaction: a row left `sending` marks the one window in
        which a crash can lead to a second copy of the same message (same Message-ID).
        False, and nothing written, when the tenant is connected or holds another state."""
        return self._update(
            tenant_id, connector_id, state, status=Status.SENDING.value, message_id=message_id
        )

    def mark_reminded(
        self,
        tenant_id: str,
        connector_id: str,
        *,
        channel: str,
        at: datetime | None = None,
        count_attempt: bool = False,
        state: str | None = None,
    ) -> bool:
        """False, and nothing written, when the tenant is connected or holds another state."""
        return self._mark_sent(
            tenant_id,
            connector_id,
            state,
            Status.REMINDED,
            channel,
            _utc(at or utcnow()),
            count_attempt,
            reminders=records.c.reminders + 1,
        )

    def _mark_sent(
        self,
        tenant_id: str,
        connector_id: str,
        state: str | None,
        status: Status,
        channel: str,
        when: datetime,
        count_attempt: bool,
        **more: Any,
    ) -> bool:
        """A message went out (a first delivery or a reminder): errors cleared."""
        return self._update(
            tenant_id,
            connector_id,
            state,
            attempts=records.c.attempts + int(count_attempt),
            status=status.value,
            delivery_channel=channel,
            last_sent_at=when,
            error_code=None,
            error_message=None,
            **more,
        )

    def mark_connected(
        self, tenant_id: str, connector_id: str, *, connection_id: str | None, at: datetime
    ) -> bool:
        """Connect a tenant that is not connected yet, whatever its link (an operator's
        override; a callback goes through connect_state, which checks the state). False when
        it was connected already: that connection stays as it is."""
        return self._update(
            tenant_id,
            connector_id,
            None,
            status=Status.CONNECTED.value,
            connection_id=connection_id,
            connected_at=_utc(at),
            error_code=None,
            error_message=None,
        )

    def connect_state(
        self, state: str, *, connection_id: str | None, at: datetime | None = None
    ) -> ConnectResult:
        """A callback's state: connect the tenant that holds it, once. Refused (nothing
        written) for a state no tenant holds now (unknown, or superseded by a newer link),
        for a link past its expiry or marked expired, and for a tenant connected already, so
        that a replayed state cannot rebind a tenant to another connection. Looked up by the
        state's hash; one conditional UPDATE decides, so two callbacks at once connect once."""
        digest = state_digest(state)
        when = _utc(at or utcnow())
        accepts = (
            records.c.state_hash == digest,
            records.c.status.not_in([Status.CONNECTED.value, Status.EXPIRED.value]),
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
                return ConnectResult(ConnectOutcome.SUPERSEDED, superseded=_superseded(old))
            key = (row.tenant_id, row.connector_id)
            if self.postgres:  # the lock record_link takes: no re-issue half-way through
                self._lock_tenants(conn, [key])
            done = conn.execute(
                records.update()
                .where(records.c.tenant_id == key[0], records.c.connector_id == key[1], *accepts)
                .values(
                    status=Status.CONNECTED.value,
                    connection_id=connection_id,
                    connected_at=when,
                    error_code=None,
                    error_message=None,
                    updated_at=utcnow(),
                )
            )
            now_row = conn.execute(
                select(records).where(
                    records.c.tenant_id == key[0], records.c.connector_id == key[1]
                )
            ).first()
        record = Record.from_row(now_row) if now_row is not None else None
        if done.rowcount:
            return ConnectResult(ConnectOutcome.CONNECTED, record)
        if record is None or record.state_hash != digest:
            return ConnectResult(ConnectOutcome.SUPERSEDED, record)  # replaced meanwhile
        if record.status is Status.CONNECTED:
            return ConnectResult(ConnectOutcome.USED, record)
        return ConnectResult(ConnectOutcome.EXPIRED, record)

    def reset(self, tenant_id: str, connector_id: str) -> bool:
        """An operator's reset of a tenant, connected or not: back to pending, its link
        retired to the history (its state is refused from now on), ready for a new link."""
        with self.engine.begin() as conn:
            if self.postgres:
                self._lock_tenants(conn, [(tenant_id, connector_id)])
            key = (records.c.tenant_id == tenant_id, records.c.connector_id == connector_id)
            row = conn.execute(select(records).where(*key)).first()
            if row is None:
                return False
            if row.state is not None:
                conn.execute(
                    self._insert(superseded_links)
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
                    url=None,
                    state=None,
                    state_hash=None,
                    expires_at=None,
                    delivered_at=None,
                    connected_at=None,
                    connection_id=None,
                    message_id=None,
                    last_sent_at=None,
                    reminders=0,
                    updated_at=utcnow(),
                )
            )
        return True

    def expire_links(self, connector_id: str, now: datetime) -> list[str]:
        """Mark every link past its time and not connected `expired`; return their tenants."""
        past = (
            records.c.connector_id == connector_id,
            records.c.status.in_([s.value for s in LIVE_STATUSES]),
            records.c.expires_at <= _utc(now),
        )
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(records.c.tenant_id).where(*past)).scalars())
            for start in range(0, len(ids), IN_LIST_MAX):  # SQLite caps bound parameters
                conn.execute(
                    records.update()
                    .where(*past, records.c.tenant_id.in_(ids[start : start + IN_LIST_MAX]))
                    .values(status=Status.EXPIRED.value, updated_at=utcnow())
                )
        return ids

    def due_for_reminder(
        self, connector_id: str, *, sent_before: datetime, max_reminders: int
    ) -> list[Record]:
        """Tenants sent a link by email, not connected, last sent before `sent_before`, and
        reminded fewer than `max_reminders` times, oldest first."""
        last_sent = func.coalesce(records.c.last_sent_at, records.c.delivered_at)
        query = (
            select(records)
            .where(
                records.c.connector_id == connector_id,
                records.c.status.in_(
                    [Status.DELIVERED.value, Status.REMINDED.value, Status.EXPIRED.value]
                ),
                records.c.delivery_channel.in_(SENDING_CHANNELS),
                records.c.reminders < max_reminders,
                last_sent <= _utc(sent_before),
            )
            .order_by(last_sent, records.c.tenant_id)
        )
        with self.engine.connect() as conn:
            return [Record.from_row(row) for row in conn.execute(query)]

    def find_superseded(self, state: str) -> SupersededLink | None:
        query = select(superseded_links).where(superseded_links.c.state_hash == state_digest(state))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _superseded(row) if row is not None else None

    def get(self, tenant_id: str, connector_id: str) -> Record | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(records).where(
                    records.c.tenant_id == tenant_id, records.c.connector_id == connector_id
                )
            ).first()
        return Record.from_row(row) if row else None

    def find_by_state(self, state: str) -> Record | None:
        """The tenant holding `state` now, looked up by the state's hash."""
        query = select(records).where(records.c.state_hash == state_digest(state))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Record.from_row(row) if row else None

    def ids_needing_nothing(
        self,
        connector_id: str,
        now: datetime | None = None,
        only_ids: Collection[str] | None = None,
    ) -> set[str]:
        """Tenants that need nothing from a new run: connected, or holding an unexpired link
        that was delivered. With `only_ids`, only those of these ids (a chunk's)."""
        now = _utc(now or utcnow())
        query = select(records.c.tenant_id).where(
            records.c.connector_id == connector_id,
            (records.c.status == Status.CONNECTED.value)
            | (
                records.c.status.in_([s.value for s in DONE_STATUSES])
                & (records.c.expires_at > now)
            ),
        )
        with self.engine.connect() as conn:
            if only_ids is None:
                return set(conn.execute(query).scalars())
            ids, live = list(only_ids), set[str]()
            for start in range(0, len(ids), IN_LIST_MAX):  # SQLite caps bound parameters
                part = ids[start : start + IN_LIST_MAX]
                live.update(conn.execute(query.where(records.c.tenant_id.in_(part))).scalars())
            return live

    def record_chunk(
        self, batch_id: str, chunk: int, flow_run_id: str | None, summary: dict[str, Any]
    ) -> None:
        """A chunk's summary, once it has run; a second write of the same chunk replaces it."""
        values = {"flow_run_id": flow_run_id, "summary": summary, "finished_at": utcnow()}
        stmt = self._insert(batch_chunks).values(batch_id=batch_id, chunk=chunk, **values)
        stmt = stmt.on_conflict_do_update(index_elements=["batch_id", "chunk"], set_=values)
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def chunk_summary(self, batch_id: str, chunk: int) -> dict[str, Any] | None:
        query = select(batch_chunks.c.summary).where(
            batch_chunks.c.batch_id == batch_id, batch_chunks.c.chunk == chunk
        )
        with self.engine.connect() as conn:
            summary = conn.execute(query).scalar_one_or_none()
        return dict(summary) if summary is not None else None

    def forget_batch(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(batch_chunks.delete().where(batch_chunks.c.batch_id == batch_id))

    def forget_chunks_before(self, when: datetime) -> int:
        """Chunk summaries of batches whose parent never came back for them (it was killed)."""
        with self.engine.begin() as conn:
            done = conn.execute(batch_chunks.delete().where(batch_chunks.c.finished_at < when))
        return int(done.rowcount or 0)

    def counts_by_status(self, connector_id: str | Sequence[str] | None = None) -> dict[str, int]:
        query = select(records.c.status, func.count()).group_by(records.c.status)
        if connector_id:
            query = query.where(_of_connectors(connector_id))
        with self.engine.connect() as conn:
            return {status: count for status, count in conn.execute(query)}

    def connector_ids(self) -> list[str]:
        """Every connector (or system) id the ledger holds records of."""
        query = select(records.c.connector_id).distinct().order_by(records.c.connector_id)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def connection_coverage(self, connector_ids: Sequence[str]) -> dict[str, int]:
        """Over the tenants the ledger holds for any of `connector_ids`: how many are connected
        to all of them (fully), to some (partly), to none."""
        ids = list(dict.fromkeys(connector_ids))
        connected = func.sum(case((records.c.status == Status.CONNECTED.value, 1), else_=0))
        per_tenant = (
            select(connected.label("n"))
            .where(records.c.connector_id.in_(ids))
            .group_by(records.c.tenant_id)
            .subquery()
        )
        query = select(
            func.count(),
            func.coalesce(func.sum(case((per_tenant.c.n >= len(ids), 1), else_=0)), 0),
            func.coalesce(func.sum(case((per_tenant.c.n == 0, 1), else_=0)), 0),
        ).select_from(per_tenant)
        with self.engine.connect() as conn:
            total, fully, none = conn.execute(query).one()
        return {"fully": int(fully), "partly": int(total - fully - none), "none": int(none)}

    def count_past_expiry(self, connector_id: str | Sequence[str] | None, now: datetime) -> int:
        """Links handed out but not connected whose time is up (stale, whatever their status)."""
        query = select(func.count()).where(
            records.c.status.in_([s.value for s in LIVE_STATUSES]),
            records.c.expires_at <= _utc(now),
        )
        if connector_id:
            query = query.where(_of_connectors(connector_id))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def iter_records(self, connector_id: str | Sequence[str] | None = None) -> Iterator[Record]:
        """Every record (of these connectors), one per (tenant, connector), streamed in tenant
        order, so an export of 100k rows stays small."""
        query = select(records).order_by(records.c.tenant_id, records.c.connector_id)
        if connector_id:
            query = query.where(_of_connectors(connector_id))
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
            for row in result:
                yield Record.from_row(row)


def _of_connectors(connector_id: str | Sequence[str]) -> Any:
    ids = [connector_id] if isinstance(connector_id, str) else list(connector_id)
    return records.c.connector_id.in_(ids)


def _superseded(row: Any) -> SupersededLink:
    values = dict(row._mapping)
    values.pop("state_hash", None)
    values["created_at"] = _aware(values["created_at"])
    values["superseded_at"] = _aware(values["superseded_at"])
    return SupersededLink(**values)


def _hide_failing_row(context: Any) -> None:
    # hide_parameters keeps SQLAlchemy from printing a statement's values, but PostgreSQL prints
    # them itself in a DETAIL line ("Failing row contains (..., url, state, ...)"). Drop it from
    # the driver's error and from SQLAlchemy's, which copied the text when it was made.
    for exc in (context.original_exception, context.sqlalchemy_exception):
        if exc is not None and exc.args and isinstance(exc.args[0], str):
            head, sep, _detail = exc.args[0].partition("\nDETAIL:")
            if sep:
                exc.args = (head + "\nDETAIL: (hidden: it may hold the link being written)",)
