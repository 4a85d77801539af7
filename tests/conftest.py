"""Shared fixtures: a ledger URL per backend (SQLite file, PostgreSQL schema) and a Ledger on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from onboarding.ledger import Ledger

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
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (own database) for every flow test of the session."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # No flow-run heartbeats: no test watches them, and waiting for their thread at the end
    # of each flow run cost up to a second a run (see flows/local.py).
    with (
        prefect_test_harness(server_startup_timeout=60),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `prefect server start` process (SQLite in its own home) for every end-to-end
    test of the session that can share it: starting one costs ~15-20 s on this machine, and
    each `onboard` command without PREFECT_API_URL would start a temporary server of its own.
    Yields the API URL."""
    from tests.helpers import prefect_server

    with prefect_server(tmp_path_factory.mktemp("shared-prefect-server")) as api:
        yield api
