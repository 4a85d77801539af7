"""Opening a ledger's database: a usable URL, a connection, the schema brought up to date, and
errors that name ONBOARD_DB_URL without its password; the per-tenant locks of PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from onboarding.db_url import redact, scrub
from onboarding.errors import InputError, LedgerSchemaError
from onboarding.ledger.schema import create_private_sqlite_file, migrate_schema, sqlite_pragmas


def open_engine(url: str) -> Engine:
    """An engine on the ledger at `url`, its tables created or brought up to date. InputError
    when the URL is unusable or nothing answers there; LedgerSchemaError when the tables
    cannot be made."""
    try:
        # hide_parameters: a failed statement must not print the link it was writing.
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
        if url.startswith("sqlite"):
            kwargs = {
                "hide_parameters": True,
                "connect_args": {"check_same_thread": False, "timeout": 30},
            }
        engine = create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as err:
        raise InputError(
            f"ONBOARD_DB_URL {redact(url)!r} is not a usable database URL "
            f"({scrub(str(err), url)}); use sqlite:///path/to/onboarding.db or "
            "postgresql+psycopg://user@host:5432/db"
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
        create_private_sqlite_file(url)
    else:
        event.listen(engine, "handle_error", _hide_failing_row)
    try:
        with engine.connect():
            pass
    except DBAPIError as err:  # unreachable, refused, or a bad option in the URL's query
        engine.dispose()
        raise InputError(
            f"cannot open the ledger at {redact(url)}: {scrub(str(err.orig), url)}; "
            "check ONBOARD_DB_URL"
        ) from None
    try:
        migrate_schema(engine)
    except DBAPIError as err:  # it answered: the schema is what failed, not the input
        engine.dispose()
        raise LedgerSchemaError(
            f"cannot create or update the ledger's tables at {redact(url)}: "
            f"{scrub(str(err.orig), url)}"
        ) from None
    return engine


def lock_tenants(conn: Connection, keys: list[tuple[str, str]]) -> None:
    """PostgreSQL: each tenant's advisory lock, held to the end of the transaction, taken in
    key order so that two transactions never wait for each other."""
    ordered = sorted({_lock_key(t, c) for t, c in keys})
    conn.execute(
        text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
        {"keys": ordered},
    )


def _lock_key(tenant_id: str, connector_id: str) -> int:
    """A tenant's PostgreSQL advisory lock key (64 bits; one key space, see _MIGRATION_LOCK)."""
    digest = hashlib.sha256(f"{tenant_id}\0{connector_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _hide_failing_row(context: Any) -> None:
    # hide_parameters keeps SQLAlchemy from printing a statement's values, but PostgreSQL prints
    # them itself in a DETAIL line ("Failing row contains (..., url, state, ...)"). Drop it from
    # the driver's error and from SQLAlchemy's, which copied the text when it was made.
    for exc in (context.original_exception, context.sqlalchemy_exception):
        if exc is not None and exc.args and isinstance(exc.args[0], str):
            head, sep, _detail = exc.args[0].partition("\nDETAIL:")
            if sep:
                exc.args = (head + "\nDETAIL: (hidden: it may hold the link being written)",)
