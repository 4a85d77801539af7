"""Large rosters as chunks: child flow runs in-process, one table for the batch, chunks that
are not run twice, a chunk that dies without reporting. Under Prefect's test harness, against
the emulator on a real socket. (Chunks on a work pool's workers: tests/test_scale_out.py.)"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowFilter,
    FlowFilterName,
)

import flows.onboard_chunk as chunk_module
from flows.batch import Tally
from flows.fan_out import split
from flows.onboard_tenants import onboard_tenants
from onboarding.emulator import DEFAULT_API_KEY, EmulatorServer
from onboarding.ledger import Ledger, Status
from onboarding.onboard import TenantOutcome
from onboarding.roster import load_roster

PROFILE = str(Path(__file__).resolve().parent.parent / "examples" / "profile.yaml")
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"


# --- pure parts --------------------------------------------------------------------------------


def test_split_covers_every_position_once() -> None:
    chunks = split(2501, 1000)
    assert [(c.first, c.stop) for c in chunks] == [(0, 1000), (1000, 2000), (2000, 2501)]
    assert chunks[2].label == "chunk 3 (tenants 2001-2501)"
    assert split(1000, 1000) == split(1000, 5000)[:1]
    assert split(0, 10) == []


def outcome(n: int, failed: bool = False) -> TenantOutcome:
    if failed:
        return TenantOutcome(f"t{n:05d}", "failed", error_code="unavailable", error_message="503")
    return TenantOutcome(f"t{n:05d}", "delivered", link_host="x.example.com")


def test_a_tally_counts_everything_and_keeps_a_bounded_sample_failures_first() -> None:
    tally = Tally(keep=10)
    for n in range(10_000):
        tally.add(outcome(n, failed=n % 1000 == 999))
    assert tally.total == 10_000
    assert tally.by_status == {"delivered": 9990, "failed": 10}
    assert tally.errors == {"unavailable": 10}
    rows = tally.rows()
    assert len(rows) == 10 and all(r["status"] == "failed" for r in rows)
    assert rows[0]["tenant_id"] == "t00999", "failures in tenant order"


def test_a_tally_merges_chunk_summaries_into_one_table() -> None:
    first, second = Tally(keep=4), Tally(keep=4)
    for n in range(3):
        first.add(outcome(n))
    second.add(outcome(7, failed=True))
    second.add(outcome(8))
    batch = Tally(keep=4)
    for part in (first, second):
        batch.merge({"by_status": part.by_status, "errors": part.errors, "outcomes": part.rows()})
    assert batch.total == 5 and batch.by_status["failed"] == 1
    assert [r["tenant_id"] for r in batch.rows()] == ["t00007", "t00000", "t00001", "t00002"]


# --- the flow ----------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    with EmulatorServer() as emulator:
        monkeypatch.setenv("VERSORI_BASE_URL", emulator.base_url)
        yield {"db": db, "tmp": tmp_path, "emulator": emulator}


def write_roster(path: Path, n: int) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i in range(n):
            w.writerow([f"c{i:04d}", f"Tenant {i}", f"admin@c{i}.example.com", f"c{i}"])
    return str(path)


def chunk_runs() -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["onboard-tenants-chunk"]))
        )


def table_of(flow_run_id: Any) -> list[dict[str, str]]:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["onboarding-zendesk-demo"])),
            limit=1,
            sort="CREATED_DESC",  # type: ignore[arg-type]
        )
        assert artifact.flow_run_id == flow_run_id
        data = artifact.data
        return list(json.loads(data) if isinstance(data, str) else data)  # type: ignore[arg-type]


@pytest.mark.usefixtures("prefect_harness")
def test_a_roster_over_chunk_size_runs_as_child_flow_runs(env: dict[str, Any]) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 25)
    before = {r.id for r in chunk_runs()}
    state = onboard_tenants(
        roster=roster, profile=PROFILE, chunk_size=10, concurrency=4, return_state=True
    )
    summary = state.result()
    assert state.is_completed(), state.message
    assert summary["total"] == 25 and summary["by_status"] == {"delivered": 25}
    assert env["emulator"].stats()["requests"] == 25, "each tenant initialised once"

    children = [r for r in chunk_runs() if r.id not in before]
    assert sorted(r.name for r in children) == [
        "chunk 1/3: tenants 1-10",
        "chunk 2/3: tenants 11-20",
        "chunk 3/3: tenants 21-25",
    ]
    assert all(r.state and r.state.is_completed() for r in children)
    assert all(r.parent_task_run_id is not None for r in children), "linked to the parent"
    assert all("profile:zendesk-demo" in r.tags for r in children)

    rows = table_of(state.state_details.flow_run_id)
    assert len(rows) == 25 and {r["status"] for r in rows} == {"delivered"}
    ledger = Ledger(env["db"])
    records = list(ledger.iter_records(CONNECTOR))
    assert len(records) == 25
    assert all(r.status is Status.DELIVERED and r.attempts == 1 for r in records)
    assert ledger.chunk_summary(str(state.state_details.flow_run_id), 0) is None, "cleaned up"
    ledger.close()

    again = onboard_tenants(roster=roster, profile=PROFILE, chunk_size=10, return_state=True)
    assert again.result()["by_status"] == {"skipped": 25}
    assert env["emulator"].stats()["requests"] == 25


@pytest.mark.usefixtures("prefect_harness")
def test_a_finished_chunk_run_again_does_nothing_twice(env: dict[str, Any]) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 6)
    digest = load_roster(roster).digest
    params: dict[str, Any] = dict(
        profile=PROFILE, roster=roster, digest=digest, batch_id="batch-1", chunks=2
    )
    first = chunk_module.onboard_chunk(**params, chunk=0, first=0, stop=3, return_state=True)
    assert first.result()["by_status"] == {"delivered": 3}
    ledger = Ledger(env["db"])
    # The same chunk's tenants, failed since (say, by hand): a real re-run would try them again.
    ledger.record_failure(
        tenant_id="c0000",
        connector_id=CONNECTOR,
        profile="zendesk-demo",
        tenant_name="Tenant 0",
        admin_email="admin@c0.example.com",
        error_code="x",
        error_message="x",
        run_id=None,
    )
    again = chunk_module.onboard_chunk(**params, chunk=0, first=0, stop=3, return_state=True)
    assert again.result()["by_status"] == {"delivered": 3}, "the chunk's recorded summary"
    assert env["emulator"].stats()["requests"] == 3, "a retried chunk calls nothing again"
    assert ledger.get("c0000", CONNECTOR).status is Status.FAILED  # type: ignore[union-attr]
    ledger.close()


@pytest.mark.usefixtures("prefect_harness")
def test_a_chunk_that_dies_before_reporting_fails_its_tenants_and_the_next_run_does_them(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 12)
    real_slice = chunk_module.open_roster_slice

    def second_chunk_dies(location: str, digest: str, first: int, stop: int, only: Any) -> Any:
        if first == 5:
            raise RuntimeError("worker lost")
        return real_slice(location, digest, first, stop, only)

    monkeypatch.setattr(chunk_module, "open_roster_slice", second_chunk_dies)
    state = onboard_tenants(roster=roster, profile=PROFILE, chunk_size=5, return_state=True)
    assert state.is_failed()
    summary = state.result(raise_on_failure=False)
    assert summary["by_status"] == {"delivered": 7, "failed": 5}
    assert summary["errors"] == {"chunk_lost": 5}
    (lost,) = [o for o in summary["outcomes"] if o["status"] == "failed"]
    assert lost["tenant_id"] == "chunk 2 (tenants 6-10)"
    assert "ended Failed before reporting" in lost["error_message"]
    assert "5 of 12 tenant(s) failed" in (state.message or "")

    monkeypatch.setattr(chunk_module, "open_roster_slice", real_slice)
    again = onboard_tenants(roster=roster, profile=PROFILE, chunk_size=5, return_state=True)
    assert again.result()["by_status"] == {"skipped": 7, "delivered": 5}
    assert env["emulator"].stats()["requests"] == 12
