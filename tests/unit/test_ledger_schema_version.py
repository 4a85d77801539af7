"""The ledger's schema version (onboarding/ledger/migrations/): a new ledger is made and stamped
at the head revision, an unversioned one (written before the ledger was versioned) is brought up
in place with its rows and stamped, one of a newer version is refused untouched (exit 2 from the
CLI), any number of processes may open a new ledger together, and the migrated schema is the
code's metadata, on SQLite and PostgreSQL (see the `ledger_url` fixture in conftest.py)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, Table, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from deployments.cli import app
from onboarding.errors import InputError
from onboarding.ledger import Ledger, state_digest
from onboarding.ledger.connect_links import connect_links
from onboarding.ledger.migrations import (
    SCHEMA_VERSION,
    VERSION_TABLE,
    known_revisions,
    script_directory,
    upgrade,
)
from onboarding.ledger.migrations.versions import v0001_baseline as baseline
from onboarding.ledger.schema import metadata, migrate_schema, schema_version
from tests.unit.test_ledger import CONNECTOR, HOUR, NOW, get, link

pytestmark = pytest.mark.timeout(180)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    engine = create_engine(ledger_url)
    try:
        yield engine
    finally:
        engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the ledger's schema the code's
    metadata: nothing, when the revisions make exactly the tables the code uses."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, metadata))


def snapshot(engine: Engine) -> dict[str, Any]:
    """Every table's columns, indexes and row count, and the recorded version."""
    with engine.connect() as conn:
        inspector = inspect(conn)
        tables = {
            name: (
                sorted(c["name"] for c in inspector.get_columns(name)),
                sorted(str(i["name"]) for i in inspector.get_indexes(name)),
                conn.execute(text(f"SELECT count(*) FROM {name}")).scalar(),
            )
            for name in inspector.get_table_names()
        }
    return {"tables": tables, "version": schema_version(engine)}


def test_the_schema_version_is_the_head_of_the_revisions() -> None:
    script = script_directory()
    assert script.get_heads() == [SCHEMA_VERSION], "one head, and SCHEMA_VERSION names it"
    chain = [(s.revision, s.down_revision) for s in script.walk_revisions()]
    numbers = range(int(SCHEMA_VERSION), 0, -1)
    assert chain == [(f"{n:04}", f"{n - 1:04}" if n > 1 else None) for n in numbers], (
        "one line of revisions, numbered 0001, 0002, ... each on the one before"
    )
    assert known_revisions() == {revision for revision, _ in chain}


