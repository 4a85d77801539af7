"""The operator's first hour, without processes: a wrong key stops a batch at the first evidence
(the batch stop's gate), failures are said grouped and once, an unreachable Versori is named
with its URL and setting, reading commands never create a ledger, remind says when nothing is
due, serve applies no schedule out of the box, and connectors go by the names people read.
tests/e2e/test_first_hour.py runs the same as real commands."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from deployments import cli, cli_output
from deployments.cli import app
from onboarding.batch.campaign import onboard_tenant
from onboarding.batch.retry_policy import BatchStop
from onboarding.batch.run_summary import RunSummary
from onboarding.batch.tenant_slices import SliceFailed, TenantSlice, run_slice
from onboarding.clock import utcnow
from onboarding.errors import (
    APIConnectionError,
    AuthenticationError,
    BatchStoppedError,
    NotFoundError,
    ServerError,
)
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger
from onboarding.versori.client import VersoriClient
from tests.support import campaign_of

pytestmark = pytest.mark.timeout(120)

PROJECT = Path(__file__).resolve().parents[2]
PROFILE = PROJECT / "examples" / "profile.yaml"
runner = CliRunner()


def unauthenticated() -> AuthenticationError:
    return AuthenticationError(401, "unauthenticated", "the Bearer API key is not valid")


# --- 1. a wrong key: at most the stop's count of calls, whatever the concurrency ---------------


def calls_through(stop: BatchStop, answer: Any, tenants: int, threads: int) -> dict[str, Any]:
    """`tenants` calls through the stop's gate on `threads` threads, each answering as
    `answer(n)` says (an exception to raise, or None); how many were made, how many at once
    at most, and how many the gate refused."""
    lock = threading.Lock()
    seen = {"made": 0, "in_flight": 0, "most": 0, "refused": 0}

    def one(n: int) -> None:
        tid = f"t{n:03d}"
        try:
            with stop.call(tid):
                with lock:
                    seen["made"] += 1
                    seen["in_flight"] += 1
                    seen["most"] = max(seen["most"], seen["in_flight"])
                time.sleep(0.02)
                with lock:
                    seen["in_flight"] -= 1
                error = answer(n)
                if error is not None:
                    raise error
        except BatchStoppedError:
            with lock:
                seen["refused"] += 1
        except Exception as exc:
            stop.failed(tid, exc)
        else:
            stop.succeeded()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(tenants)))
    return seen


def test_a_refused_key_is_called_with_at_most_the_stop_count_whatever_the_concurrency() -> None:
    stop = BatchStop(after=3)
    seen = calls_through(stop, lambda n: unauthenticated(), tenants=25, threads=16)
    assert seen["made"] == 3, seen
    assert seen["most"] == 1, "while the key has not answered otherwise, calls go one at a time"
    assert seen["refused"] == 22
    assert stop.reason == "Versori refused the API key (401): check VERSORI_API_KEY"
    assert stop.cause == "Versori refused the API key (401)"
    assert stop.detail.startswith("3 tenants in a row (")


def test_the_stop_count_is_onboard_stop_after() -> None:
    stop = BatchStop(after=5)
    seen = calls_through(stop, lambda n: unauthenticated(), tenants=25, threads=16)
    assert seen["made"] == 5 and seen["refused"] == 20


def test_a_good_key_opens_the_gate_after_the_first_answer() -> None:
    stop = BatchStop(after=3)
    seen = calls_through(stop, lambda n: None, tenants=64, threads=16)
    assert seen["made"] == 64 and seen["refused"] == 0
    assert seen["most"] > 4, f"calls went concurrently once the key answered: {seen}"
    assert stop.reason == ""


def test_a_transient_answer_opens_the_gate_and_a_tenants_404_closes_it_only_for_a_while() -> None:
    """A 503 says nothing about the key: holding calls back on it would only slow a batch. One
    tenant's 404 closes the gate until the next answer that is not one: no stop."""
    stop = BatchStop(after=3)
    answers = {0: ServerError(503, "unavailable", "down"), 5: NotFoundError(404, "nf", "gone")}
    seen = calls_through(stop, answers.get, tenants=40, threads=8)
    assert seen["made"] == 40 and stop.reason == ""


