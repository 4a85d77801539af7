"""Each OAuth state the connect service handed a browser, and what became of it: the step
between the provider's answer and Versori's connection, where a failure must neither lose the
connection nor make a second one.

A state is written when the link's button mints it (`record_minted_link`, with the link it came
from and the sha256 of the browser's binding cookie), claimed when its callback arrives
(`claim_state`: the row is `connecting` from then, with the time and the process), and finished
once Versori's answer is known (`finish_state`: connected with the connection's id, or not).
A claimed row that was never finished (a crash, a SIGTERM past its grace, a ledger outage) is
found by `unfinished_states` and resolved by asking Versori, not by guessing.

A state minted by a batch (an email that carries the raw authorize URL) has no row until its
callback claims it: it was never bound to a browser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any

from sqlalchemy import (
    Select,
    String,
    and_,
    bindparam,
    exists,
    func,
    literal,
    null,
    or_,
    select,
)

from onboarding.clock import utcnow
from onboarding.ledger.connect_links import (
    STAMP,
    DriverStatement,
    callback_states,
    connect_links,
    connect_states,
    prefixed,
    token_digest,
)
from onboarding.ledger.database import Database, Repository
from onboarding.ledger.engine import reconnecting
from onboarding.ledger.link_sql import among
from onboarding.ledger.queries import HELD
from onboarding.ledger.records import Record, aware_values, utc
from onboarding.ledger.schema import Status, records, state_digest, tenant_row


class StateOutcome(StrEnum):
    CONNECTED = "connected"  # Versori holds the connection: connection_id
    NOT_FOUND = "not_found"  # CreateConnection's answer was lost and Versori holds none
    FAILED = "failed"  # Versori refused it (the code, the body): a new state may try again
    DECLINED = "declined"  # the provider answered with an error


@dataclass(frozen=True)
class ConnectState:
    state_hash: str
    tenant_id: str
    connector_id: str
    link_hash: str | None
    browser_hash: str | None
    minted_at: datetime
    claimed_at: datetime | None
    claimed_by: str | None
    finished_at: datetime | None
    outcome: str | None
    connection_id: str | None
    # Whether the link that minted it was revoked since (read with it).
    link_revoked: bool = False

    @property
    def connecting(self) -> bool:
        return self.claimed_at is not None and self.finished_at is None

    @classmethod
    def from_row(cls, row: Any) -> ConnectState:
        return cls(**aware_values(row))


@dataclass(frozen=True)
class CallbackView:
    """What a callback reads, in one statement (ConnectStates.callback_view): its state's
    row (None for a batch's state, or an unknown one), the tenant holding the state now
    (None: superseded or unknown), the profile of the browser's own link when it is a live
    link of that tenant (`retry_path`, None otherwise), the profile of the tenant's latest
    link (`latest_path`), and whether this call claimed the state (`claimed`)."""

    state: ConnectState | None
    record: Record | None
    retry_path: str | None
    latest_path: str | None
    claimed: bool


class ConnectStates(Repository):
    """Connect states: a callback's claims and outcomes (one part of the ledger)."""

    @cached_property
    def _callback_sql(self) -> StateStatements:
        return StateStatements(self.db)

    @reconnecting
    def callback_view(
        self,
        state: str,
        *,
        at: datetime,
        browser: str | None,
        retry_token: str | None,
        claim_by: str | None,
    ) -> CallbackView:
        """A callback's reads, and with `claim_by` its claim, in one statement: the state is
        claimed (as claim_state does, `claimed_by` this process) only when nothing would
        refuse it: bound to this browser (`browser`: the sha256 of its binding cookie), not
        claimed yet, its link not revoked, the tenant holding it now, not connected, its
        link unexpired at `at`. A state without a row (a batch's) is never claimed here:
        claim_state gives it one. `retry_token`: the browser's link (its cookie)."""
        sql = self._callback_sql
        params = {
            "p_state_hash": state_digest(state),
            "p_now": utc(at),
            "p_browser_hash": browser,
            "p_retry_hash": token_digest(retry_token) if retry_token else None,
            "p_by": (claim_by or "")[:200],
        }
        mapping: Mapping[Any, Any] | None
        if sql.postgres:
            query = sql.driver_read_claiming if claim_by else sql.driver_read
            with self.db.single.connect() as conn:
                mapping = query.fetch_one(conn, params)
            claimed = bool(claim_by) and mapping is not None and bool(mapping["claimed"])
        else:
            with self.engine.begin() as conn:  # the write first: SQLite's write lock at once
                claimed = bool(claim_by) and bool(conn.execute(sql.claim, params).rowcount)
                row = conn.execute(sql.read, params).first()
            assert row is not None
            mapping = row._mapping
        assert mapping is not None  # one row, whatever matched
        state_values = prefixed(mapping, "s_")
        found = None
        if state_values["state_hash"] is not None:
            found = ConnectState(**state_values, link_revoked=bool(mapping["link_revoked"]))
        held = prefixed(mapping, "r_")
        record = Record.from_values(held) if held["tenant_id"] is not None else None
        return CallbackView(found, record, mapping["retry_path"], mapping["latest_path"], claimed)

    @reconnecting
    def release_claim(self, state: str, by: str) -> bool:
        """Let go of a claim this process made and will not use (nothing was sent to Versori
        for it): the state may be claimed again. Only an unfinished claim of `by`."""
        with self.engine.begin() as conn:
            done = conn.execute(
                connect_states.update()
                .where(
                    connect_states.c.state_hash == state_digest(state),
                    connect_states.c.claimed_by == by[:200],
                    connect_states.c.finished_at.is_(None),
                )
                .values(claimed_at=None, claimed_by=None)
            )
        return bool(done.rowcount)

    def _state_query(self) -> Any:
        revoked = exists().where(
            connect_links.c.token_hash == connect_states.c.link_hash,
            connect_links.c.revoked_at.is_not(None),
        )
        return select(connect_states, revoked.label("link_revoked"))

    @reconnecting
    def find_state(self, state: str) -> ConnectState | None:
        query = self._state_query().where(connect_states.c.state_hash == state_digest(state))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return ConnectState.from_row(row) if row is not None else None

    @reconnecting
    def claim_state(
        self,
        state: str,
        *,
        tenant_id: str,
        connector_id: str,
        by: str,
        at: datetime | None = None,
    ) -> bool:
        """Claim a callback's state before CreateConnection is called with its code: the row
        is `connecting` from now. True for the first claim only (a replay, a double submit,
        another replica, or a revoke of its link in between: False). A batch's state, never
        bound, gets its row here."""
        when = utc(at or utcnow())
        digest = state_digest(state)
        revoked = exists().where(
            connect_links.c.token_hash == connect_states.c.link_hash,
            connect_links.c.revoked_at.is_not(None),
        )
        # A state claimed by a version before connect states existed.
        legacy = exists().where(callback_states.c.state_hash == digest)
        with self.engine.begin() as conn:
            done = conn.execute(
                connect_states.update()
                .where(
                    connect_states.c.state_hash == digest,
                    connect_states.c.claimed_at.is_(None),
                    ~revoked,
                )
                .values(claimed_at=when, claimed_by=by[:200])
            )
            if done.rowcount:
                return True
            if conn.execute(select(legacy)).scalar():
                return False
            inserted = conn.execute(
                self.db.insert(connect_states)
                .values(
                    state_hash=digest,
                    tenant_id=tenant_id,
                    connector_id=connector_id,
                    minted_at=when,
                    claimed_at=when,
                    claimed_by=by[:200],
                )
                .on_conflict_do_nothing()
                .returning(connect_states.c.state_hash)
            ).first()
        return inserted is not None

    @reconnecting
    def finish_state(
        self,
        state_hash: str,
        outcome: StateOutcome,
        *,
        connection_id: str | None = None,
        error: tuple[str, str] | None = None,
        at: datetime | None = None,
    ) -> Record | None:
        """What became of a claimed state, in one transaction with its tenant's record:
        CONNECTED writes the tenant `connected` with the connection's id, whatever its record
        held (Versori's connection is the truth: a reset or a newer state in between does not
        undo it), unless the record names another connection already; any other outcome
        keeps the record's status and notes `error` (code, message) on it. Only an unfinished
        row is finished (a second resolver finds it done): the record when this call
        finished it, else None."""
        when = utc(at or utcnow())
        sql = self._callback_sql
        if sql.postgres and (outcome is StateOutcome.CONNECTED or error is not None):
            params = {
                "p_state_hash": state_hash,
                "p_now": when,
                "p_outcome": outcome.value,
                "p_connection_id": connection_id,
                "p_updated_at": utcnow(),
                "p_error_code": error[0][:100] if error is not None else None,
                "p_error_message": error[1] if error is not None else None,
            }
            query = sql.driver_finish[outcome is StateOutcome.CONNECTED]
            with self.db.single.connect() as conn:
                values = query.fetch_one(conn, params)
            return Record.from_values(values) if values is not None else None
        with self.engine.begin() as conn:
            # RETURNING: the tenant of the row this call finished, in the one statement (a
            # second resolver gets nothing back).
            row = conn.execute(
                connect_states.update()
                .where(
                    connect_states.c.state_hash == state_hash,
                    connect_states.c.finished_at.is_(None),
                )
                .values(finished_at=when, outcome=outcome.value, connection_id=connection_id)
                .returning(connect_states.c.tenant_id, connect_states.c.connector_id)
            ).first()
            if row is None:
                return None
            key = tenant_row(row.tenant_id, row.connector_id)
            if outcome is StateOutcome.CONNECTED:
                # One UPDATE: a button pressed at the same moment (record_minted_link) waits
                # for its row lock, and finds the tenant connected.
                update = (
                    records.update()
                    .where(
                        *key,
                        ~and_(
                            records.c.status.in_(HELD),
                            records.c.connection_id.is_not(None),
                            records.c.connection_id != connection_id,
                        ),
                    )
                    .values(
                        status=Status.CONNECTED.value,
                        connection_id=connection_id,
                        connected_at=when,
                        error_code=None,
                        error_message=None,
                        reconnect_of=None,
                        updated_at=utcnow(),
                    )
                )
            elif error is not None:
                update = (
                    records.update()
                    .where(*key, records.c.status.not_in(HELD))
                    .values(error_code=error[0][:100], error_message=error[1], updated_at=utcnow())
                )
            else:
                return None
            now_row = conn.execute(update.returning(*records.c)).first()
        return Record.from_row(now_row) if now_row is not None else None

    @reconnecting
    def unfinished_states(self, limit: int = 200) -> list[ConnectState]:
        """Claimed states never finished (callbacks in flight, or left by a crash, a SIGTERM
        or an outage), oldest first."""
        query = self._state_query().where(
            connect_states.c.claimed_at.is_not(None), connect_states.c.finished_at.is_(None)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(connect_states.c.claimed_at).limit(limit))
            return [ConnectState.from_row(row) for row in rows]

    @reconnecting
    def mark_awaiting_lookup(self, state_hash: str, by: str) -> None:
        """CreateConnection ended with its outcome unknown and Versori could not be asked
        either: nothing is in flight for this state any more, so the next request or sweep
        may resolve it at once (`claimed_by` says so)."""
        with self.engine.begin() as conn:
            conn.execute(
                connect_states.update()
                .where(
                    connect_states.c.state_hash == state_hash,
                    connect_states.c.finished_at.is_(None),
                )
                .values(claimed_by=by[:200])
            )

    @reconnecting
    def connecting_of(self, tenant_id: str, connector_id: str) -> list[ConnectState]:
        """The tenant's states claimed and not finished (a callback in flight, or one left by
        a crash), oldest first."""
        query = self._state_query().where(
            connect_states.c.tenant_id == tenant_id,
            connect_states.c.connector_id == connector_id,
            connect_states.c.claimed_at.is_not(None),
            connect_states.c.finished_at.is_(None),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(connect_states.c.claimed_at))
            return [ConnectState.from_row(row) for row in rows]


class StateStatements:
    """The callback's statements, built once per ledger (see LinkStatements): its reads and
    claim in one, and finish_state's two writes in one (PostgreSQL's writable CTEs)."""

    def __init__(self, db: Database) -> None:
        self.postgres = db.postgres
        state, record, link = connect_states.c, records.c, connect_links.c
        now = bindparam("p_now", type_=STAMP)
        digest = bindparam("p_state_hash", type_=String)
        revoked = exists().where(link.token_hash == state.link_hash, link.revoked_at.is_not(None))
        holds = exists().where(
            record.state_hash == digest,
            record.tenant_id == state.tenant_id,
            record.connector_id == state.connector_id,
            record.status.not_in(among([*HELD, Status.EXPIRED.value])),
            record.expires_at > now,
        )
        self.claim = (
            connect_states.update()
            .where(
                state.state_hash == digest,
                state.claimed_at.is_(None),
                ~revoked,
                or_(
                    state.browser_hash.is_(None),
                    state.browser_hash == bindparam("p_browser_hash", type_=String),
                ),
                holds,
            )
            .values(claimed_at=now, claimed_by=bindparam("p_by", type_=String))
        )
        # The read, its tables under short names: a statement psycopg caches (at most 4 KiB).
        sa, ra, la = connect_states.alias("s"), records.alias("r"), connect_links.alias("l")
        of_tenant = (la.c.tenant_id == ra.c.tenant_id, la.c.connector_id == ra.c.connector_id)
        retry_path = (
            select(la.c.profile_path)
            .where(
                la.c.token_hash == bindparam("p_retry_hash", type_=String),
                la.c.revoked_at.is_(None),
                la.c.expires_at > now,
                *of_tenant,
            )
            .scalar_subquery()
        )
        latest_path = (
            select(la.c.profile_path)
            .where(*of_tenant)
            .order_by(func.coalesce(la.c.minted_at, la.c.created_at).desc())
            .limit(1)
            .scalar_subquery()
        )
        link_revoked = exists().where(
            la.c.token_hash == sa.c.link_hash, la.c.revoked_at.is_not(None)
        )
        one = select(literal(1).label("one")).subquery("one")
        self.read: Select[Any] = select(
            *(c.label(f"s_{c.name}") for c in sa.c),
            link_revoked.label("link_revoked"),
            *(c.label(f"r_{c.name}") for c in ra.c),
            retry_path.label("retry_path"),
            latest_path.label("latest_path"),
        ).select_from(
            one.outerjoin(sa, sa.c.state_hash == digest).outerjoin(ra, ra.c.state_hash == digest)
        )
        claimed = self.claim.returning(state.state_hash).cte(name="claimed")
        self.read_claiming = self.read.add_columns(
            select(claimed.c.state_hash).exists().label("claimed")
        )
        finished = (
            connect_states.update()
            .where(state.state_hash == digest, state.finished_at.is_(None))
            .values(
                finished_at=now,
                outcome=bindparam("p_outcome", type_=String),
                connection_id=bindparam("p_connection_id", type_=String),
            )
            .returning(state.tenant_id, state.connector_id)
            .cte(name="finished")
        )
        connection = bindparam("p_connection_id", type_=String)
        updated = bindparam("p_updated_at", type_=STAMP)
        key = (
            record.tenant_id == finished.c.tenant_id,
            record.connector_id == finished.c.connector_id,
        )
        # As finish_state's two statements: see there.
        self.finish_connected = (
            records.update()
            .where(
                *key,
                ~and_(
                    record.status.in_(among(HELD)),
                    record.connection_id.is_not(None),
                    record.connection_id != connection,
                ),
            )
            .values(
                status=literal(Status.CONNECTED.value, String),
                connection_id=connection,
                connected_at=now,
                error_code=null(),
                error_message=null(),
                reconnect_of=null(),
                updated_at=updated,
            )
            .returning(*records.c)
        )
        self.finish_error = (
            records.update()
            .where(*key, record.status.not_in(among(HELD)))
            .values(
                error_code=bindparam("p_error_code", type_=String),
                error_message=bindparam("p_error_message", type_=String),
                updated_at=updated,
            )
            .returning(*records.c)
        )
        # PostgreSQL's: sent on the driver's cursor (connect_links.DriverStatement).
        dialect = db.engine.dialect
        self.driver_read = DriverStatement(self.read, dialect)
        self.driver_read_claiming = DriverStatement(self.read_claiming, dialect)
        # By whether the outcome is CONNECTED.
        self.driver_finish = {
            True: DriverStatement(self.finish_connected, dialect),
            False: DriverStatement(self.finish_error, dialect),
        }
