"""The inputs `onboard run` and `onboard remind` check are given to the flow run they start in
their own process (flows.inputs.parameters.given_inputs around run_here): Prefect runs a sync
flow called in-process in the caller's thread and context, so the flow takes them instead of
checking (reading each profile, downloading a roster URL) again. A run started any other way
checks its own."""

from __future__ import annotations

import threading
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from typer.testing import CliRunner

import flows.inputs.parameters as parameters
import flows.onboard_tenants as flow_module
from deployments.cli import app
from flows.running.in_process import run_here
from onboarding.batch.run_request import RunInputs, RunRequest, check_run
from onboarding.clock import utcnow
from onboarding.inputs.profile import load_profile
from onboarding.ledger import Ledger
from onboarding.settings import Settings, load_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROFILE = str(EXAMPLES / "profile.yaml")
ROSTER = str(EXAMPLES / "tenants.csv")


@pytest.fixture
def flow_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[RunRequest]:
    """Each request a flow run checked itself (the CLI's own check is not counted)."""
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    checked: list[RunRequest] = []

    def counted(request: RunRequest, settings: Settings) -> RunInputs:
        checked.append(request)
        return check_run(request, settings)

    monkeypatch.setattr(parameters, "check_run", counted)
    return checked


def test_inputs_given_around_run_here_reach_the_flow_body_in_this_thread(
    flow_checks: list[RunRequest],
) -> None:
    request = RunRequest(profiles=(PROFILE,), roster=ROSTER, dry_run=True)
    inputs = check_run(request, load_settings())
    seen: dict[str, Any] = {}

    @flow(name="test-given-inputs", persist_result=False)
    def probe() -> None:
        seen["inputs"] = parameters.run_inputs(request, load_settings())
        seen["thread"] = threading.current_thread()

    with parameters.given_inputs(inputs):
        state = run_here(probe)
    assert state.is_completed(), state.message
    assert seen["inputs"] is inputs and seen["thread"] is threading.current_thread()
    assert flow_checks == []


def test_onboard_run_checks_once_and_a_flow_called_in_python_checks_its_own(
    flow_checks: list[RunRequest],
) -> None:
    result = CliRunner().invoke(app, ["run", "--roster", ROSTER, "--profile", PROFILE, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert flow_checks == [], "the run took the inputs the command checked"
    state = flow_module.onboard_tenants(
        roster=ROSTER, profile=PROFILE, dry_run=True, return_state=True
    )
    assert state.is_completed(), state.message
    assert len(flow_checks) == 1, "started any other way: the flow checks its inputs"


def test_onboard_remind_gives_its_checked_inputs_to_its_run(
    tmp_path: Path, flow_checks: list[RunRequest]
) -> None:
    profile = load_profile(PROFILE)
    past = utcnow() - timedelta(days=3)
    with closing(Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")) as ledger:
        ledger.record_link(
            tenant_id="t1", connector_id=profile.target_id, profile=profile.name,
            tenant_name="T1", admin_email="a@example.com", url="https://x.example.com/a?state=s1",
            state="s1", created_at=past, expires_at=past + timedelta(days=30),
        )  # fmt: skip
        ledger.mark_delivered("t1", profile.target_id, channel="email")
    args = ["remind", "--dry-run", "--after-hours", "0", "--profile", PROFILE]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "t1" in result.output, "the run listed who is due"
    assert flow_checks == [], "the run took the inputs the command checked"
