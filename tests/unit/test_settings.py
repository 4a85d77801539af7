"""Settings from the environment: a bad value names its variable (never the value) and stops a
run before Prefect starts; the retry backoff a deployment's environment may set."""

from __future__ import annotations

from pathlib import Path

import pytest

from onboarding import constants
from onboarding.batch.run_request import check_environment
from onboarding.errors import InputError
from onboarding.settings import (
    RetrySettings,
    Settings,
    SmtpSettings,
    VersoriSettings,
    load_settings,
)
from tasks.slice_tasks import onboard_slice_task, with_retry_backoff


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No .env of the checkout, none of the caller's settings.
    monkeypatch.chdir(tmp_path)
    for name in (
        "VERSORI_READ_TIMEOUT",
        "ONBOARD_RETRY_BACKOFF_SECONDS",
        "ONBOARD_ROSTER_MAX_BYTES",
        "ONBOARD_SMTP_PASSWORD",
        "ONBOARD_SMTP_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)


def test_a_bad_value_names_its_variable_and_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VERSORI_READ_TIMEOUT", "s3cret-ish")
    with pytest.raises(InputError) as caught:
        VersoriSettings()
    text = str(caught.value)
    assert "environment: VERSORI_READ_TIMEOUT: Input should be a valid number" in text
    assert "s3cret-ish" not in text
    assert "Set them in the environment or in .env." in text


def test_every_bad_variable_of_a_run_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERSORI_READ_TIMEOUT", "0")
    monkeypatch.setenv("ONBOARD_RETRY_BACKOFF_SECONDS", "-1")
    monkeypatch.setenv("ONBOARD_ROSTER_MAX_BYTES", "lots")
    with pytest.raises(InputError) as caught:
        check_environment(load_settings())
    assert [p.field for p in caught.value.problems] == [
        "VERSORI_READ_TIMEOUT",
        "ONBOARD_ROSTER_MAX_BYTES",
        "ONBOARD_RETRY_BACKOFF_SECONDS",
    ]


def test_smtp_settings_name_their_variables_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONBOARD_SMTP_TIMEOUT", "-5")
    with pytest.raises(InputError) as caught:
        SmtpSettings()
    assert str(caught.value.problems[0]) == (
        "SMTP settings: ONBOARD_SMTP_TIMEOUT: must be more than 0 seconds"
    )


def test_retry_backoff_is_the_tasks_own_unless_the_environment_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert with_retry_backoff(onboard_slice_task, RetrySettings()) is onboard_slice_task
    assert onboard_slice_task.retry_delay_seconds == [1.0, 2.0, 4.0]

    monkeypatch.setenv("ONBOARD_RETRY_BACKOFF_SECONDS", "0.25")
    faster = with_retry_backoff(onboard_slice_task, load_settings().retry)
    assert faster.retry_delay_seconds == [0.25, 0.5, 1.0]
    assert faster.retries == constants.TASK_RETRIES
    assert faster.retry_condition_fn is onboard_slice_task.retry_condition_fn
    assert faster.retry_jitter_factor == constants.TASK_RETRY_JITTER_FACTOR
    assert RetrySettings().retry_backoff_seconds == 0.25

    monkeypatch.setenv("ONBOARD_RETRY_BACKOFF_SECONDS", "none")
    with pytest.raises(InputError, match="ONBOARD_RETRY_BACKOFF_SECONDS"):
        _ = load_settings().retry


def test_the_root_reads_each_section_when_first_asked_and_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VERSORI_READ_TIMEOUT", "7")
    settings = load_settings()
    versori = settings.versori
    monkeypatch.setenv("VERSORI_READ_TIMEOUT", "9")
    assert settings.versori is versori and versori.read_timeout == 7, "read once, kept"
    assert load_settings().versori.read_timeout == 9, "another root reads anew"
    given = VersoriSettings(read_timeout=3)
    assert Settings(versori=given).versori is given


def test_a_section_never_asked_for_never_stops_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that sends no email reads no SMTP settings: a bad one stops only a run that does."""
    monkeypatch.setenv("ONBOARD_SMTP_TIMEOUT", "-5")
    settings = load_settings()
    check_environment(settings)
    assert settings.retry.retry_backoff_seconds == constants.TASK_RETRY_BACKOFF_SECONDS
    for _ in range(2):  # a section that does not pass its check: said each time it is asked for
        with pytest.raises(InputError, match="ONBOARD_SMTP_TIMEOUT"):
            _ = settings.smtp
