"""Large rosters: in one flow run as slices, or fanned out as chunk runs of a deployment (one
table for the batch, chunks that are not run twice, a chunk that dies without reporting, a
deadline). Under Prefect's test harness, against the emulator on a real socket; chunk runs
start in this process instead of on a worker (on a work pool's workers:
tests/e2e/test_scale_out.py)."""

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

import flows.batching.fan_out as fan_out_module
import flows.onboard_chunk as chunk_module
import onboarding.batch.run_request as run_inputs_module
from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from flows.batching.fan_out import split
from flows.onboard_tenants import onboard_tenants
from onboarding.inputs.roster import load_roster, open_roster_slice
from onboarding.ledger import Ledger, Status
from tests.flows.helpers import summary_of

PROFILE = str(Path(__file__).resolve().parents[2] / "examples" / "profile.yaml")
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"


# --- pure parts (a batch's tally: tests/flows/test_summary.py) ------------------------------


def test_split_covers_every_position_once() -> None:
    chunks = split(2501, 1000)
    assert [(c.first, c.stop) for c in chunks] == [(0, 1000), (1000, 2000), (2000, 2501)]
    assert chunks[2].label == "chunk 3 (tenants 2001-2501)"
    assert split(1000, 1000) == split(1000, 5000)[:1]
    assert split(0, 10) == []


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


@pytest.fixture
def chunks_in_this_process(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stands in for run_deployment only: each chunk runs here, as a flow run of its own,
    and the parent then waits for it through the API as it would for a worker's run."""
    started: list[dict[str, Any]] = []

    def start(chunks: list[Any], parameters: Any, deployment: str, batch_id: str) -> Any:
        runs = {}
        for chunk in chunks:
            started.append(parameters(chunk))
            state = chunk_module.onboard_chunk(**parameters(chunk), return_state=True)
            runs[state.state_details.flow_run_id] = chunk
        return runs

    monkeypatch.setattr(fan_out_module, "_start_chunk_runs", start)
    monkeypatch.setattr(fan_out_module, "POLL_SECONDS", 0.05)
    return started


@pytest.mark.usefixtures("prefect_harness")
def test_fan_out_folds_every_chunk_run_into_one_batch(
    env: dict[str, Any], chunks_in_this_process: list[dict[str, Any]]
) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 25)
    before = {r.id for r in chunk_runs()}
    state = onboard_tenants(
        roster=roster,
        profile=PROFILE,
        chunk_size=10,
        fan_out="deployment",
        concurrency=4,
        tenants_per_task=4,
        tenant_events="failures",
        return_state=True,
    )
    summary = summary_of(state)
    assert state.is_completed(), state.message
    assert summary["total"] == 25 and summary["by_status"] == {"delivered": 25}
    assert env["emulator"].stats()["requests"] == 25, "each tenant initialised once"
    assert [(p["first"], p["stop"]) for p in chunks_in_this_process] == [
        (0, 10),
        (10, 20),
        (20, 25),
    ]
    assert {(p["tenants_per_task"], p["tenant_events"]) for p in chunks_in_this_process} == {
        (4, "failures")
    }, "the batch's options reach every chunk"

    children = [r for r in chunk_runs() if r.id not in before]
    assert sorted(r.name for r in children) == [
        "chunk 1/3: tenants 1-10",
        "chunk 2/3: tenants 11-20",
        "chunk 3/3: tenants 21-25",
    ]
    assert all(r.state and r.state.is_completed() for r in children)
    assert all("profile:zendesk-demo" in r.tags for r in children)

    rows = table_of(state.state_details.flow_run_id)
    assert len(rows) == 25 and {r["status"] for r in rows} == {"delivered"}
    ledger = Ledger(env["db"])
    records = list(ledger.iter_records(CONNECTOR))
    assert len(records) == 25
    assert all(r.status is Status.DELIVERED and r.attempts == 1 for r in records)
    assert ledger.chunk_summary(str(state.state_details.flow_run_id), 0) is None, "cleaned up"
    ledger.close()

    again = onboard_tenants(
        roster=roster, profile=PROFILE, chunk_size=10, fan_out="deployment", return_state=True
    )
    assert summary_of(again)["by_status"] == {"skipped": 25}
    assert env["emulator"].stats()["requests"] == 25


