"""The ledger's schema versions: Alembic revisions (versions/), run by `migrate_schema`
(onboarding/ledger/schema.py) when a ledger is opened, under its lock, in one transaction. The
ledger records its revision in `onboarding_schema_version` (not Alembic's default table name:
the ledger may share a database), so a ledger written by a newer version of this tool is
refused before anything is written, instead of being "brought up to date" by older code.

Why Alembic rather than the hand-written additive DDL it replaces: that DDL compared the
catalog with the tables it knew and added what was missing, which cannot tell a newer ledger
from an older one (an older version running against a newer ledger corrupted it), and cannot
express a change that is not additive (a rename, a type change, a data move). A version table
and ordered revisions do both; Alembic brings the revision graph, the version table, the
operations (batch mode for SQLite's ALTER TABLE) and `compare_metadata` for the test that the
migrated schema is the code's, and it is already installed (Prefect's server uses it). What it
costs is small here: no alembic.ini, no env.py, no step for the operator: the revisions ship in
the package and run programmatically (`upgrade`, below) when any process opens the ledger.

Adding a revision (forward only: the tool never downgrades; restore a backup instead):
1. Change the tables in SQLAlchemy metadata (schema.py, connect_links.py, ...).
2. Write versions/v000N_<slug>.py: `revision = "000N"`, `down_revision` the previous one, and
   `upgrade()` with explicit `alembic.op` calls (op.create_table, op.add_column, ...; as in
   v0002_connect_states.py, whose has-it-already checks are for the one unversioned commit
   before it: a new revision needs none). Never import the live tables into a revision: a
   revision is frozen at the schema it makes. On SQLite, a change that is not additive (drop
   or alter a column) goes in `with op.batch_alter_table(name) as batch:` (a table copy).
3. Set SCHEMA_VERSION below to "000N". tests/unit/test_ledger_schema_version.py checks that it
   is the head, and that the migrated schema equals the metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, inspect, text

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

# The revision this code writes and reads (the head of versions/).
SCHEMA_VERSION = "0003"
# Where a ledger records its revision.
VERSION_TABLE = "onboarding_schema_version"

_HERE = Path(__file__).parent
# Alembic's `op` is a module-wide proxy: two ledgers migrated at once in one process (each
# under its own database lock) would otherwise share it.
_RUNNING = threading.Lock()


def read_versions(conn: Connection) -> tuple[str, ...]:
    """The revision(s) the ledger records; () for a ledger that records none (a new one, or
    one written before the ledger was versioned)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return ()
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    return tuple(sorted(str(row[0]) for row in rows))


@functools.cache
def script_directory() -> ScriptDirectory:
    """The revisions shipped with this code (Alembic imported on first use only: the fast
    path, a ledger at SCHEMA_VERSION, never needs it)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(_HERE), version_locations=[str(_HERE / "versions")])


def known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in script_directory().walk_revisions())


def upgrade(conn: Connection, to: str = SCHEMA_VERSION) -> None:
    """Run the revisions from the ledger's one to `to` on `conn`, inside the caller's
    transaction (which holds the migration lock): they commit with it, or not at all. Stamps
    the version table as each revision lands."""
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    script = script_directory()

    def steps(heads: Any, _context: Any) -> Any:
        return script._upgrade_revs(to, heads)

    context = MigrationContext.configure(
        conn,
        opts={"version_table": VERSION_TABLE, "transactional_ddl": True, "fn": steps},
    )
    with _RUNNING, Operations.context(context):
        context.run_migrations()
