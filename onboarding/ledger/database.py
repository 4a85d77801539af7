"""One ledger database: its engine (schema brought up to date on opening), its dialect's
INSERT ... ON CONFLICT, the statements built once, and the clock every process shares.

Each part of the ledger (tenant records, connect links and states, run coordination, chunk
summaries) is a `Repository` over one `Database`; `Ledger` is all of them over one."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Engine, Float, Table, func, literal_column, type_coerce

from onboarding.ledger.engine import open_engine, reconnecting
from onboarding.ledger.link_sql import LinkStatements, link_statements

if TYPE_CHECKING:
    from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

    UpsertInsert = PostgresInsert | SqliteInsert


class Database:
    """The ledger's database at `url`. Thread-safe (a connection pool): one per process,
    shared by every repository of it, closed once. `ping_idle`: test a pooled connection
    before use only when it waited that many seconds (a long-running service's choice; see
    engine.open_engine); None: before every use."""

    def __init__(self, url: str, *, ping_idle: float | None = None) -> None:
        self.url = url
        self.engine: Engine = open_engine(url, ping_idle=ping_idle)
        self.postgres = self.engine.dialect.name == "postgresql"
        # Only this ledger's dialect: PostgreSQL's takes 35-90 ms to import, which every
        # command on a SQLite ledger (`onboard status`) paid.
        dialect = "postgresql" if self.postgres else "sqlite"
        insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
        self.insert: Callable[[Table], UpsertInsert] = insert

    @cached_property
    def single(self) -> Engine:
        """The engine for a unit of work that is one statement, atomic by itself: on
        PostgreSQL in autocommit, so without BEGIN and COMMIT (two round trips fewer, and
        psycopg keeps the statements it prepared, which each ROLLBACK drops); on SQLite the
        engine itself (its connections commit as `engine.begin()` says). Same pool."""
        if not self.postgres:
            return self.engine
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @cached_property
    def link_sql(self) -> LinkStatements:
        """record_link's two statements, built once per database (see link_statements)."""
        return link_statements(self.insert)

    def now(self) -> ColumnElement[float]:
        """The database's clock, in seconds since the epoch: one timeline for every machine."""
        if self.postgres:
            return type_coerce(func.extract("epoch", func.clock_timestamp()), Float)
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)

    @reconnecting
    def upsert(
        self,
        table: Table,
        key: Mapping[str, object],
        values: Mapping[str, object],
        update: Mapping[str, object] | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> None:
        """Insert a row of `table`, or update the one with its `key` (with `values`, or
        `update` when given; only where `where` holds)."""
        stmt = self.insert(table).values(**key, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_=dict(values if update is None else update), where=where
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def close(self) -> None:
        self.engine.dispose()


class Repository:
    """One part of the ledger over a shared Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @property
    def engine(self) -> Engine:
        return self.db.engine