def test_opening_a_ledger_at_the_head_does_not_import_alembic(tmp_path: Path) -> None:
    """Alembic (0.8 s to import) is loaded only when there is a migration to run: `onboard
    status` on a current ledger does without it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    code = (
        "import sys; from onboarding.ledger import Ledger; "
        f"Ledger({url!r}).close(); print(sorted(m for m in sys.modules if 'alembic' in m))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_new_ledger_is_stamped_at_the_head_with_the_codes_schema(
    ledger_url: str, engine: Engine
) -> None:
    assert schema_version(engine) is None
    Ledger(ledger_url).close()
    assert schema_version(engine) == SCHEMA_VERSION
    assert schema_diff(engine) == []
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
    assert tables == {t.name for t in metadata.sorted_tables} | {VERSION_TABLE}


def test_a_ledger_at_the_head_is_only_read(ledger_url: str, engine: Engine) -> None:
    """No lock, no DDL: opening a current ledger reads its version and nothing else."""
    Ledger(ledger_url).close()
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    migrate_schema(engine)
    assert statements, "it read the version"
    for statement in statements:
        first = statement.lstrip().split()[0].upper()
        assert first in ("SELECT", "PRAGMA", "WITH"), statement


def _older_ledger(engine: Engine) -> None:
    """An unversioned ledger as the code before versioning left it, less what older versions
    did not have: records and superseded links without state_hash (nor its index) and without
    reminders and connection_id; connect links without opened_count and their index; no
    claims, paces nor callback states tables. One row in each table that has it."""
    dropped = {
        "onboarding_records": {"state_hash", "reminders", "connection_id"},
        "onboarding_superseded_links": {"state_hash"},
        "onboarding_connect_links": {"opened_count"},
    }
    absent = {"onboarding_claims", "onboarding_paces", "onboarding_callback_states"}
    older = MetaData()
    for table in baseline.tables.sorted_tables:
        if table.name in absent:
            continue
        gone = dropped.get(table.name, set())
        # Column-level indexes (index=True) come with their columns; a table's Index does not.
        Table(table.name, older, *[c._copy() for c in table.columns if c.name not in gone])
    with engine.begin() as conn:
        older.create_all(conn)
        conn.execute(
            older.tables["onboarding_records"]
            .insert()
            .values(
                tenant_id="t1", connector_id=CONNECTOR, profile="p", tenant_name="T1",
                admin_email="a@t1.example.com", status="delivered", state="state-t1",
                url="https://login.example.com/authorize?state=state-t1", attempts=2,
                delivered_at=NOW, updated_at=NOW,
            )
        )  # fmt: skip
        conn.execute(
            older.tables["onboarding_superseded_links"]
            .insert()
            .values(
                state="state-t1-old", tenant_id="t1", connector_id=CONNECTOR,
                created_at=NOW - HOUR, superseded_at=NOW,
            )
        )  # fmt: skip
        conn.execute(
            older.tables["onboarding_connect_links"]
            .insert()
            .values(
                token_hash="a" * 64, tenant_id="t1", connector_id=CONNECTOR,
                profile_path="profile.yaml", csrf="c" * 20, created_at=NOW,
                expires_at=NOW + 72 * HOUR, opened_first_at=NOW, mint_count=0,
            )
        )  # fmt: skip


def test_an_unversioned_ledger_is_brought_up_in_place_with_its_rows(
    ledger_url: str, engine: Engine
) -> None:
    _older_ledger(engine)
    assert schema_version(engine) is None
    ledger = Ledger(ledger_url)
    try:
        assert schema_version(engine) == SCHEMA_VERSION
        record = get(ledger, "t1")
        assert (record.status, record.attempts, record.reminders) == ("delivered", 2, 0)
        assert record.state_hash == state_digest("state-t1"), "its state hashed"
        found = ledger.find_by_state("state-t1")
        assert found is not None and found.tenant_id == "t1"
        old = ledger.find_superseded("state-t1-old")
        assert old is not None and old.tenant_id == "t1"
        with engine.connect() as conn:
            row = conn.execute(select(connect_links)).one()
        assert (row.opened_count, row.fetched_count, row.fetched_first_at) == (0, 0, None)
        link(ledger, "t2")  # written to as any ledger
        assert get(ledger, "t2").attempts == 1
    finally:
        ledger.close()
    assert schema_diff(engine) == [], "the columns, indexes and tables it lacked were added"
    before = snapshot(engine)
    Ledger(ledger_url).close()
    assert snapshot(engine) == before, "opened again: nothing left to do"


def test_a_ledger_of_the_baseline_revision_gains_the_next_one(
    ledger_url: str, engine: Engine
) -> None:
    with engine.begin() as conn:
        baseline.tables.create_all(conn)
        conn.execute(text(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text(f"INSERT INTO {VERSION_TABLE} VALUES ('0001')"))
    Ledger(ledger_url).close()
    assert schema_version(engine) == SCHEMA_VERSION
    assert schema_diff(engine) == []


@pytest.mark.parametrize("had_fetched_columns", [True, False])
def test_a_ledger_of_the_unversioned_connect_states_commit_is_stamped(
    ledger_url: str, engine: Engine, had_fetched_columns: bool
) -> None:
    """Commit 4f696e6, unversioned, created the connect states table on any ledger, and the
    fetched columns on a new one only: revision 0002 keeps whatever of it is there."""
    with engine.begin() as conn:
        upgrade(conn, to="0002")
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        if not had_fetched_columns:
            for column in ("fetched_count", "fetched_first_at", "fetched_last_at"):
                conn.execute(text(f"ALTER TABLE onboarding_connect_links DROP COLUMN {column}"))
    assert schema_version(engine) is None
    Ledger(ledger_url).close()
    assert schema_version(engine) == SCHEMA_VERSION
    assert schema_diff(engine) == []


def _newer_ledger(ledger_url: str, engine: Engine) -> dict[str, Any]:
    """A ledger stamped with a revision this code does not know, and lacking a table, a column
    and the state hashes that a migration would add: what it holds."""
    Ledger(ledger_url).close()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE onboarding_paces"))
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '0099'"))
    return snapshot(engine)


def test_a_ledger_of_a_newer_version_is_refused_and_left_as_it_was(
    ledger_url: str, engine: Engine
) -> None:
    url = make_url(ledger_url)
    if url.get_backend_name() == "postgresql":  # trust auth: the password is not checked
        ledger_url = url.set(password="pw-sekret").render_as_string(hide_password=False)
    before = _newer_ledger(ledger_url, engine)
    assert before["version"] == "0099"
    with pytest.raises(InputError) as refused:
        Ledger(ledger_url)
    shown = make_url(ledger_url).render_as_string(hide_password=True)
    assert str(refused.value) == (
        f"the ledger at {shown} was written by a newer version of this tool (schema 0099); "
        "upgrade this one"
    )
    assert "pw-sekret" not in str(refused.value)
    assert snapshot(engine) == before, "nothing written: no table, no column, no stamp"


@pytest.fixture
def newer_ledger_env(
    ledger_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    before = _newer_ledger(ledger_url, engine)
    monkeypatch.setenv("ONBOARD_DB_URL", ledger_url)
    return before


def test_onboard_status_and_run_exit_2_on_a_ledger_of_a_newer_version(
    newer_ledger_env: dict[str, Any], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, Any]] = []
    monkeypatch.setattr("deployments.cli._summary_of_run", lambda _f, **kw: started.append(kw))
    run = [
        "run", "--roster", str(EXAMPLES / "tenants.csv"),
        "--profile", str(EXAMPLES / "profile.yaml"), "--dry-run",
    ]  # fmt: skip
    for args in (["status"], run, ["export", "--format", "csv"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        said = " ".join(result.stderr.split())  # the console may wrap
        assert "was written by a newer version of this tool (schema 0099); upgrade this" in said
    assert started == [], "no run started"
    assert snapshot(engine) == newer_ledger_env


# --- opened together ---------------------------------------------------------------------------


def _open(url: str, go: Any) -> None:
    go.wait()
    Ledger(url).close()


def test_six_processes_opening_a_new_ledger_together_all_open(
    ledger_url: str, engine: Engine
) -> None:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(6)
    children = [ctx.Process(target=_open, args=(ledger_url, go)) for _ in range(6)]
    for child in children:
        child.start()
    for child in children:
        child.join(150)
    assert [child.exitcode for child in children] == [0] * 6
    assert schema_version(engine) == SCHEMA_VERSION
    assert schema_diff(engine) == []


def test_six_threads_opening_an_unversioned_ledger_together_migrate_it_once(
    ledger_url: str, engine: Engine
) -> None:
    """Separate engines in one process: Alembic's module-wide `op` is not shared mid-way."""
    _older_ledger(engine)
    go = threading.Barrier(6)
    errors: list[str] = []

    def open_one() -> None:
        try:
            _open(ledger_url, go)
        except Exception as err:
            errors.append(repr(err)[:300])

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert schema_version(engine) == SCHEMA_VERSION
    assert schema_diff(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM onboarding_records")).scalar() == 1
