"""Shared fixtures: a ledger URL per backend (SQLite file, PostgreSQL schema) and a Ledger on it;
the session's Prefect server (started in the background, its tests run last) for the flow and
end-to-end tests."""

from __future__ import annotations

import atexit
import inspect
import os
import shutil
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest


def _share_bytecode_with_child_processes() -> None:
    """Where bytecode caching is off (PYTHONDONTWRITEBYTECODE, as on this machine kind, whose
    virtualenv also holds no .pyc), every Python process the suite starts (each `onboard`
    command, Prefect server, temporary server, worker and chunk run: dozens) compiled Prefect
    and its database migrations from source again, 2 to 3 s of CPU each on 2 cores, and this
    process did too while collecting. Keep bytecode in a cache folder outside the project and
    the virtualenv (`_bytecode_cache`): this process fills it as it imports, and its children,
    which inherit the environment, read it. The code that runs is the same; Python checks each
    cached file against its source's modification time and size, as with __pycache__."""
    if not sys.dont_write_bytecode or sys.pycache_prefix or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = _bytecode_cache()
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _bytecode_cache() -> str:
    """<temp dir>/onboard-tests-pycache-<uid>, kept from one session to the next (collecting
    the suite takes 3 s with it warm, 7 s without a cache, 9 s filling a new one), if it is a
    folder of this user's that no one else may write; else a new folder for this session."""
    if hasattr(os, "getuid"):
        kept = Path(tempfile.gettempdir()) / f"onboard-tests-pycache-{os.getuid()}"
        try:
            kept.mkdir(mode=0o700, exist_ok=True)
            info = kept.lstat()
            mine = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            if mine and not info.st_mode & 0o077:
                return str(kept)
        except OSError:
            pass
    fresh = tempfile.mkdtemp(prefix="onboard-tests-pycache-")
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    return fresh


# Before the imports below, so that what they load is cached too.
_share_bytecode_with_child_processes()

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from onboarding.ledger import Ledger  # noqa: E402

PG_URL = os.environ.get("ONBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# Why PostgreSQL did not answer, once known, so later tests skip without waiting again.
_pg_down: list[str] = []


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database: a SQLite file, or a schema of its own in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    if _pg_down:
        pytest.skip(_pg_down[0])
    admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    schema = f"t_{uuid.uuid4().hex}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except SQLAlchemyError as err:
        admin.dispose()
        redacted = make_url(PG_URL).render_as_string(hide_password=True)
        why = str(getattr(err, "orig", None) or err).splitlines()[0]
        _pg_down.append(f"PostgreSQL at {redacted} (ONBOARD_TEST_PG_URL) does not answer: {why}")
        pytest.skip(_pg_down[0])
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger(ledger_url)
    try:
        yield ledger
    finally:
        ledger.close()


@pytest.fixture(scope="session")
def prefect_harness(prefect_api: str) -> Iterator[None]:
    """Flow tests run their flows in this process against the session's real Prefect server
    (`prefect_api`, below), as `onboard run` does on a server: one server start for the whole
    session instead of a second one, Prefect's test harness's, which cost as long again.
    Each test keeps its own emulator, ledger and roster; what a test reads back from the server
    it filters by its own flow run (ids, or created after it started)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )
    from prefect.utilities.asyncutils import run_coro_as_sync

    # No flow-run heartbeats: no test watches them, and waiting for their thread at the end
    # of each flow run cost up to a second a run (see flows/running/in_process.py).
    with ExitStack() as stack:
        stack.enter_context(
            temporary_settings(
                updates={PREFECT_API_URL: prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            )
        )
        # As prefect_test_harness does: these settings are also the process-wide ones, for
        # code running in a context copied before this fixture.
        stack.enter_context(_temporary_global_settings_context(get_settings_context()))
        yield

        # Send what the workers still hold (logs, events) while the server is up.
        async def drain() -> None:
            try:
                result = APILogWorker.instance().drain()
                if inspect.isawaitable(result):
                    await result
            except RuntimeError:  # never started
                pass
            drained = EventsWorker.drain_all()
            if inspect.isawaitable(drained):
                await drained

        run_coro_as_sync(drain())


class SharedPrefectServer:
    """The session's `prefect server start` (demo.processes.prefect_server), started in a thread
    of its own so that the tests that do not need it run meanwhile; `api()` waits for it.
    Once it answers, its database is copied (see `migrated_prefect_db`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.migrated_db = root / "migrated-prefect.db"
        self._url = ""
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="prefect-server", daemon=True)

    def start(self) -> SharedPrefectServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        from demo.processes import prefect_server

        try:
            with prefect_server(self.root) as url:
                # Its database as the server started: migrated and its block types
                # registered, no test's data yet.
                copy_sqlite(self.root / "prefect-server-home" / "prefect.db", self.migrated_db)
                self._url = url
                self._ready.set()
                self._stop.wait()
        except BaseException as error:  # handed to the test that waits for the server
            self._error = error
        finally:
            self._ready.set()

    def api(self) -> str:
        self._ready.wait()
        if self._error is not None or not self._url:
            raise RuntimeError("the session's Prefect server did not start") from self._error
        return self._url

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _needs_prefect_api(item: pytest.Item) -> bool:
    return "prefect_api" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests on the session's Prefect server (`prefect_api`, flow tests included) run after
    the others, in their usual order, so that the server, started in the background before the
    first test (`_shared_prefect_server`), is up by then instead of being waited for: it takes
    15-25 s to start on this machine. The order within each group is unchanged."""
    items.sort(key=_needs_prefect_api)


@pytest.fixture(scope="session", autouse=True)
def _shared_prefect_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedPrefectServer | None]:
    """Starts the session's Prefect server before the first test if any test of the session
    needs it; stops it at the end."""
    if not any(_needs_prefect_api(item) for item in request.session.items):
        yield None
        return
    server = SharedPrefectServer(tmp_path_factory.mktemp("shared-prefect-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(_shared_prefect_server: SharedPrefectServer | None) -> str:
    """One real `prefect server start` process (SQLite in its own home) for every end-to-end
    and flow test of the session that can share it (flow tests through `prefect_harness`):
    starting one costs 15-25 s on this machine, and each `onboard` command without
    PREFECT_API_URL would start a temporary server of its own. The API URL."""
    assert _shared_prefect_server is not None, "started for every session that needs it"
    return _shared_prefect_server.api()


@pytest.fixture(scope="session")
def migrated_prefect_db(
    _shared_prefect_server: SharedPrefectServer | None, prefect_api: str
) -> Path:
    """A Prefect database file at this Prefect version's schema, as `prefect_api`'s server had
    created it before any test ran. Put in an `onboard` command's Prefect home as prefect.db,
    Prefect's temporary server for that command finds it migrated, as on any run but a
    machine's first, instead of running every migration again (10 s or more here)."""
    assert _shared_prefect_server is not None
    return _shared_prefect_server.migrated_db


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database that a live process may be writing."""
    import sqlite3

    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
