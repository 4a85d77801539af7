"""Issue 10, defects 2 and 8: concurrent writers of one tenant lose no state Versori returned,
and ledgers opened at once on an empty database all open (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, text

from onboarding.ledger import Ledger, Status
from tests.unit.test_ledger import CONNECTOR, NOW, get, link

pytestmark = pytest.mark.timeout(180)


def _issue(ledger: Ledger, tenant: str, state: str, run_id: str) -> None:
    link(
        ledger,
        tenant,
        state=state,
        url=f"https://login.example.com/authorize?state={state}",
        run_id=run_id,
    )


def _every_state_is_kept(ledger: Ledger, tenant: str, issued: list[str]) -> None:
    current = get(ledger, tenant).state
    lost = [
        s
        for s in issued
        if s != current
        and (ledger.find_superseded(s) is None or ledger.find_by_state(s) is not None)
    ]
    assert lost == [], f"{len(lost)} of {len(issued)} states in neither the row nor the history"


@pytest.mark.parametrize("shared", [False, True], ids=["ledger-per-writer", "one-ledger"])
def test_concurrent_writers_of_one_tenant_keep_every_state(ledger_url: str, shared: bool) -> None:
    """Eight writers re-issue the same two tenants' links at once, each through its own Ledger
    (as separate runs of one profile do) or one shared Ledger (one run's threads)."""
    writers, rounds = 8, 25
    ledgers = [Ledger(ledger_url) for _ in range(1 if shared else writers)]
    start = threading.Barrier(writers)

    def work(w: int) -> list[str]:
        ledger = ledgers[0 if shared else w]
        start.wait()
        states = []
        for n in range(rounds):
            for tenant in ("t1", "t2"):
                state = f"{tenant}-w{w}-n{n}"
                _issue(ledger, tenant, state, f"run-{w}")
                states.append(state)
        return states

    try:
        with ThreadPoolExecutor(writers) as pool:
            issued = [s for f in [pool.submit(work, w) for w in range(writers)] for s in f.result()]
        for tenant in ("t1", "t2"):
            mine = [s for s in issued if s.startswith(f"{tenant}-")]
            _every_state_is_kept(ledgers[0], tenant, mine)
            assert get(ledgers[0], tenant).attempts == writers * rounds, "attempts are exact"
    finally:
        for ledger in ledgers:
            ledger.close()


def test_a_button_minting_while_runs_reissue_keeps_every_state(ledger_url: str) -> None:
    """The connect service's button (record_minted_link, on PostgreSQL one statement that
    takes the tenant's lock itself) racing a batch's re-issues (record_link) of the same
    tenant, in several ledgers: every state is the row's or in its history, every write
    counted once, and every minted state bound to its link."""
    writers, rounds = 6, 20
    ledgers = [Ledger(ledger_url) for _ in range(writers)]
    _issue(ledgers[0], "t1", "t1-first", "run-0")
    start = threading.Barrier(writers)

    def work(w: int) -> list[str]:
        ledger = ledgers[w]
        start.wait()
        states = []
        for n in range(rounds):
            state = f"t1-w{w}-n{n}"
            if w % 2:
                _issue(ledger, "t1", state, f"run-{w}")
            else:
                assert ledger.record_minted_link(
                    tenant_id="t1",
                    connector_id=CONNECTOR,
                    url=f"https://login.example.com/authorize?state={state}",
                    state=state,
                    created_at=NOW,
                    expires_at=NOW + timedelta(hours=1),
                    link_hash="l" * 64,
                    browser_hash="b" * 64,
                )
            states.append(state)
        return states

    try:
        with ThreadPoolExecutor(writers) as pool:
            issued = [s for f in [pool.submit(work, w) for w in range(writers)] for s in f.result()]
        _every_state_is_kept(ledgers[0], "t1", ["t1-first", *issued])
        assert get(ledgers[0], "t1").attempts == 1 + writers * rounds, "attempts are exact"
        minted = [s for s in issued if int(s.split("-w")[1].split("-")[0]) % 2 == 0]
        bound = [ledgers[0].find_state(s) for s in minted]
        assert all(b is not None and b.link_hash == "l" * 64 for b in bound)
    finally:
        for ledger in ledgers:
            ledger.close()


def _process_writer(url: str, w: int, rounds: int, go: Any) -> None:
    ledger = Ledger(url)
    try:
        go.wait()
        for n in range(rounds):
            _issue(ledger, "t1", f"t1-p{w}-n{n}", f"run-{w}")
    finally:
        ledger.close()


def test_concurrent_processes_of_one_tenant_keep_every_state(ledger_url: str) -> None:
    Ledger(ledger_url).close()  # the schema, so that the processes race on the row only
    procs, rounds = 3, 30
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(procs)
    children = [
        ctx.Process(target=_process_writer, args=(ledger_url, w, rounds, go)) for w in range(procs)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    ledger = Ledger(ledger_url)
    try:
        issued = [f"t1-p{w}-n{n}" for w in range(procs) for n in range(rounds)]
        _every_state_is_kept(ledger, "t1", issued)
        assert get(ledger, "t1").attempts == procs * rounds
    finally:
        ledger.close()


def test_a_reissue_racing_a_callback_keeps_both(ledger_url: str) -> None:
    """A callback connecting the tenant while a re-issue is written: the tenant stays connected
    with its state, and the re-issued state is in the history (refused as superseded)."""
    first, second = Ledger(ledger_url), Ledger(ledger_url)
    try:
        for n in range(20):
            tenant = f"r{n}"
            _issue(first, tenant, f"{tenant}-old", "run-1")
            go = threading.Barrier(2)

            def reissue(tenant: str = tenant, go: threading.Barrier = go) -> None:
                go.wait()
                _issue(first, tenant, f"{tenant}-new", "run-2")

            def callback(tenant: str = tenant, go: threading.Barrier = go) -> None:
                go.wait()
                second.connect_state(f"{tenant}-old", connection_id="c", at=NOW)

            threads = [threading.Thread(target=reissue), threading.Thread(target=callback)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            record = get(first, tenant)
            _every_state_is_kept(first, tenant, [f"{tenant}-old", f"{tenant}-new"])
            if record.status is Status.CONNECTED:
                assert record.state == f"{tenant}-old"
            else:
                assert record.state == f"{tenant}-new"
    finally:
        first.close()
        second.close()


# --- defect 8: the schema ---------------------------------------------------------------------


def test_six_ledgers_opened_at_once_on_an_empty_database_all_open(ledger_url: str) -> None:
    for trial in range(3):
        if trial:  # back to an empty database: every table, the schema version's too
            engine = create_engine(ledger_url)
            with engine.begin() as conn:
                tables = MetaData()
                tables.reflect(conn)
                tables.drop_all(conn)
            engine.dispose()
        start = threading.Barrier(6)

        def open_one(_: int, start: threading.Barrier = start) -> Ledger:
            start.wait()
            return Ledger(ledger_url)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(open_one, n) for n in range(6)]
            opened = []
            errors = []
            for future in futures:
                try:
                    opened.append(future.result())
                except Exception as err:
                    errors.append(repr(err)[:200])
        for ledger in opened:
            ledger.close()
        assert errors == [], f"trial {trial}: {len(errors)} of 6 did not open: {errors[0]}"
    ledger = Ledger(ledger_url)
    try:
        link(ledger, "t1")
        assert get(ledger, "t1").attempts == 1
    finally:
        ledger.close()


def test_a_schema_error_is_not_reported_as_bad_input(ledger_url: str) -> None:
    """A database object in the way of the ledger's tables: the ledger answered, so this is
    not bad input (exit 2, "check ONBOARD_DB_URL"), but a schema error."""
    from onboarding.errors import InputError

    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE VIEW onboarding_superseded_links AS SELECT 'x' AS state"))
    engine.dispose()
    with pytest.raises(Exception) as info:
        Ledger(ledger_url)
    assert not isinstance(info.value, InputError), str(info.value)
    assert type(info.value).__name__ == "LedgerSchemaError"
    assert "check ONBOARD_DB_URL" not in str(info.value)


def test_opening_an_older_ledger_hashes_its_states(ledger_url: str) -> None:
    """A ledger written before the state hash existed: opening it adds the column, its index,
    and the hashes, so its tenants' callbacks are still found."""
    ledger = Ledger(ledger_url)
    link(ledger, "t1", state="state-old-1")
    link(ledger, "t1", state="state-old-2", created_at=NOW + timedelta(hours=1))
    ledger.close()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:  # back to the older, unversioned schema, rows kept
        for table in ("onboarding_records", "onboarding_superseded_links"):
            conn.execute(text(f"DROP INDEX IF EXISTS ix_{table}_state_hash"))
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN state_hash"))
        for column in (
            "end_user_id",
            "activation_id",
            "activated_at",
            "reconnect_of",
            "checked_at",
        ):
            # Revision 0003's: a ledger from before versioning never had them.
            conn.execute(text(f"ALTER TABLE onboarding_records DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE onboarding_schema_version"))  # from before versioning
    engine.dispose()
    reopened = Ledger(ledger_url)
    try:
        assert get(reopened, "t1").state == "state-old-2"
        record = reopened.find_by_state("state-old-2")
        assert record is not None and record.tenant_id == "t1"
        old = reopened.find_superseded("state-old-1")
        assert old is not None and old.tenant_id == "t1"
    finally:
        reopened.close()
    Ledger(ledger_url).close()  # again: nothing left to do


def test_opening_an_up_to_date_ledger_never_waits_for_a_writer(ledger_url: str) -> None:
    """A chunk run opening the ledger while a batch writes to it: on PostgreSQL, re-running the
    schema's `CREATE INDEX IF NOT EXISTS` took a SHARE lock on a table being written, which
    waited for the writer and, in the scale-out test, deadlocked. An up-to-date ledger is only
    read from the catalog."""
    if not ledger_url.startswith("postgresql"):
        pytest.skip("SQLite's writers lock the whole file, not tables: nothing to show there")
    from onboarding.ledger import superseded_links

    first = Ledger(ledger_url)
    try:
        with first.engine.connect() as conn:
            writing = conn.begin()
            conn.execute(
                superseded_links.insert().values(
                    state="s-1", tenant_id="t1", connector_id="c1", superseded_at=NOW
                )
            )
            opened: list[Ledger] = []
            opener = threading.Thread(target=lambda: opened.append(Ledger(ledger_url)))
            opener.start()
            opener.join(10)
            waited = opener.is_alive()
            writing.rollback()
            opener.join(30)
        assert not waited, "opening the ledger waited for another transaction's writes"
        for ledger in opened:
            ledger.close()
    finally:
        first.close()