def test_an_interrupt_wakes_the_calls_waiting_at_the_gate() -> None:
    stop = BatchStop(after=3)
    entered = threading.Event()
    released = threading.Event()

    def alone() -> None:
        with stop.call("t1"):
            entered.set()
            released.wait(5)

    first = threading.Thread(target=alone)
    first.start()
    entered.wait(5)
    started = time.monotonic()
    threading.Timer(0.2, stop.interrupt).start()
    # It waits behind t1's call, then is told the run stopped.
    with pytest.raises(BatchStoppedError), stop.call("t2"):
        pass
    assert time.monotonic() - started < 2
    released.set()
    first.join()


def test_a_key_from_a_block_is_named_with_its_setting() -> None:
    from flows.batching.resources import api_key_setting
    from onboarding.settings import VersoriSettings

    settings = VersoriSettings.model_construct(api_key=None, api_key_block="versori-api-key")
    stop = BatchStop(after=1, key_setting=api_key_setting(settings))
    stop.failed("t1", unauthenticated())
    assert stop.reason == (
        "Versori refused the API key (401): check the key in the Secret block "
        "'versori-api-key' (VERSORI_API_KEY_BLOCK; VERSORI_API_KEY, when set, wins over it)"
    )


def test_a_batch_with_a_refused_key_calls_versori_three_times_at_sixteen_at_once(
    tmp_path: Path,
) -> None:
    """A 25-tenant slice on 16 threads, through the real client against a Versori that
    answers every call 401: three calls, then every other tenant not attempted."""
    requests: list[str] = []
    lock = threading.Lock()

    def versori(request: httpx.Request) -> httpx.Response:
        with lock:
            requests.append(str(request.url))
        time.sleep(0.01)
        return httpx.Response(401, json={"code": "unauthenticated", "message": "bad key"})

    client = VersoriClient(
        api_key="wrong",
        base_url="https://versori.test/api/connect/v1",
        transport=httpx.MockTransport(versori),
        max_connections=16,
    )
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    campaign = campaign_of(load_profile(PROFILE), ledger, client)
    tenants = [
        Tenant(
            tenant_id=f"t{i:03d}",
            name=f"T{i}",
            admin_email=f"a{i}@x.example",
            fields={"subdomain": f"t{i:03d}"},
        )
        for i in range(1, 26)
    ]
    with ThreadPoolExecutor(16) as pool, pytest.raises(SliceFailed) as failed:
        run_slice(campaign, TenantSlice(tenants), onboard_tenant, pool, last_attempt=False)
    codes = [o.error_code for o in failed.value.outcomes]
    assert len(requests) == 3, requests
    assert codes.count("unauthenticated") == 3 and codes.count("not_attempted") == 22
    assert campaign.stop_reason == "Versori refused the API key (401): check VERSORI_API_KEY"
    untried = next(o.tenant_id for o in failed.value.outcomes if o.error_code == "not_attempted")
    record = ledger.get(untried, campaign.connectors[0].connector_id)
    assert record is not None and record.attempts == 0
    assert record.error_message == (
        "not attempted: the batch stopped early because Versori refused the API key (401)"
    ), "what to fix is said once, at the end, not in each tenant's row"
    ledger.close()


# --- the run's closing lines: grouped, and saying what to fix ----------------------------------


def failed_row(tid: str, code: str, message: str, connector: str = "") -> dict[str, str]:
    return {
        "tenant_id": tid,
        "connector": connector,
        "status": "failed",
        "link_host": "",
        "masked_state": "",
        "error_code": code,
        "error_message": message,
    }


def stopped_summary() -> dict[str, Any]:
    refused = "HTTP 401 unauthenticated: the Bearer API key is not valid"
    rows = [failed_row(f"t{i:03d}", "unauthenticated", refused) for i in (1, 2, 3)]
    rows += [
        failed_row(f"t{i:03d}", "not_attempted", "not attempted: the batch stopped early")
        for i in range(4, 26)
    ]
    return {
        "total": 25,
        "failed": 25,
        "seconds": 0.5,
        "by_status": {"failed": 25},
        "outcomes": rows,
        "connector_names": {"zendesk-demo": "Zendesk Demo"},
        "stopped": {
            "zendesk-demo": {
                "reason": "Versori refused the API key (401): check VERSORI_API_KEY",
                "cause": "Versori refused the API key (401)",
                "detail": "3 tenants in a row (t001, t002, t003) failed with HTTP 401",
                "error_code": "unauthenticated",
            }
        },
    }


