"""A profile whose links could never finish through the connect service is refused before
anything is sent: by the check itself (ConnectorProfile.check_finishable), by a run's inputs
(`onboard run`, `onboard remind`) and by `onboard connect-server` for the live links in its
ledger; each refusal names the file, the line and the key, and exits 2."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deployments.cli import app
from onboarding.batch.delivery import Delivery
from onboarding.batch.run_request import RunInputs, RunRequest
from onboarding.batch.run_request import check_run as check_run_with
from onboarding.clock import utcnow
from onboarding.errors import InputError
from onboarding.inputs.profile import ConnectorProfile, load_profile, same_endpoint
from onboarding.ledger import Ledger, Status
from onboarding.settings import load_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
V1_PROFILE = str(EXAMPLES / "profile.yaml")
ROSTER = str(EXAMPLES / "tenants.csv")
BASE = "https://connect.example.com"
CALLBACK = f"{BASE}/callback"
SYSTEM = "01M8F12B95S4BX0QFB3TPDWZ0S"
TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ0V"
runner = CliRunner()


def check_run(request: RunRequest) -> RunInputs:
    """The check as an entry point makes it: with the settings it read once."""
    return check_run_with(request, load_settings())


@pytest.fixture(autouse=True)
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("VERSORI_", "ONBOARD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VERSORI_API_KEY", "k")
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'l.db'}")
    monkeypatch.setenv("ONBOARD_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ONBOARD_EMAIL_FROM", "onboarding@saas.example.com")
    monkeypatch.chdir(tmp_path)  # no .env of the project's


def v2_profile(path: Path, *, template: bool = True, redirect_url: str | None = CALLBACK) -> Path:
    """A platform-v2 profile for the examples' roster; the lines below are what is named."""
    lines = [
        f"name: {path.stem}",
        "api: platform-v2",
        "organisation_id: 01M8F12B95S4BX0QFB3TPDWZ0P",
        f"system_id: {SYSTEM}",
        "credential_id: 01M8F12B95S4BX0QFB3TPDWZ0T",
        "client_id: demo-system-client-id",
        "authorize_url: https://{subdomain}.zendesk.com/oauth/authorizations/new",
        "scopes: [read]",
    ]
    if redirect_url is not None:
        lines.append(f"redirect_url: {redirect_url}")
    if template:
        lines.append(f"connection_template_id: {TEMPLATE}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line_of(path: Path, key: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(f"{key}:"))


# --- the check ---------------------------------------------------------------------------------


def test_v2_without_a_connection_template_is_refused_at_its_api_line(tmp_path: Path) -> None:
    path = v2_profile(tmp_path / "p.yaml", template=False)
    with pytest.raises(InputError) as refused:
        load_profile(path).check_finishable(BASE)
    text = str(refused.value)
    assert f"{path}:{line_of(path, 'api')}: connection_template_id: not set" in text
    assert "CreateConnection" in text and "redirect_url" not in text.split("\n")[0]
    assert [p.field for p in refused.value.problems] == ["connection_template_id"]


def test_v2_whose_redirect_url_is_not_the_services_callback_is_refused(tmp_path: Path) -> None:
    path = v2_profile(tmp_path / "p.yaml", redirect_url="https://app.example.com/oauth/callback")
    with pytest.raises(InputError) as refused:
        load_profile(path).check_finishable(BASE)
    text = str(refused.value)
    line = line_of(path, "redirect_url")
    assert f"{path}:{line}: redirect_url: is not the connect service's callback ({CALLBACK}" in text
    assert f"set redirect_url: {CALLBACK}" in text
    assert [p.field for p in refused.value.problems] == ["redirect_url"]


def test_both_problems_are_named_at_once(tmp_path: Path) -> None:
    path = v2_profile(
        tmp_path / "p.yaml", template=False, redirect_url="https://app.example.com/cb"
    )
    problems = load_profile(path).finish_problems(BASE)
    assert [(p.line, p.field) for p in problems] == [
        (line_of(path, "api"), "connection_template_id"),
        (line_of(path, "redirect_url"), "redirect_url"),
    ]


@pytest.mark.parametrize(
    ("base", "redirect_url"),
    [
        (BASE, f"{BASE}/callback/"),
        (BASE, f"{BASE}/cb"),
        (BASE, "https://connect.example.com:8443/callback"),
        (BASE, "https://other.example.com/callback"),
        (BASE, "https://connect.example.com/other/callback"),
        ("http://127.0.0.1:8800", "https://127.0.0.1:8800/callback"),
        ("http://127.0.0.1:8800", "http://127.0.0.1:8801/callback"),
    ],
)
def test_any_other_endpoint_is_not_the_callback(
    tmp_path: Path, base: str, redirect_url: str
) -> None:
    path = v2_profile(tmp_path / "p.yaml", redirect_url=redirect_url)
    with pytest.raises(InputError, match="redirect_url: is not the connect service's callback"):
        load_profile(path).check_finishable(base)


@pytest.mark.parametrize(
    ("base", "redirect_url"),
    [
        (BASE, CALLBACK),
        (BASE + "/", CALLBACK),  # as given, before ConnectSettings strips it
        (BASE, "https://Connect.Example.com:443/callback"),
        ("https://example.com/connect", "https://example.com/connect/callback"),
        ("http://127.0.0.1:8800", "http://127.0.0.1:8800/callback"),
        (BASE, None),  # unset: Versori's default, as today
    ],
)
def test_v2_with_a_template_and_the_callback_is_accepted(
    tmp_path: Path, base: str, redirect_url: str | None
) -> None:
    profile = load_profile(v2_profile(tmp_path / "p.yaml", redirect_url=redirect_url))
    assert profile.finish_problems(base) == []
    profile.check_finishable(base)


def test_a_v1_profile_through_the_service_is_accepted() -> None:
    """Connect API v1 links redirect to Versori's own redirect_uri; the service only mints."""
    profile = load_profile(V1_PROFILE)
    assert profile.api == "connect-v1" and profile.connection_template_id is None
    profile.check_finishable(BASE)


def test_without_a_connect_base_url_nothing_is_refused(tmp_path: Path) -> None:
    """Emails then carry the raw authorize URL: the service has no part in them."""
    path = v2_profile(tmp_path / "p.yaml", template=False, redirect_url="https://app.example.com/c")
    profile = load_profile(path)
    assert profile.finish_problems(None) == []
    profile.check_finishable(None)
    assert len(profile.finish_problems(BASE)) == 2, "the same profile, through the service"


def test_a_service_without_its_base_url_still_needs_the_template(tmp_path: Path) -> None:
    """connect-server serves links whatever its ONBOARD_CONNECT_BASE_URL: without one, only the
    template can be checked."""
    path = v2_profile(tmp_path / "p.yaml", template=False, redirect_url="https://app.example.com/c")
    problems = load_profile(path).finish_problems(None, through_service=True)
    assert [p.field for p in problems] == ["connection_template_id"]


def test_a_profile_built_in_code_is_named_by_its_name() -> None:
    profile = ConnectorProfile.model_validate(
        {
            "name": "built",
            "api": "platform-v2",
            "organisation_id": "01M8F12B95S4BX0QFB3TPDWZ0P",
            "system_id": SYSTEM,
            "credential_id": "01M8F12B95S4BX0QFB3TPDWZ0T",
            "client_id": "c",
            "authorize_url": "https://provider.example.com/authorize",
        }
    )
    with pytest.raises(InputError, match=r"^profile built: connection_template_id: not set"):
        profile.check_finishable(BASE)


def test_same_endpoint() -> None:
    assert same_endpoint("https://A.example.com/x?q=1", "https://a.example.com:443/x")
    assert not same_endpoint("https://a.example.com/x", "https://a.example.com/x/")
    assert not same_endpoint("https://a.example.com:99999/x", "https://a.example.com/x")


# --- a run's inputs ------------------------------------------------------------------------------


def test_an_email_run_through_the_service_is_refused_for_each_profile_of_a_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = str(v2_profile(tmp_path / "bad.yaml", template=False))
    campaign = RunRequest(profiles=(V1_PROFILE, bad), roster=ROSTER, deliver=Delivery.EMAIL)
    check_run(campaign)  # no ONBOARD_CONNECT_BASE_URL: raw authorize URLs, accepted
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    with pytest.raises(InputError) as refused:
        check_run(campaign)
    assert [(p.source, p.field) for p in refused.value.problems] == [
        (bad, "connection_template_id")
    ]
    dry = RunRequest(profiles=(bad,), roster=ROSTER, deliver=Delivery.BOTH, dry_run=True)
    with pytest.raises(InputError, match="connection_template_id"):
        check_run(dry)  # a dry run checks what the run would be refused for


def test_a_run_that_only_stores_its_links_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    bad = str(v2_profile(tmp_path / "bad.yaml", template=False))
    assert check_run(RunRequest(profiles=(bad,), roster=ROSTER)).profiles


def test_a_reminder_run_is_refused_dry_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    bad = str(v2_profile(tmp_path / "bad.yaml", redirect_url="https://app.example.com/cb"))
    good = str(v2_profile(tmp_path / "good.yaml"))
    for deliver, dry_run in ((Delivery.EMAIL, False), (Delivery.STORE, True)):
        request = RunRequest(profiles=(bad,), deliver=deliver, dry_run=dry_run, reminders=True)
        with pytest.raises(InputError, match="redirect_url: is not the connect service's"):
            check_run(request)
        check_run(RunRequest(profiles=(good,), deliver=deliver, dry_run=dry_run, reminders=True))


# --- the commands --------------------------------------------------------------------------------


@pytest.fixture
def flow_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every run the CLI would start (none is: this records it and answers "did not finish")."""
    started: list[dict[str, Any]] = []

    def record(flow: Any, **parameters: Any) -> None:
        started.append(parameters)

    monkeypatch.setattr("deployments.cli._summary_of_run", record)
    return started


@pytest.fixture
def smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from demo.smtp import LocalSmtpServer

    with LocalSmtpServer(tmp_path / "mail") as server:
        monkeypatch.setenv("ONBOARD_SMTP_PORT", str(server.port))
        monkeypatch.setenv("ONBOARD_SMTP_SECURITY", "none")
        yield server


def test_onboard_run_exits_2_naming_the_file_line_and_key_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flow_runs: list[Any], smtp: Any
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    bad = v2_profile(tmp_path / "bad.yaml", template=False)
    args = ["run", "--roster", ROSTER, "--deliver", "email", "--profile"]
    result = runner.invoke(app, [*args, str(bad)])
    assert result.exit_code == 2, result.output
    assert f"bad.yaml:{line_of(bad, 'api')}: connection_template_id: not set" in result.stderr
    assert "nothing was sent to Versori" in result.stderr
    assert flow_runs == [] and smtp.messages == 0
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    assert list(ledger.iter_records()) == []
    ledger.close()
    good = v2_profile(tmp_path / "good.yaml")
    result = runner.invoke(app, [*args, str(good)])
    assert result.exit_code == 1 and len(flow_runs) == 1, "the same run, a good profile: started"


def test_onboard_remind_exits_2_naming_the_file_line_and_key_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flow_runs: list[Any], smtp: Any
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    bad = v2_profile(tmp_path / "bad.yaml", redirect_url="https://app.example.com/cb")
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    past = utcnow() - timedelta(days=3)
    ledger.record_link(
        tenant_id="t1", connector_id=SYSTEM, profile="bad", tenant_name="T1",
        admin_email="a@example.com", url="https://x.example.com/a?state=s1", state="s1",
        created_at=past, expires_at=past + timedelta(days=30),
    )  # fmt: skip
    ledger.mark_delivered("t1", SYSTEM, channel="email")
    result = runner.invoke(app, ["remind", "--after-hours", "0", "--profile", str(bad)])
    assert result.exit_code == 2, result.output
    assert f"bad.yaml:{line_of(bad, 'redirect_url')}: redirect_url: is not the" in result.stderr
    assert flow_runs == [] and smtp.messages == 0
    record = ledger.get("t1", SYSTEM)
    assert record is not None and record.status is Status.DELIVERED and record.reminders == 0
    ledger.close()
    good = v2_profile(tmp_path / "good.yaml")
    result = runner.invoke(app, ["remind", "--after-hours", "0", "--profile", str(good)])
    assert result.exit_code == 1 and len(flow_runs) == 1, "the same run, a good profile: started"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Each time connect-server got as far as serving (it does not: this records it)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("connect_service.http_server.serve", lambda **kw: calls.append(kw))
    return calls


def test_connect_server_refuses_to_start_on_a_live_link_whose_profile_cannot_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Any]
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    good = v2_profile(tmp_path / "good.yaml")
    bad = v2_profile(tmp_path / "bad.yaml", template=False)
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    now = utcnow()
    for tenant in ("t1", "t2"):
        ledger.issue_connect_link(tenant, SYSTEM, str(good), now + timedelta(days=30))
    ledger.issue_connect_link("t3", SYSTEM, str(bad), now + timedelta(days=30))
    result = runner.invoke(app, ["connect-server"])
    assert result.exit_code == 2, result.output
    assert f"{bad}:{line_of(bad, 'api')}: connection_template_id: not set" in result.stderr
    assert f"{bad}: 1 live link(s)" in result.stderr and str(good) not in result.stderr
    assert served == []
    assert ledger.revoke_connect_links("t3") == 1
    ledger.issue_connect_link("t4", SYSTEM, str(bad), now - timedelta(seconds=1), now=now)
    result = runner.invoke(app, ["connect-server"])
    assert result.exit_code == 0, result.output  # revoked and expired links are not served
    assert len(served) == 1
    ledger.close()


def test_connect_server_checks_the_redirect_url_against_its_own_base_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Any]
) -> None:
    profile = v2_profile(tmp_path / "p.yaml")  # redirect_url: https://connect.example.com/…
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.issue_connect_link("t1", SYSTEM, str(profile), utcnow() + timedelta(days=1))
    ledger.close()
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", "https://elsewhere.example.com")
    result = runner.invoke(app, ["connect-server"])
    assert result.exit_code == 2 and served == []
    assert f"{profile}:{line_of(profile, 'redirect_url')}: redirect_url:" in result.stderr
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    assert runner.invoke(app, ["connect-server"]).exit_code == 0 and len(served) == 1


def test_connect_server_only_warns_of_a_profile_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Any]
) -> None:
    monkeypatch.setenv("ONBOARD_CONNECT_BASE_URL", BASE)
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    gone = tmp_path / "gone.yaml"
    ledger.issue_connect_link("t1", SYSTEM, str(gone), utcnow() + timedelta(days=1))
    ledger.close()
    result = runner.invoke(app, ["connect-server"])
    assert result.exit_code == 0, result.output
    assert f"name the profile {gone}, which cannot be read now" in result.stderr
    assert len(served) == 1
