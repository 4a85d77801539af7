"""The ledger's tables, and their creation or update when a ledger is opened: the revisions of
onboarding/ledger/migrations/ up to SCHEMA_VERSION, run under a lock, so that runs starting
together on a new or older database all open it; a ledger of a newer version is refused."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from onboarding.db_url import redact
from onboarding.errors import InputError

# SCHEMA_VERSION: the revision this code writes. The package imports Alembic only when it runs
# a migration: a ledger at SCHEMA_VERSION opens without it.
from onboarding.ledger.migrations import SCHEMA_VERSION, known_revisions, read_versions, upgrade

log = logging.getLogger(__name__)


class Status(StrEnum):
    PENDING = "pending"
    LINK_CREATED = "link_created"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    REMINDED = "reminded"
    CONNECTED = "connected"
    # Set by onboard connect-server: the admin opened a durable connect link (or pressed its
    # button, which made the tenant a new state); the provider answered the callback with an
    # error (the admin declined: error_code holds the provider's code).
    OPENED = "opened"
    DECLINED = "declined"
    # Set by `onboard sync` (and the connect service) from what Versori holds: the tenant's
    # activation on the profile's environment holds its connection (live); its connection's
    # credential lists errors or has expired (connection_id kept: a reconnect updates it in
    # place); the connection the ledger held is gone (a reconnect makes a new one).
    ACTIVATED = "activated"
    BROKEN = "broken"
    DISCONNECTED = "disconnected"


# A tenant in one of these holds a working connection: final for a batch's writes (a run, a
# reminder or a late callback never replaces it; only sync, reading Versori, moves it on).
HELD_STATUSES = (Status.CONNECTED, Status.ACTIVATED)
# A tenant in one of these had a connection that stopped working: a reconnect email goes out.
LOST_STATUSES = (Status.BROKEN, Status.DISCONNECTED)

# A link in one of these is out with (or on its way to) the tenant until it expires.
LIVE_STATUSES = (
    Status.LINK_CREATED,
    Status.SENDING,
    Status.DELIVERED,
    Status.REMINDED,
    Status.OPENED,
    Status.DECLINED,
)
# A link out with the tenant whose admin has done nothing yet: a person's open or press makes
# it `opened` (the connect service).
WAITING_STATUSES = (Status.LINK_CREATED, Status.SENDING, Status.DELIVERED, Status.REMINDED)
# A tenant in one of these, with an unexpired link, needs nothing from the next run. A link
# that was created but not yet delivered (link_created, sending) is delivered by the next run.
# Opened and declined tenants were delivered: reminders chase them, runs leave them be.
DONE_STATUSES = (Status.DELIVERED, Status.REMINDED, Status.OPENED, Status.DECLINED)


class RunProgress(StrEnum):
    """How far a run got with a tenant, as an interrupted run's report counts it."""

    DONE = "done"
    FAILED = "failed"
    BEGUN = "begun"
    NOT_STARTED = "not_started"


def run_progress(status: str) -> RunProgress:
    """A ledger status as a run's progress, derived from the lists above so that the two
    cannot drift: done (DONE_STATUSES, or HELD_STATUSES), failed, begun (pending, or a live link
    not yet delivered), else not started (expired, broken, disconnected: the next run gives it
    a new link)."""
    if status in HELD_STATUSES or status in DONE_STATUSES:
        return RunProgress.DONE
    if status == Status.FAILED:
        return RunProgress.FAILED
    if status == Status.PENDING or status in LIVE_STATUSES:
        return RunProgress.BEGUN
    return RunProgress.NOT_STARTED


# Channels that send the link to the admin, which reminders send again.
SENDING_CHANNELS = ("email", "both")