def test_a_stopped_batch_is_one_line_and_its_closing_line_says_what_to_fix() -> None:
    summary = stopped_summary()
    assert cli_output.failure_lines(RunSummary.from_json(summary)) == [
        "25 tenants failed because Versori refused the API key (401): 3 answered HTTP 401 "
        "unauthenticated: the Bearer API key is not valid (t001, t002, t003), 22 not called "
        "after that"
    ]
    closing = cli_output.what_next(RunSummary.from_json(summary))
    assert "check VERSORI_API_KEY" in closing
    assert "retries the failed tenants" not in closing, "no promise a rerun fixes a key"


def test_a_campaign_says_which_connector_stopped_and_groups_the_others_errors() -> None:
    gone = "HTTP 404 not_found: no such system"
    rows = [failed_row(f"t{i:03d}", "not_found", gone, "slack-demo") for i in (1, 2, 3)]
    rows += [failed_row("t004", "not_attempted", "not attempted", "slack-demo")]
    rows += [failed_row("t005", "unavailable", "HTTP 503 unavailable: down", "zendesk-demo")]
    summary = {
        "failed": 5,
        "outcomes": rows,
        "connector_names": {"zendesk-demo": "Zendesk Demo", "slack-demo": "Slack Demo"},
        "stopped": {
            "slack-demo": {
                "reason": "Versori does not know system X (404 not found): check system_id",
                "cause": "Versori does not know system X (404 not found)",
                "detail": "",
                "error_code": "not_found",
            }
        },
    }
    assert cli_output.failure_lines(RunSummary.from_json(summary)) == [
        "slack-demo (Slack Demo): 4 tenants failed because Versori does not know system X "
        f"(404 not found): 3 answered {gone} (t001, t002, t003), 1 not called after that",
        "zendesk-demo (Zendesk Demo): 1 tenant failed: HTTP 503 unavailable: down (t005)",
    ]
    assert cli_output.what_next(RunSummary.from_json(summary)).startswith(
        "The batch stopped: slack-demo (Slack Demo): Versori does not know system X"
    )


def test_repeated_errors_are_grouped_largest_first_with_a_few_ids() -> None:
    down = "could not reach Versori at http://127.0.0.1:8700 (VERSORI_BASE_URL): refused"
    rows = [failed_row(f"t{i:03d}", "connection_error", down) for i in range(1, 9)]
    rows.append(failed_row("t020", "link_check_failed", "returned authorize URL failed checks"))
    summary = {"failed": 9, "outcomes": rows, "failed_not_transient": 1}
    assert cli_output.failure_lines(RunSummary.from_json(summary)) == [
        f"8 tenants failed: connection_error: {down} (t001, t002, t003, t004, t005, +3 more)",
        "1 tenant failed: link_check_failed: returned authorize URL failed checks (t020)",
    ]
    assert "1 of them failed for a reason a retry alone does not change" in cli_output.what_next(
        RunSummary.from_json(summary)
    )
    transient_only = {"failed": 8, "outcomes": rows[:8]}
    assert (
        cli_output.what_next(RunSummary.from_json(transient_only))
        == "The next `onboard run` retries the failed tenants."
    )


