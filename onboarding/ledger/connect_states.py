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

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, exists, select

from onboarding.clock import utcnow
from onboarding.ledger.connect_links import callback_states, connect_links, connect_states
from onboarding.ledger.database import Repository
from onboarding.ledger.engine import reconnecting
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


class _Row:
    """A row's values, as Record.from_row reads them."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping


class ConnectStates(Repository):
    """Connect states: a callback's claims and outcomes (one part of the ledger)."""

    def _state_query(self) -> Any:
        revoked = exists().where(
            connect_links.c.token_hash == connect_states.c.link_hash,
            connect_links.c.revoked_at.is_not(None),
        )
        return select(connect_states, revoked.label("link_revoked"))

    @reconnecting
    def get_for_link(self, tenant_id: str, connector_id: str) -> tuple[Record | None, bool]:
        """The tenant's record, and whether it has a claim not finished (a callback in
        flight, or one a crash left): one statement, what every link page and button reads."""
        unfinished = exists().where(
            connect_states.c.tenant_id == tenant_id,
            connect_states.c.connector_id == connector_id,
            connect_states.c.claimed_at.is_not(None),
            connect_states.c.finished_at.is_(None),
        )
        query = select(records, unfinished.label("unfinished")).where(
            *tenant_row(tenant_id, connector_id)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None, False
        values = dict(row._mapping)
        flag = bool(values.pop("unfinished"))
        return Record.from_row(_Row(values)), flag

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
