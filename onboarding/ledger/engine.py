"""Opening a ledger's database: a usable URL, a connection, the schema brought up to date, and
errors that name ONBOARD_DB_URL without its password; the per-tenant locks of PostgreSQL."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError

from onboarding.db_url import UNUSABLE_URL_ERRORS, redact, scrub, unusable_url
from onboarding.errors import InputError, LedgerSchemaError, LedgerUnavailableError
from onboarding.ledger.schema import create_private_sqlite_file, migrate_schema, sqlite_pragmas

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# Waits before each new try of a unit of work whose connection was lost: about 3.5 s in all,
# enough for a pool to reconnect after a killed backend or a quick failover.
RECONNECT_DELAYS = (0.05, 0.2, 0.5, 1.0, 1.75)


def open_engine(url: str, *, ping_idle: float | None = None) -> Engine:
    """An engine on the ledger at `url`, its tables created or brought up to date. InputError
    when the URL is unusable, nothing answers there, or a newer version of this tool wrote
    the ledger; LedgerSchemaError when the tables cannot be made.

    A pooled connection is tested before each use (pool_pre_ping: a round trip each time);
    with `ping_idle`, only one that waited in the pool that many seconds or more (see
    _ping_when_idle)."""
    try:
        kwargs: dict[str, Any] = {"pool_pre_ping": ping_idle is None}
        if url.startswith("sqlite"):
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        # hide_parameters: a failed statement must not print the link it was writing.
        engine = create_engine(url, hide_parameters=True, **kwargs)
    except UNUSABLE_URL_ERRORS as err:
        raise unusable_url(url, err) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
        create_private_sqlite_file(url)
    else:
        event.listen(engine, "handle_error", _hide_failing_row)
        if ping_idle is not None:
            _ping_when_idle(engine, ping_idle)
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
    except InputError:  # a ledger of a newer version of this tool: refused, nothing written
        engine.dispose()
        raise
    except DBAPIError as err:  # it answered: the schema is what failed, not the input
        engine.dispose()
        raise LedgerSchemaError(
            f"cannot create or update the ledger's tables at {redact(url)}: "
            f"{scrub(str(err.orig), url)}"
        ) from None
    return engine


def _ping_when_idle(engine: Engine, seconds: float) -> None:
    """pool_pre_ping for a connection that waited in the pool `seconds` or more (a restart, a
    failover or a network's idle timeout may have closed it meanwhile), not for one in steady
    use: a connection lost while in use is what `reconnecting` handles either way (the unit
    of work runs again on a new connection, the pool's older ones dropped with it), so a
    ping's round trip at every checkout buys nothing there. A ping that fails: the pool
    drops that connection and checks out a new one, as with pool_pre_ping."""

    def checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as err:  # whatever the driver says: this connection is not usable
            raise DisconnectionError(type(err).__name__) from err

    event.listen(engine.pool, "checkin", checkin)
    event.listen(engine.pool, "checkout", checkout)


def lock_tenants(conn: Connection, keys: list[tuple[str, str]]) -> None:
    """PostgreSQL: each tenant's advisory lock, held to the end of the transaction, taken in
    key order so that two transactions never wait for each other. Nothing on SQLite, whose
    writing transaction holds the database's write lock."""
    if conn.dialect.name != "postgresql":
        return
    ordered = sorted({lock_key(t, c) for t, c in keys})
    conn.execute(
        text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
        {"keys": ordered},
    )


def lock_key(tenant_id: str, connector_id: str) -> int:
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


def reconnecting(unit: Callable[P, R]) -> Callable[P, R]:
    """A ledger read or write (one transaction, safe to run again) tried again on a fresh
    connection when its connection was lost mid-way: PostgreSQL restarted, a failover, or
    pg_terminate_backend. SQLAlchemy marks those errors `connection_invalidated` and drops the
    pooled connection; the next try checks a new one out (pool_pre_ping tests it first).

    Every write of the ledger may run twice this way: a COMMIT whose answer was lost may have
    landed, so each is written to land once (upserts, updates guarded by the row's state). When
    the connection cannot be restored, LedgerUnavailableError (transient, no SQL in it)."""

    @functools.wraps(unit)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        delays = iter(RECONNECT_DELAYS)
        while True:
            try:
                return unit(*args, **kwargs)
            except DBAPIError as err:
                if not err.connection_invalidated:
                    raise
                delay = next(delays, None)
                reason = type(err.orig).__name__ if err.orig is not None else type(err).__name__
                if delay is None:
                    raise LedgerUnavailableError(
                        f"the ledger's database connection was lost ({reason}) and could not "
                        f"be restored after {len(RECONNECT_DELAYS)} tries; the tenant will be "
                        "tried again"
                    ) from None
                log.warning("ledger connection lost (%s); trying again in %g s", reason, delay)
                time.sleep(delay)

    return run
