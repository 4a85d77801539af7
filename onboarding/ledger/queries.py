"""The ledger's reads: who needs what, who is due a reminder, counts for status and export."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import case, func, select

from onboarding.clock import utcnow
from onboarding.ledger.database import Repository
from onboarding.ledger.engine import reconnecting
from onboarding.ledger.records import Record, SupersededLink, superseded_from_row, utc
from onboarding.ledger.schema import (
    DONE_STATUSES,
    HELD_STATUSES,
    LIVE_STATUSES,
    LOST_STATUSES,
    SENDING_CHANNELS,
    Status,
    records,
    state_digest,
    superseded_links,
    tenant_row,
)

T = TypeVar("T")

# Statuses a reminder goes to (with an email channel): opened and declined admins got the
# link and did not finish.
REMINDABLE_STATUSES = (*DONE_STATUSES, Status.EXPIRED, *LOST_STATUSES)

# The values of HELD_STATUSES, for SQL.
HELD = [s.value for s in HELD_STATUSES]

# SQLite caps a statement's bound parameters (999 before 3.32): IN lists go in parts this long.
IN_LIST_MAX = 900


class RecordQueries(Repository):
    """Every read of tenant records. Each is one statement on a connection of its own."""

    @reconnecting
    def due_for_reminder(
        self,
        connector_id: str,
        *,
        sent_before: datetime,
        max_reminders: int,
        only_ids: Collection[str] | None = None,
    ) -> list[Record]:
        """Tenants sent a link by email, not connected, last sent before `sent_before`, and
        reminded fewer than `max_reminders` times, oldest first (with `only_ids`, only those
        of these ids)."""
        due = _due_for_reminder(connector_id, sent_before, max_reminders)
        last_sent = func.coalesce(records.c.last_sent_at, records.c.delivered_at)
        query = select(records).where(*due).order_by(last_sent, records.c.tenant_id)
        with self.engine.connect() as conn:
            return [
                Record.from_row(row) for q in _of_ids(query, only_ids) for row in conn.execute(q)
            ]

    @reconnecting
    def count_due_for_reminder(
        self, connector_id: str, *, sent_before: datetime, max_reminders: int
    ) -> int:
        """How many tenants due_for_reminder would return, counted by the database."""
        due = _due_for_reminder(connector_id, sent_before, max_reminders)
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(*due)).scalar_one())

    @reconnecting
    def find_superseded(self, state: str) -> SupersededLink | None:
        query = select(superseded_links).where(superseded_links.c.state_hash == state_digest(state))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return superseded_from_row(row) if row is not None else None

    @reconnecting
    def get(self, tenant_id: str, connector_id: str) -> Record | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(records).where(*tenant_row(tenant_id, connector_id))).first()
        return Record.from_row(row) if row else None

    @reconnecting
    def find_by_state(self, state: str) -> Record | None:
        """The tenant holding `state` now, looked up by the state's hash."""
        query = select(records).where(records.c.state_hash == state_digest(state))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Record.from_row(row) if row else None

    @reconnecting
    def ids_needing_nothing(
        self,
        connector_id: str,
        now: datetime | None = None,
        only_ids: Collection[str] | None = None,
    ) -> set[str]:
        """Tenants that need nothing from a new run: connected, or holding an unexpired link
        that was delivered. With `only_ids`, only those of these ids (a chunk's)."""
        now = utc(now or utcnow())
        query = select(records.c.tenant_id).where(
            records.c.connector_id == connector_id,
            records.c.status.in_([*HELD, *(s.value for s in LOST_STATUSES)])
            | (
                records.c.status.in_([s.value for s in DONE_STATUSES])
                & (records.c.expires_at > now)
            ),
        )
        with self.engine.connect() as conn:
            return {tid for q in _of_ids(query, only_ids) for tid in conn.execute(q).scalars()}

    @reconnecting
    def counts_by_status(self, connector_id: str | Sequence[str] | None = None) -> dict[str, int]:
        query = select(records.c.status, func.count()).group_by(records.c.status)
        query = _of_connectors(query, connector_id)
        with self.engine.connect() as conn:
            return {status: count for status, count in conn.execute(query)}

    @reconnecting
    def connector_profiles(self) -> dict[str, str]:
        """Every connector (or system) id the ledger holds records of, in order, with the name
        of the profile its records were written by (the greatest, if several)."""
        ids = records.c.connector_id
        query = select(ids, func.max(records.c.profile)).group_by(ids).order_by(ids)
        with self.engine.connect() as conn:
            return {connector_id: profile for connector_id, profile in conn.execute(query)}

    @reconnecting
    def connection_coverage(self, connector_ids: Sequence[str]) -> dict[str, int]:
        """Over the tenants the ledger holds for any of `connector_ids`: how many are connected
        to all of them (fully), to some (partly), to none."""
        ids = list(dict.fromkeys(connector_ids))
        per_tenant = (
            select(count_where(records.c.status.in_(HELD)).label("n"))
            .where(records.c.connector_id.in_(ids))
            .group_by(records.c.tenant_id)
            .subquery()
        )
        query = select(
            func.count(), count_where(per_tenant.c.n >= len(ids)), count_where(per_tenant.c.n == 0)
        ).select_from(per_tenant)
        with self.engine.connect() as conn:
            total, fully, none = conn.execute(query).one()
        return {"fully": int(fully), "partly": int(total - fully - none), "none": int(none)}

    @reconnecting
    def count_past_expiry(self, connector_id: str | Sequence[str] | None, now: datetime) -> int:
        """Links handed out but not connected whose time is up (stale, whatever their status)."""
        query = _of_connectors(select(func.count()).where(*past_expiry(now)), connector_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def iter_records(self, connector_id: str | Sequence[str] | None = None) -> Iterator[Record]:
        """Every record (of these connectors), one per (tenant, connector), streamed in tenant
        order, so an export of 100k rows stays small."""
        query = select(records).order_by(records.c.tenant_id, records.c.connector_id)
        query = _of_connectors(query, connector_id)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
            for row in result:
                yield Record.from_row(row)


def _due_for_reminder(
    connector_id: str, sent_before: datetime, max_reminders: int
) -> tuple[Any, ...]:
    """Sent a link by email, not connected, last sent before `sent_before`, reminded fewer
    than `max_reminders` times (see RecordQueries.due_for_reminder)."""
    last_sent = func.coalesce(records.c.last_sent_at, records.c.delivered_at)
    return (
        records.c.connector_id == connector_id,
        records.c.status.in_([s.value for s in REMINDABLE_STATUSES]),
        records.c.delivery_channel.in_(SENDING_CHANNELS),
        records.c.reminders < max_reminders,
        last_sent <= utc(sent_before),
    )


def past_expiry(now: datetime) -> tuple[Any, Any]:
    """Links handed out but not connected whose time is up at `now`."""
    return records.c.status.in_([s.value for s in LIVE_STATUSES]), records.c.expires_at <= utc(now)


def count_where(condition: Any) -> Any:
    """How many rows (of a group) meet `condition`: 0, not NULL, for none."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def in_parts(items: Sequence[T], size: int = IN_LIST_MAX) -> Iterator[Sequence[T]]:
    """`items` in parts of at most `size`, for IN lists (see IN_LIST_MAX)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _of_ids(query: Any, only_ids: Collection[str] | None) -> list[Any]:
    """`query`, or with `only_ids` its parts for those tenants only (see in_parts)."""
    if only_ids is None:
        return [query]
    return [query.where(records.c.tenant_id.in_(part)) for part in in_parts(list(only_ids))]


def _of_connectors(query: Any, connector_id: str | Sequence[str] | None) -> Any:
    """`query` for these connectors only (every connector for None or none)."""
    if not connector_id:
        return query
    ids = [connector_id] if isinstance(connector_id, str) else list(connector_id)
    return query.where(records.c.connector_id.in_(ids))