metadata = MetaData()
records = Table(
    "onboarding_records",
    metadata,
    Column("tenant_id", String(128), primary_key=True),
    Column("connector_id", String(26), primary_key=True),
    Column("profile", String(200), nullable=False),
    Column("tenant_name", Text, nullable=False, default=""),
    Column("admin_email", String(320), nullable=False, default=""),
    Column("status", String(20), nullable=False),
    Column("url", Text),
    Column("state", String(256)),
    Column("created_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    Column("connected_at", DateTime(timezone=True)),
    Column("delivery_channel", String(20)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error_code", String(100)),
    Column("error_message", Text),
    Column("run_id", String(64)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Added for email delivery and reminders; nullable or defaulted so that an older ledger
    # gains them in place (see _add_missing_columns).
    Column("tenant_fields", JSON),
    Column("message_id", String(200)),
    Column("last_sent_at", DateTime(timezone=True)),
    Column("reminders", Integer, nullable=False, default=0, server_default=text("0")),
    Column("connection_id", String(200)),
    # sha256 of `state`: how a callback's state is looked up (see state_digest). Added in
    # place to an older ledger, and filled in for its rows, when it is opened (see migrate_schema).
    Column("state_hash", String(64), index=True),
    # Revision 0003 (sync, activation, reconnect): the tenant's end user in Versori (its id,
    # not its externalId), its activation on the profile's environment, why it is asked to
    # connect again (broken, disconnected; cleared once connected), and when sync last read it.
    Column("end_user_id", String(200)),
    Column("activation_id", String(200)),
    Column("activated_at", DateTime(timezone=True)),
    Column("reconnect_of", String(20)),
    Column("checked_at", DateTime(timezone=True)),
)

# Every state a tenant was given before its current one, so that a late OAuth callback carrying
# an old state can still be traced to its tenant.
superseded_links = Table(
    "onboarding_superseded_links",
    metadata,
    Column("state", String(256), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("superseded_at", DateTime(timezone=True), nullable=False),
    Column("state_hash", String(64), index=True),
)


# What each chunk of a fanned-out batch came to, written by the chunk's run when it ends: how
# the batch's parent learns it from a worker on another machine, and how a retried parent knows
# a chunk is done. The parent deletes its batch's rows once it has published the batch.
batch_chunks = Table(
    "onboarding_batch_chunks",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("flow_run_id", String(64)),
    Column("summary", JSON, nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
)


# Who is working on a (tenant, connector) right now: a run claims a tenant before it calls
# Versori or sends mail for it, and lets go once the tenant is decided. A claim holds only while
# its run's lease (below) is renewed, so a run that died frees its tenants within a lease.
claims = Table(
    "onboarding_claims",
    metadata,
    Column("tenant_id", String(128), primary_key=True),
    Column("connector_id", String(26), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)

# Each running batch's lease, renewed every few seconds while it runs (see Ledger.run_lease).
run_leases = Table(
    "onboarding_run_leases",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("alive_until", DateTime(timezone=True), nullable=False),
)


# The pace of each profile's Versori calls, shared by every process on this ledger: `next_at`
# (seconds since the epoch, the database's clock) is when the next call may start
# (see Ledger.reserve_calls).
paces = Table(
    "onboarding_paces",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("next_at", Float, nullable=False),
)


def tenant_row(tenant_id: str, connector_id: str) -> tuple[Any, Any]:
    """The WHERE clause of one tenant's record."""
    return records.c.tenant_id == tenant_id, records.c.connector_id == connector_id


def state_digest(state: str) -> str:
    """How a state is looked up: its sha256, hex. A state is a random value of Versori's
    (a CSRF token), so a plain hash cannot be reversed by guessing; the index is on this, and
    the lookup never compares the state itself."""
    return hashlib.sha256(state.encode()).hexdigest()


# pg_advisory_xact_lock(int, int): the two-key space, apart from the tenants' one-key locks.
_MIGRATION_LOCK = (0x6F6E62, 1)  # "onb", schema version lock


def create_private_sqlite_file(url: str) -> None:
    """Create a SQLite ledger's file readable by its owner only (0600) before SQLite opens it:
    it holds live links. SQLite gives its -wal and -shm files the same mode. An existing file
    keeps its mode (the operator chose it), but a readable-by-others one is logged."""
    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):
        return
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = os.path.abspath(database)
    if not os.path.isdir(os.path.dirname(path)):
        return  # SQLite's own error names the problem
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            log.warning("ledger %s is readable by other users: it holds live links", path)
        return
    except OSError:
        return
    os.close(fd)


def schema_version(engine: Engine) -> str | None:
    """The schema revision the ledger records (SCHEMA_VERSION when this code wrote it); None
    for a new ledger, or one written before the ledger was versioned."""
    with engine.connect() as conn:
        return ",".join(read_versions(conn)) or None


def migrate_schema(engine: Engine) -> None:
    """Create the tables, or bring a ledger made by an older version up to SCHEMA_VERSION (the
    revisions in onboarding/ledger/migrations/), in one transaction under a lock, so that any
    number of processes may open a new or older ledger at once (chunk runs starting
    together): the first does the work, the others wait and find it done.

    PostgreSQL: a transaction-scoped advisory lock; its DDL is transactional. SQLite: BEGIN
    IMMEDIATE takes the database's write lock first; its DDL is transactional too. Each
    revision stamps the version table in the same transaction, so a failed migration leaves
    the ledger as it was.

    A ledger at SCHEMA_VERSION is only read (its version table), never locked: on PostgreSQL,
    DDL takes locks on its tables, which deadlocked against a running batch's writes when chunk
    runs opened the ledger while others wrote (seen in the scale-out test). A ledger at a
    revision this code does not know, written by a newer version of this tool, is refused with
    InputError before anything is written."""
    with engine.connect() as conn:
        versions = read_versions(conn)
    if versions == (SCHEMA_VERSION,):
        return
    _refuse_newer(engine, versions)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:a, :b)"),
                {"a": _MIGRATION_LOCK[0], "b": _MIGRATION_LOCK[1]},
            )
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        versions = read_versions(conn)
        if versions == (SCHEMA_VERSION,):
            return  # another process did it while this one waited for the lock
        _refuse_newer(engine, versions)
        log.info("ledger: schema %s to %s", ",".join(versions) or "unversioned", SCHEMA_VERSION)
        upgrade(conn)


def _refuse_newer(engine: Engine, versions: tuple[str, ...]) -> None:
    """InputError for a ledger at a revision this code does not know: a newer version of this
    tool wrote it, and this one would corrupt it."""
    if not versions:
        return
    if set(versions) <= known_revisions():
        return
    where = redact(engine.url.render_as_string(hide_password=False))
    raise InputError(
        f"the ledger at {where} was written by a newer version of this tool "
        f"(schema {','.join(versions)}); upgrade this one"
    )


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (onboard status) run while a batch writes; NORMAL sync is durable in WAL
    # up to the last committed transaction, which is what crash-safe resume needs.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    # Turning a new file to WAL needs it to itself, and SQLite answers "database is locked" at
    # once rather than waiting while another connection does the same (seen in .ci/run: one of
    # six ledgers opened together on a new file failed): try again for a while.
    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
