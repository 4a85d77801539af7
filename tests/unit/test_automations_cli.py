"""`onboard automations install` without a server: what it installs (examples/automations.yaml
is the same), and the option errors found before the Prefect API is asked (exit 2).
tests/e2e/test_automations.py installs them on a real server and sees them act."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import typer
import yaml
from typer.testing import CliRunner

from deployments.automations_cli import (
    BROKEN_NAME,
    CONNECTED_NAME,
    FAILURES_NAME,
    FollowUp,
    _comparable,
    _fully_set,
    automations_app,
    broken_automation,
    connected_automation,
    failures_automation,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "automations.yaml"
ZERO = UUID(int=0)


def invoke(*args: str) -> Any:
    app = typer.Typer()
    app.add_typer(automations_app, name="automations")
    return CliRunner().invoke(app, ["automations", "install", *args])


@pytest.fixture
def api_url(request: pytest.FixtureRequest) -> Iterator[None]:
    """PREFECT_API_URL as the test's parameter says (None: unset)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = getattr(request, "param", None)
    if url is None:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield
    else:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield


def test_the_example_file_is_what_install_creates() -> None:
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load(EXAMPLE.read_text())
    example = [AutomationCore.model_validate(a) for a in spec["automations"]]
    installed = [
        failures_automation(ZERO, 5),
        broken_automation(ZERO),
        connected_automation(FollowUp(ZERO, "provision-tenant/default")),
    ]
    assert [a.name for a in example] == [FAILURES_NAME, BROKEN_NAME, CONNECTED_NAME]
    for ours, theirs in zip(installed, example, strict=True):
        assert _comparable(ours) == _comparable(theirs), ours.name
        assert theirs.enabled


def test_every_name_is_recognisably_ours() -> None:
    assert all(n.startswith("onboarding: ") for n in (FAILURES_NAME, BROKEN_NAME, CONNECTED_NAME))


def test_an_update_sends_every_field_the_api_needs() -> None:
    """The client's update_automation sends only the fields set: the actions' `type` too."""
    sent = _fully_set(broken_automation(ZERO)).model_dump(mode="json", exclude_unset=True)
    assert sent["actions"][0]["type"] == "send-notification"
    assert sent["trigger"]["type"] == "event"
    assert "owner_resource" not in sent  # the API's update refuses it


def test_the_failures_alert_counts_every_tenant_in_10_minutes() -> None:
    trigger = failures_automation(ZERO, 7).trigger
    assert trigger.model_dump(
        mode="json", include={"expect", "for_each", "threshold", "within"}
    ) == {
        "expect": ["onboarding.tenant.failed"],
        "for_each": [],
        "threshold": 7,
        "within": 600.0,
    }


def test_nothing_to_install_exits_2() -> None:
    result = invoke()
    assert result.exit_code == 2
    assert "--notify-block" in result.output and "--on-connected" in result.output


@pytest.mark.parametrize("given", ["provision-tenant", "a/b/c", "/default", "flow/"])
def test_a_deployment_not_flow_slash_name_exits_2_before_the_api(given: str) -> None:
    result = invoke("--on-connected", given)  # no server: the name is checked first
    assert result.exit_code == 2
    assert f"--on-connected: {given!r} is not FLOW/DEPLOYMENT" in result.output


def test_failures_below_1_exits_2() -> None:
    result = invoke("--notify-block", "ops", "--failures", "0")
    assert result.exit_code == 2
    assert "--failures" in result.output


@pytest.mark.parametrize("api_url", [None], indirect=True)
def test_without_prefect_api_url_exits_2(api_url: None) -> None:
    result = invoke("--notify-block", "ops")
    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output


@pytest.mark.parametrize("api_url", ["http://127.0.0.1:9/api"], indirect=True)
def test_an_unreachable_api_exits_2(api_url: None) -> None:
    result = invoke("--notify-block", "ops", "--dry-run")
    assert result.exit_code == 2
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in result.output