@pytest.mark.usefixtures("prefect_harness")
def test_in_process_a_large_roster_is_one_flow_run_of_slices(env: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    roster = write_roster(env["tmp"] / "r.csv", 250)
    before = {r.id for r in chunk_runs()}
    state = onboard_tenants(roster=roster, profile=PROFILE, chunk_size=10, return_state=True)
    assert state.is_completed(), state.message
    assert summary_of(state)["by_status"] == {"delivered": 250}
    assert [r for r in chunk_runs() if r.id not in before] == [], "no child flow runs"
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert sorted(t.name for t in task_runs) == [
        "onboard tenants 1-100",
        "onboard tenants 101-200",
        "onboard tenants 201-250",
    ]


@pytest.mark.usefixtures("prefect_harness")
def test_a_finished_chunk_run_again_does_nothing_twice(env: dict[str, Any]) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 6)
    digest = load_roster(roster).digest
    params: dict[str, Any] = dict(
        profile=PROFILE, roster=roster, digest=digest, batch_id="batch-1", chunks=2
    )
    first = chunk_module.onboard_chunk(**params, chunk=0, first=0, stop=3, return_state=True)
    assert summary_of(first)["by_status"] == {"delivered": 3}
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
    assert summary_of(again)["by_status"] == {"delivered": 3}, "the chunk's recorded summary"
    assert env["emulator"].stats()["requests"] == 3, "a retried chunk calls nothing again"
    assert ledger.get("c0000", CONNECTOR).status is Status.FAILED  # type: ignore[union-attr]
    ledger.close()


@pytest.mark.usefixtures("prefect_harness")
def test_a_chunk_that_dies_before_reporting_fails_its_tenants_and_the_next_run_does_them(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, chunks_in_this_process: Any
) -> None:
    roster = write_roster(env["tmp"] / "r.csv", 12)
    real_slice = open_roster_slice

    def second_chunk_dies(
        location: str, digest: str, first: int, stop: int, only: Any, **kwargs: Any
    ) -> Any:
        if first == 5:
            raise RuntimeError("worker lost")
        return real_slice(location, digest, first, stop, only, **kwargs)

    monkeypatch.setattr(run_inputs_module, "open_roster_slice", second_chunk_dies)
    fan_out = {"chunk_size": 5, "fan_out": "deployment"}
    state = onboard_tenants(roster=roster, profile=PROFILE, **fan_out, return_state=True)
    assert state.is_failed()
    summary = summary_of(state, raise_on_failure=False)
    assert summary["by_status"] == {"delivered": 7, "failed": 5}
    assert summary["errors"] == {"chunk_lost": 5}
    (lost,) = [o for o in summary["outcomes"] if o["status"] == "failed"]
    assert lost["tenant_id"] == "chunk 2 (tenants 6-10)"
    assert "ended Failed before reporting" in lost["error_message"]
    assert "5 of 12 tenant(s) failed" in (state.message or "")

    monkeypatch.setattr(run_inputs_module, "open_roster_slice", real_slice)
    again = onboard_tenants(roster=roster, profile=PROFILE, **fan_out, return_state=True)
    assert summary_of(again)["by_status"] == {"skipped": 7, "delivered": 5}
    assert env["emulator"].stats()["requests"] == 12


@pytest.mark.usefixtures("prefect_harness")
def test_chunk_runs_past_the_deadline_are_cancelled_and_count_as_lost(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.states import Scheduled

    created: list[Any] = []

    def start_runs_nobody_picks_up(chunks: list[Any], parameters: Any, *_: Any) -> Any:
        with get_client(sync_client=True) as client:
            for chunk in chunks:
                run = client.create_flow_run(
                    chunk_module.onboard_chunk, parameters=parameters(chunk), state=Scheduled()
                )
                created.append(run.id)
        return dict(zip(created, chunks, strict=True))

    monkeypatch.setattr(fan_out_module, "_start_chunk_runs", start_runs_nobody_picks_up)
    monkeypatch.setattr(fan_out_module, "POLL_SECONDS", 0.05)
    roster = write_roster(env["tmp"] / "r.csv", 4)
    state = onboard_tenants(
        roster=roster,
        profile=PROFILE,
        chunk_size=2,
        fan_out="deployment",
        chunk_deadline_minutes=0.02,
        return_state=True,
    )
    assert state.is_failed()
    summary = summary_of(state, raise_on_failure=False)
    assert summary["errors"] == {"chunk_lost": 4}
    assert all("past the batch's deadline" in o["error_message"] for o in summary["outcomes"])
    assert env["emulator"].stats()["requests"] == 0
    with get_client(sync_client=True) as client:
        states = {client.read_flow_run(run_id).state.type.value for run_id in created}  # type: ignore[union-attr]
    assert states <= {"CANCELLING", "CANCELLED"}, states