def test_a_run_with_nothing_to_do_says_so_after_its_colon(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = {"total": 0, "failed": 0, "seconds": 0.08, "by_status": {}, "outcomes": []}
    cli_output.print_outcomes(RunSummary.from_json(summary), everything=True)
    assert "0 tenant(s) in 0.08 s: nothing to do" in capsys.readouterr().out


def test_the_console_leaves_out_what_the_run_says_at_its_end() -> None:
    keep = cli_output.SaidAtTheEnd()

    def record(name: str, level: int, msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
        r.__dict__.update(extra)
        return r

    tenant = record(
        "prefect.task_runs",
        logging.WARNING,
        "%s %s failed%s: %s: %s",
        "onboard",
        "t1",
        "",
        "x",
        "y",
    )
    finished = record(
        "prefect.task_runs",
        logging.ERROR,
        "Finished in state Failed('Task run encountered an exception AuthenticationError: 401')",
    )
    crash = record(
        "prefect.task_runs",
        logging.ERROR,
        "Finished in state Failed('Task run encountered an exception KeyError: 1')",
    )
    stop = record("prefect.flow_runs", logging.ERROR, "Stopping", onboarding_stop=True)
    progress = record("prefect.flow_runs", logging.INFO, "3/25 tenants done")
    assert [keep.filter(r) for r in (tenant, finished, crash, stop, progress)] == [
        False,
        False,
        True,  # not one of ours: a bug stays in sight
        False,
        True,
    ]


def test_a_stopped_runs_state_names_the_cause_without_promising_a_retry() -> None:
    from flows.reporting.summary import final_state

    state = final_state(RunSummary.from_json(stopped_summary()), "onboarded or skipped")
    assert state.is_failed()
    assert state.message == (
        "25 of 25 tenant(s) failed: the batch stopped because Versori refused the API key (401)"
    )


# --- 2. Versori unreachable: its URL, port included, and the setting -------------------------


def refusing(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def test_an_unreachable_versori_is_named_with_its_url_and_setting() -> None:
    client = VersoriClient(
        api_key="k",
        base_url="http://user:hunter2@127.0.0.1:8700",
        transport=httpx.MockTransport(refusing),
    )
    with pytest.raises(APIConnectionError) as info:
        client._post("/o/x/connectors/y/oauth2/initialise", {})
    message = str(info.value)
    assert message.startswith(
        "could not reach Versori at http://127.0.0.1:8700 (VERSORI_BASE_URL): ConnectError"
    )
    assert "hunter2" not in message and "user" not in message, "never its credentials"


def test_the_default_base_url_says_which_setting_changes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VERSORI_BASE_URL", raising=False)
    client = VersoriClient(api_key="k", transport=httpx.MockTransport(refusing))
    with pytest.raises(APIConnectionError) as info:
        client._post("/x", {})
    assert (
        "at https://platform.versori.com/api/connect/v1 (the connect-v1 default; "
        "VERSORI_BASE_URL sets another)" in str(info.value)
    )


# --- 3, 4. remind with nothing due; reading commands create no ledger --------------------------


@pytest.fixture
def no_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "nothing-here.db"
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{path}")
    monkeypatch.setenv("VERSORI_API_KEY", "k")
    monkeypatch.setenv("ONBOARD_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ONBOARD_SMTP_SECURITY", "none")
    monkeypatch.setenv("ONBOARD_EMAIL_FROM", "onboarding@example.com")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["export", "--format", "csv"],
        ["remind", "--profile", str(PROFILE)],
        ["mark-connected", "--state", "s"],
    ],
)
def test_a_reading_command_without_a_ledger_says_where_it_looked_and_creates_none(
    no_ledger: Path, args: list[str]
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert (
        f"No ledger at {no_ledger}: run `onboard run` first (or set ONBOARD_DB_URL)"
        in result.stderr
    )
    assert not no_ledger.exists()
    assert list(no_ledger.parent.iterdir()) == []


def test_remind_on_an_empty_ledger_says_so_names_it_and_starts_no_run(
    no_ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Ledger(f"sqlite:///{no_ledger}").close()
    monkeypatch.setattr(cli, "_summary_of_run", _no_run)
    result = runner.invoke(app, ["remind", "--profile", str(PROFILE)])
    assert result.exit_code == 0, result.output
    assert f"the ledger sqlite:///{no_ledger} holds no records yet" in result.output


def test_remind_with_no_tenant_due_says_why_and_starts_no_run(
    no_ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(f"sqlite:///{no_ledger}")
    profile = load_profile(PROFILE)
    now = utcnow()
    ledger.record_link(
        tenant_id="t1",
        connector_id=profile.target_id,
        profile=profile.name,
        tenant_name="T1",
        admin_email="a@x.example",
        url="https://x.example/authorize?state=s1",
        state="s1",
        created_at=now,
        expires_at=now + timedelta(hours=72),
        delivered_by="store",
    )
    ledger.close()
    monkeypatch.setattr(cli, "_summary_of_run", _no_run)
    result = runner.invoke(app, ["remind", "--profile", str(PROFILE), "--after-hours", "0"])
    assert result.exit_code == 0, result.output
    assert f"Nothing to remind in the ledger sqlite:///{no_ledger}" in result.output
    assert "zendesk-demo (Zendesk Demo)" in result.output


def test_only_a_sqlite_file_is_looked_for() -> None:
    assert cli._missing_sqlite_file("postgresql+psycopg://me:hunter2@127.0.0.1/x") is None
    assert cli._missing_sqlite_file("sqlite:///:memory:") is None
    assert cli._missing_sqlite_file("sqlite:///no/such/ledger.db") == str(
        Path("no/such/ledger.db").absolute()
    )


def _no_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("no flow run (and no Prefect) for a remind with nothing to do")


# --- 5. serve: no schedule on out of the box -------------------------------------------------


def test_serve_applies_every_schedule_off_and_says_how_to_turn_one_on() -> None:
    from deployments.serve import deployments_from_yaml, read_config, schedule_lines

    deployments = deployments_from_yaml(read_config())
    schedules = {f"{d.flow_name}/{d.name}": d.schedules or [] for d in deployments}
    scheduled = {name: [s.active for s in found] for name, found in schedules.items() if found}
    assert scheduled == {
        "onboard-tenants/scheduled": [False],
        "remind-tenants/daily": [False],
        "sync-connections/sync": [False],
    }
    lines = schedule_lines(deployments)
    assert lines[0] == "Schedules (from prefect.yaml):"
    assert any(
        line.startswith("  remind-tenants/daily: 0 9 * * * Europe/London, off (profile ")
        for line in lines
    ), lines
    assert "set `active: true` under its schedule" in lines[-1]


# --- 6. names people read ---------------------------------------------------------------------


def test_run_names_say_the_connectors_display_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.remind_tenants as remind

    acme = tmp_path / "acme-crm.yaml"
    acme.write_text(
        PROFILE.read_text().replace("name: zendesk-demo", "name: acme-crm\ndisplay_name: Acme CRM")
    )
    monkeypatch.setattr(remind, "flow_run", SimpleNamespace(parameters={"profile": str(acme)}))
    assert remind.run_name() == "remind acme-crm (Acme CRM)"
    both = {"profile": [str(acme), str(PROFILE)]}
    monkeypatch.setattr(remind, "flow_run", SimpleNamespace(parameters=both))
    assert remind.run_name() == "remind acme-crm (Acme CRM) + zendesk-demo (Zendesk Demo)"
    broken = {"profile": str(tmp_path / "missing.yaml")}
    monkeypatch.setattr(remind, "flow_run", SimpleNamespace(parameters=broken))
    assert remind.run_name() == "remind missing", "a profile that does not load: its file"


def test_status_shows_each_connectors_name_beside_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    profile = load_profile(PROFILE)
    ledger = Ledger(url)
    ledger.record_failure(
        tenant_id="t1",
        connector_id=profile.target_id,
        profile=profile.name,
        tenant_name="T1",
        admin_email="a@x.example",
        error_code="x",
        error_message="y",
    )
    ledger.close()
    monkeypatch.setenv("ONBOARD_DB_URL", url)
    monkeypatch.setenv("COLUMNS", "200")
    plain = runner.invoke(app, ["status"])
    assert plain.exit_code == 0, plain.output
    assert "zendesk-demo" in plain.output and profile.target_id in plain.output
    named = runner.invoke(app, ["status", "--profile", str(PROFILE)])
    assert "zendesk-demo (Zendesk Demo)" in named.output and profile.target_id in named.output


def test_export_names_the_connector_beside_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.record_failure(
        tenant_id="t1",
        connector_id="01M8F12B95S4BX0QFB3TPDWZ0Q",
        profile="zendesk-demo",
        tenant_name="T1",
        admin_email="a@x.example",
        error_code="x",
        error_message="y",
    )
    ledger.close()
    monkeypatch.setenv("ONBOARD_DB_URL", url)
    result = runner.invoke(app, ["export", "--format", "csv"])
    header, row = result.stdout.splitlines()[:2]
    assert header.startswith("tenant_id,connector_id,connector_name,status,")
    assert row.startswith("t1,01M8F12B95S4BX0QFB3TPDWZ0Q,zendesk-demo,failed,")
