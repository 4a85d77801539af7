"""What the baseline revision does to a ledger written before the ledger was versioned: the
in-place additions the unversioned code made on every start (missing tables, columns and
indexes; state hashes for rows written without them), now made once, under the migration
lock, before the ledger is stamped."""

from __future__ import annotations

import logging

from alembic import op
from sqlalchemy import (
    Column,
    Connection,
    DefaultClause,
    MetaData,
    Table,
    bindparam,
    inspect,
    select,
)

from onboarding.ledger.schema import state_digest

log = logging.getLogger(__name__)


def create_or_complete(conn: Connection, tables: MetaData) -> None:
    """Each table created, or completed in place when it exists: its missing columns added,
    then its missing indexes made."""
    existing = set(inspect(conn).get_table_names())
    for table in tables.sorted_tables:
        if table.name in existing:
            _add_missing_columns(conn, table)
            _create_missing_indexes(conn, table)
        else:
            table.create(conn)  # and its indexes


def _add_missing_columns(conn: Connection, table: Table) -> None:
    """Only columns that are nullable, or NOT NULL with a server default, were ever added to an
    existing table; any other is added nullable, as the unversioned code did (a NOT NULL column
    with no default cannot be added to a table that has rows)."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for column in table.columns:
        if column.name in have:
            continue
        default = column.server_default
        if isinstance(default, DefaultClause):
            fresh = DefaultClause(default.arg)  # the table's own belongs to its column
            added = Column(column.name, column.type, nullable=column.nullable, server_default=fresh)
        else:
            added = Column(column.name, column.type, nullable=True)
        op.add_column(table.name, added)
        log.info("ledger: added column %s.%s", table.name, column.name)


def _create_missing_indexes(conn: Connection, table: Table) -> None:
    have = {i["name"] for i in inspect(conn).get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in have:
            columns = [c.name for c in index.columns]
            op.create_index(str(index.name), table.name, columns, unique=index.unique)


def hash_old_states(conn: Connection, *tables: Table) -> None:
    """Fill in state_hash for the rows an older version wrote without it."""
    for table in tables:
        keys = list(table.primary_key.columns)
        query = select(*keys, table.c.state).where(
            table.c.state_hash.is_(None), table.c.state.is_not(None)
        )
        rows = [
            {
                **{f"k_{c.name}": row._mapping[c.name] for c in keys},
                "digest": state_digest(row.state),
            }
            for row in conn.execute(query)
        ]
        if not rows:
            continue
        update = (
            table.update()
            .where(*[c == bindparam(f"k_{c.name}") for c in keys])
            .values(state_hash=bindparam("digest"))
        )
        conn.execute(update, rows)
        log.info("ledger: hashed %d state(s) of %s", len(rows), table.name)
