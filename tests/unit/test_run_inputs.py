"""A run's inputs, checked once (onboarding.inputs.run_request): what each bad input says, that
the CLI's checked inputs are given to the run it starts (and a run given another request's is a
bug, said), and that a profile is read once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows.inputs.parameters import HandOffError, given_inputs, run_inputs
from onboarding.batch.delivery import Delivery
from onboarding.batch.run_request import RunInputs, RunRequest, check_environment
from onboarding.batch.run_request import check_run as check_run_with
from onboarding.errors import InputError
from onboarding.inputs.profile import load_profile
from onboarding.settings import load_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROFILE = str(EXAMPLES / "profile.yaml")
SLACK = str(EXAMPLES / "profile-slack.yaml")
ROSTER = str(EXAMPLES / "tenants.csv")


@pytest.fixture(autouse=True)
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("VERSORI_", "ONBOARD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VERSORI_API_KEY", "k")
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'l.db'}")
    monkeypatch.chdir(tmp_path)  # no .env of the project's


def check_run(request: RunRequest) -> RunInputs:
    """The check as an entry point makes it: with the settings it read once."""
    return check_run_with(request, load_settings())


def test_good_inputs_come_back_loaded() -> None:
    inputs = check_run(RunRequest(profiles=(PROFILE, SLACK), roster=ROSTER))
    assert [p.name for p in inputs.profiles] == ["zendesk-demo", "slack-demo"]
    assert inputs.roster is not None and len(inputs.roster) == 25
    assert inputs.templates is None, "no mail, no templates"
    assert inputs.source == ROSTER


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (RunRequest(profiles=()), "give at least one connector profile"),
        (
            RunRequest(profiles=(PROFILE, PROFILE), roster=ROSTER),
            "a campaign needs each connector once",
        ),
        (
            RunRequest(profiles=(PROFILE, SLACK), roster=ROSTER, chunked=True),
            "fan_out deployment: a campaign",
        ),
        (RunRequest(profiles=(PROFILE,)), "give either `roster`"),
        (
            RunRequest(profiles=(PROFILE,), roster=ROSTER, deliver=Delivery.EMAIL),
            "ONBOARD_SMTP_HOST and ONBOARD_EMAIL_FROM",
        ),
        (RunRequest(profiles=(PROFILE,), roster=ROSTER, only=("nobody",)), "'nobody' is not in it"),
        (
            RunRequest(
                profiles=(PROFILE,),
                roster="https://x.example/r.csv?token=s3cret",
                keeps_parameters=True,
            ),
            "the URL carries a credential (query key 'token')",
        ),
    ],
)
def test_each_bad_input_is_refused_with_what_to_do(request_: RunRequest, expected: str) -> None:
    with pytest.raises(InputError) as refused:
        check_run(request_)
    assert expected in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_a_credential_url_not_kept_by_a_server_is_not_refused_for_that() -> None:
    request = RunRequest(profiles=(PROFILE,), roster="https://x.example/r.csv?token=s3cret")
    with pytest.raises(InputError) as refused:  # refused, but by the download rules
        check_run(request)
    assert "credential" not in str(refused.value) and "s3cret" not in str(refused.value)


def test_no_api_key_is_refused_unless_nothing_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERSORI_API_KEY")
    with pytest.raises(InputError, match="VERSORI_API_KEY is not set"):
        check_run(RunRequest(profiles=(PROFILE,), roster=ROSTER))
    assert check_run(RunRequest(profiles=(PROFILE,), roster=ROSTER, dry_run=True)).profiles


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "http://versori.example.com/api",
            "VERSORI_BASE_URL: is plain http to versori.example.com",
        ),
        ("https://versori.example.com/api?key=1", "VERSORI_BASE_URL: is not an http(s) URL"),
    ],
)
def test_versori_base_url_is_checked_with_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("VERSORI_BASE_URL", value)
    with pytest.raises(InputError) as refused:
        check_environment(load_settings())
    assert expected in str(refused.value) and value not in str(refused.value)
    monkeypatch.setenv("VERSORI_BASE_URL", "http://127.0.0.1:8700")
    check_environment(load_settings())  # loopback http is the emulator's


def test_given_inputs_reach_the_run_with_their_request_once() -> None:
    request = RunRequest(profiles=(PROFILE,), roster=ROSTER)
    inputs = check_run(request)
    settings = load_settings()
    with given_inputs(inputs):
        assert run_inputs(RunRequest(profiles=(PROFILE,), roster=ROSTER), settings) is inputs
        again = run_inputs(request, settings)
        assert again is not inputs and again.request == request, "once: then checked anew"
    assert run_inputs(request, settings) is not inputs, "outside the block: checked anew"


def test_inputs_given_for_another_request_are_a_bug_said_without_secrets() -> None:
    inputs = check_run(RunRequest(profiles=(PROFILE,), roster=ROSTER))
    other = RunRequest(profiles=(PROFILE,), roster=ROSTER + "?token=s3cret", dry_run=True)
    with given_inputs(inputs), pytest.raises(HandOffError) as caught:
        run_inputs(other, load_settings())
    assert "differ in roster, dry_run" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_profile_is_read_once_while_its_file_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    shutil.copy(PROFILE, path)
    first = load_profile(path)
    assert load_profile(path) is first
    path.write_text(path.read_text().replace("name: zendesk-demo", "name: zendesk-renamed"))
    assert load_profile(path).name == "zendesk-renamed"
