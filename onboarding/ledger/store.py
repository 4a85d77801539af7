"""The ledger's writes: each is one statement (or one short transaction) of its own, and a
write about a tenant never lands on a connected tenant or on a link that replaced its own."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, exists, func, literal_column, or_, select, tuple_

from onboarding.clock import utcnow
from onboarding.ledger.connect_links import ConnectLinks
from onboarding.ledger.connect_states import ConnectStates
from onboarding.ledger.engine import lock_tenants, open_engine, reconnecting
from onboarding.ledger.group_commit import GroupCommit
from onboarding.ledger.link_sql import link_statements
from onboarding.ledger.queries import IN_LIST_MAX, LedgerQueries, in_parts, past_expiry
from onboarding.ledger.records import (
    ConnectOutcome,
    ConnectResult,
    Record,
    superseded_from_row,
    utc,
)
from onboarding.ledger.schema import (
    Status,
    batch_chunks,
    claims,
    paces,
    records,
    run_leases,
    state_digest,
    superseded_links,
    tenant_row,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant_id, connector_id)

# A run's lease on its claims (ONBOARD_RUN_LEASE_SECONDS): renewed every quarter of it, it
# lapses that long after the last renewal, so a run killed without letting go (SIGKILL, a lost
# machine) frees its tenants then. A run stalled longer than that (its renewals failing) may
# see a tenant of its own taken over; the ledger's own guards (a write about a link lands only
# on that link) still hold.
RUN_LEASE_SECONDS = 20.0


class Ledger(ConnectLinks, ConnectStates, LedgerQueries):
    """Reads and writes onboarding records (and connect links, see ConnectLinks). Thread-safe:
    share one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = open_engine(url)
        self.postgres = self.engine.dialect.name == "postgresql"
        # Only this ledger's dialect: PostgreSQL's takes 35-90 ms to import, which every
        # command on a SQLite ledger (`onboard status`) paid.
        dialect = "postgresql" if self.postgres else "sqlite"
        self._insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
        # Built once per ledger: see link_statements.
        self._link_sql = link_statements(self._insert)
        self._links = GroupCommit(self._write_links)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @reconnecting
    def _upsert(
        self,
        table: Table,
        key: dict[str, Any],
        values: dict[str, Any],
        update: dict[str, Any] | None = None,
        where: Any = None,
    ) -> None:
        """Insert a row of `table`, or update the one with its `key` (with `values`, or
        `update` when given; only where `where` holds)."""
        stmt = self._insert(table).values(**key, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_=values if update is None else update, where=where
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
            "created_at": utc(created_at),
            "expires_at": utc(expires_at),
            "delivered_at": utc(created_at) if delivered_by else None,
            "delivery_channel": delivered_by,
            "run_id": run_id,
            "updated_at": utcnow(),
            "tenant_fields": tenant_fields,
            "state_hash": state_digest(state),
        }
        self._links.write(values)

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
        supersede, upsert = self._link_sql
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
        self._upsert(
            records,
            {"tenant_id": tenant_id, "connector_id": connector_id},
            {**values, "attempts": step},
            {**values, "attempts": records.c.attempts + step},
            where=records.c.status != Status.CONNECTED.value,  # connected is final
        )

    @reconnecting
    def _update(self, tenant_id: str, connector_id: str, state: str | None, **values: Any) -> bool:
        """Update a row that is not connected (connected is final) and, with `state`, still
        holds that state (a write about a link must not land on the link that replaced it).
        Whether a row was written."""
        where = [*tenant_row(tenant_id, connector_id), records.c.status != Status.CONNECTED.value]
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
        state: str | None = None,
    ) -> bool:
        """False, and nothing written, when the tenant is connected or holds another state."""
        sent = _sent(Status.REMINDED, channel, utc(at or utcnow()))
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
        if record.status is Status.CONNECTED:
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

    def record_chunk(
        self, batch_id: str, chunk: int, flow_run_id: str | None, summary: dict[str, Any]
    ) -> None:
        """A chunk's summary, once it has run; a second write of the same chunk replaces it."""
        values = {"flow_run_id": flow_run_id, "summary": summary, "finished_at": utcnow()}
        self._upsert(batch_chunks, {"batch_id": batch_id, "chunk": chunk}, values)

    @reconnecting
    def forget_batch(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(batch_chunks.delete().where(batch_chunks.c.batch_id == batch_id))

    @reconnecting
    def forget_chunks_before(self, when: datetime) -> int:
        """Chunk summaries of batches whose parent never came back for them (it was killed)."""
        with self.engine.begin() as conn:
            done = conn.execute(batch_chunks.delete().where(batch_chunks.c.finished_at < when))
        return int(done.rowcount or 0)

    # Claims: who works on a tenant now (see schema.claims).

    @contextmanager
    def run_lease(self, run_id: str, seconds: float = RUN_LEASE_SECONDS) -> Iterator[None]:
        """Hold `run_id`'s lease while the block runs, renewed in the background (every
        quarter of `seconds`); on the way out, every claim of the run is let go and the lease
        dropped, so another run may take its tenants at once. Claims made without a lease are
        never valid to others."""
        self._renew_lease(run_id, seconds)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(seconds / 4):
                try:
                    self._renew_lease(run_id, seconds)
                except Exception as err:  # the next renewal tries again; the lease is long
                    log.warning("could not renew the run's ledger lease: %s", type(err).__name__)

        thread = threading.Thread(target=renew, name="ledger-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                self.end_run_lease(run_id)
            except Exception as err:  # its claims lapse with the lease anyway
                log.warning("could not let go of the run's claims: %s", type(err).__name__)

    def _renew_lease(self, run_id: str, seconds: float) -> None:
        until = utcnow() + timedelta(seconds=seconds)
        self._upsert(run_leases, {"run_id": run_id}, {"alive_until": until})

    @reconnecting
    def end_run_lease(self, run_id: str) -> None:
        """Let go of every claim of `run_id` and drop its lease."""
        with self.engine.begin() as conn:
            conn.execute(claims.delete().where(claims.c.run_id == run_id))
            conn.execute(run_leases.delete().where(run_leases.c.run_id == run_id))

    @reconnecting
    def claim(self, run_id: str, keys: Collection[Key], now: datetime | None = None) -> set[Key]:
        """Claim each (tenant, connector) of `keys` for `run_id`: one it holds already, one
        nobody holds, or one whose holder's lease has lapsed. Returns the keys `run_id` holds
        now; the others are another live run's. One statement decides each key, so two runs
        claiming the same tenant at once never both get it."""
        if not keys:
            return set()
        when = utc(now or utcnow())
        holder_alive = exists().where(
            run_leases.c.run_id == claims.c.run_id, run_leases.c.alive_until > when
        )
        # Three statements, not one upsert: an executemany INSERT ... ON CONFLICT DO UPDATE
        # WHERE is sent by SQLAlchemy as one multi-row INSERT, which on SQLite took over 1 of
        # 100 lapsed claims (seen in the crash-resume test). On PostgreSQL the UPDATE's row
        # locks make a second claimer re-check the row after the first commits (READ
        # COMMITTED), so it finds the holder alive and leaves it.
        rows = [
            {"tenant_id": t, "connector_id": c, "run_id": run_id, "claimed_at": when}
            for t, c in keys
        ]
        parts = list(_parts(keys))
        held: set[Key] = set()
        with self.engine.begin() as conn:
            for part in parts:
                conn.execute(
                    claims.update()
                    .where(_CLAIM_KEY.in_(part), or_(claims.c.run_id == run_id, ~holder_alive))
                    .values(run_id=run_id, claimed_at=when)
                )
            conn.execute(self._insert(claims).on_conflict_do_nothing(), rows)
            for part in parts:
                query = select(claims.c.tenant_id, claims.c.connector_id).where(
                    claims.c.run_id == run_id, _CLAIM_KEY.in_(part)
                )
                held.update((t, c) for t, c in conn.execute(query))
        return held

    @reconnecting
    def release(self, run_id: str, keys: Collection[Key]) -> None:
        """Let go of `run_id`'s claims on `keys` (the tenants it has decided)."""
        with self.engine.begin() as conn:
            for part in _parts(keys):
                conn.execute(claims.delete().where(claims.c.run_id == run_id, _CLAIM_KEY.in_(part)))

    # Pacing: a profile's calls spaced across every process on this ledger.

    @reconnecting
    def reserve_calls(
        self, name: str, calls: int, interval: float, hold: float = 0.0
    ) -> tuple[float, float]:
        """Reserve the next `calls` call times of pace `name`, `interval` seconds apart, after
        any time another process reserved (and, with `hold`, no sooner than `hold` seconds
        from now). Returns when the first of them is and when the reservation was made, both
        on the database's clock.

        The virtual-scheduling form of GCRA, one UPDATE: every process's reservations are
        disjoint stretches of one timeline, so calls are spaced `interval` apart however many
        processes share the pace, and a process that was idle or stalled gets no catch-up
        burst (time that went by unused is never handed out). The database's clock is the
        timeline, so machines' clocks need not agree."""
        now = self._db_now()
        start = (func.greatest if self.postgres else func.max)(paces.c.next_at, now + hold)
        seed = self._insert(paces).values(name=name, next_at=0.0).on_conflict_do_nothing()
        stmt = (
            paces.update()
            .where(paces.c.name == name)
            .values(next_at=start + calls * interval)
            .returning(paces.c.next_at, now)
        )
        with self.engine.begin() as conn:
            conn.execute(seed)
            next_at, at = conn.execute(stmt).one()
        return float(next_at) - calls * interval, float(at)

    def _db_now(self) -> Any:
        if self.postgres:
            return func.extract("epoch", func.clock_timestamp())
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)")


def _sent(status: Status, channel: str, at: datetime) -> dict[str, Any]:
    """A message went out (a first delivery or a reminder): errors cleared."""
    return {
        "status": status.value,
        "delivery_channel": channel,
        "last_sent_at": at,
        "error_code": None,
        "error_message": None,
    }


def _connected(connection_id: str | None, at: datetime) -> dict[str, Any]:
    """A tenant's connection, its errors cleared."""
    return {
        "status": Status.CONNECTED.value,
        "connection_id": connection_id,
        "connected_at": at,
        "error_code": None,
        "error_message": None,
    }


# What a reset clears, besides the status and reminders.
_RESET_TO_NONE = (
    *("url", "state", "state_hash", "expires_at"),  # the link
    *("delivered_at", "message_id", "last_sent_at", "connected_at", "connection_id"),  # its fate
)

# A claim's (tenant, connector), for IN lists of keys.
_CLAIM_KEY = tuple_(claims.c.tenant_id, claims.c.connector_id)


def _parts(keys: Collection[Key]) -> Iterator[Sequence[Key]]:
    return in_parts(list(keys), IN_LIST_MAX // 2)  # two bound parameters a key
