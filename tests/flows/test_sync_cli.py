"""`onboard sync` in this process (its flow run on the session's Prefect server), against the
emulator and a SQLite ledger: a dry run writes nothing, to the ledger or to Versori; a real
one prints its summary; bad input exits 2 naming it, before any call and before a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import deployments.sync_cli as sync_cli
from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from deployments.cli import app
from onboarding.ledger import Ledger, Status
from tests.flows.test_sync_connections import CRM, PROFILE, elsewhere, linked

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(60)]

runner = CliRunner()


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        monkeypatch.setenv("VERSORI_BASE_URL", server.base_url)
        yield server


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    with Ledger(db) as opened:
        yield opened


def test_a_dry_run_says_what_would_change_and_writes_nothing(
    ledger: Ledger, emulator: EmulatorServer
) -> None:
    linked(ledger, "t1", "t2")
    elsewhere(emulator, "t1")
    before = ledger.get("t1", CRM)

    result = runner.invoke(app, ["sync", "--profile", PROFILE, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "acme-crm (Acme CRM), platform-v2: 2 tenant(s); would change: connected 1" in (
        result.stdout
    )
    assert "Dry run: nothing written" in result.stdout
    assert ledger.get("t1", CRM) == before, "not a column written: status, end user, checked_at"
    activations = httpx.get(f"{emulator.base_url}/_emulator/activations").json()["activations"]
    assert activations == []
    writes = [call for call in emulator.calls() if not call.startswith("GET ")]
    assert writes == [], "a dry run only reads Versori"

    done = runner.invoke(app, ["sync", "--profile", PROFILE])
    assert done.exit_code == 0, done.output
    assert "changed: connected 1; activated 1;" in done.stdout
    assert "Activated 1 tenant(s), 0 refused;" in done.stdout
    record = ledger.get("t1", CRM)
    assert record is not None and record.status is Status.ACTIVATED


def test_a_missing_profile_exits_2_naming_it_before_any_call(
    ledger: Ledger, emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input starts no flow run")

    monkeypatch.setattr("flows.running.in_process.run_here", no_run)
    missing = tmp_path / "nowhere.yaml"
    result = runner.invoke(app, ["sync", "--profile", PROFILE, "--profile", str(missing)])
    assert result.exit_code == 2, result.output
    assert "Bad input" in result.stderr and "nowhere.yaml" in result.stderr
    assert emulator.calls() == {}


def test_no_ledger_exits_2_naming_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent.db"
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{absent}")
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    result = runner.invoke(app, ["sync", "--profile", PROFILE])
    assert result.exit_code == 2, result.output
    assert f"No ledger at {absent}" in result.stderr
    assert not absent.exists()


def test_the_summary_names_refusals_by_versoris_code() -> None:
    summary = {
        "dry_run": False,
        "seconds": 1.5,
        "versori_calls": 7,
        "activation_calls": 2,
        "activated": 1,
        "refused": {"unprocessable": 1},
        "refusals": [{"tenant_id": "t9", "code": "unprocessable", "message": "no"}],
        "profiles": [
            {
                "profile": "acme-crm",
                "display_name": "Acme CRM",
                "api": "platform-v2",
                "tenants": 3,
                "changes": {"connected": 2, "broken": 1},
                "activated": 1,
                "raced": 0,
                "versori_calls": 5,
                "seconds": 1.2,
            }
        ],
    }
    assert sync_cli.summary_lines(summary) == [
        "acme-crm (Acme CRM), platform-v2: 3 tenant(s); changed: connected 2, broken 1; "
        "activated 1; 5 Versori call(s) in 1.2 s",
        "Activations refused by Versori: unprocessable 1 (the next sync tries again):",
        "  t9: unprocessable: no",
        "Activated 1 tenant(s), 1 refused; 7 Versori call(s) in all (2 for activations); 1.5 s.",
    ]
