"""The two statements of Ledger.record_link, built once per ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Insert,
    String,
    bindparam,
    case,
    func,
    literal_column,
    select,
)

from onboarding.ledger.schema import (
    HELD_STATUSES,
    LOST_STATUSES,
    Status,
    records,
    superseded_links,
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


def among(values: Iterable[str]) -> list[ColumnElement[Any]]:
    """Constant statuses for an IN list, written into the statement: the same SQL every time.
    A list of bound values would be an "expanding" parameter, which SQLAlchemy refuses in an
    executemany (every group of GroupCommit failed and was written again row by row, a
    transaction each), and which psycopg could not prepare once per connection."""
    written = [str(value) for value in values]
    for value in written:
        assert value.isidentifier(), value  # a status name: safe in the SQL as it is
    return [literal_column(f"'{value}'", String) for value in written]


def _status_in(statuses: tuple[Status, ...]) -> ColumnElement[bool]:
    return records.c.status.in_(among(statuses))


# The state that leaves to the history, then the row inserted or updated.
LinkStatements = tuple[Insert, Insert]


# Long: two SQL statements, written out.
def link_statements(insert_into: Callable[[Any], Any]) -> LinkStatements:
    """record_link's statements: the state that leaves goes to the history, then the row is
    inserted or updated. `insert_into` is the dialect's INSERT (with ON CONFLICT).

    Built once per ledger: building and hashing a statement of this size cost more CPU than
    the rest of a tenant's path together (bench/run.py under py-spy), so each call only binds
    new values to them."""
    stamp = DateTime(timezone=True)
    connected = _status_in(HELD_STATUSES)
    lost = _status_in(LOST_STATUSES)

    def leaving(name: str, type_: Any) -> Any:
        """A column of the state that leaves: the current one; for a connected tenant (whose
        row stays) the new one."""
        return case((connected, bindparam(name, type_=type_)), else_=records.c[name])

    current = select(
        leaving("state", String),
        leaving("state_hash", String),
        records.c.tenant_id,
        records.c.connector_id,
        leaving("created_at", stamp),
        bindparam("updated_at", type_=stamp),
    ).where(
        records.c.tenant_id == bindparam("tenant_id"),
        records.c.connector_id == bindparam("connector_id"),
        records.c.state.is_not(None),
        records.c.state != bindparam("state"),
    )
    supersede = (
        insert_into(superseded_links)
        .from_select(
            ["state", "state_hash", "tenant_id", "connector_id", "created_at", "superseded_at"],
            current,
        )
        .on_conflict_do_nothing()
    )
    insert = insert_into(records).values(
        {**{name: bindparam(name) for name in _LINK_COLUMNS}, "attempts": 1}
    )
    # connection_id and connected_at stay: a broken tenant's new link updates that
    # connection in place (a row with a working connection is never written here).
    cleared = dict.fromkeys(("last_sent_at", "message_id", "error_code", "error_message"))
    upsert = insert.on_conflict_do_update(
        index_elements=["tenant_id", "connector_id"],
        set_={
            **{name: insert.excluded[name] for name in _LINK_COLUMNS[2:]},
            **cleared,
            # A caller that does not know the tenant's fields keeps the stored ones.
            "tenant_fields": func.coalesce(insert.excluded.tenant_fields, records.c.tenant_fields),
            "attempts": records.c.attempts + 1,
            # A broken or disconnected tenant stays so while its reconnect link is out.
            "status": case((lost, records.c.status), else_=insert.excluded.status),
        },
        where=~connected,
    )
    return supersede, upsert
