"""The operator's first hour, as real commands in their own processes: a wrong key with 25
tenants at --concurrency 16 calls Versori at most ONBOARD_STOP_AFTER times and names the key's
setting once; an unreachable Versori is named with its URL, port and setting; `onboard remind`
on an empty ledger answers at once without Prefect; reading commands create no ledger; a
remind run is named after its connector's display name, and `onboard export` names it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from demo.processes import PROJECT, base_env, free_port
from onboarding.clock import utcnow
from onboarding.inputs.profile import load_profile
from onboarding.ledger import Ledger
from tests.e2e.test_cli import ONBOARD, emulator_process

pytestmark = pytest.mark.e2e

PROFILE = str(PROJECT / "examples" / "profile.yaml")
ROSTER = str(PROJECT / "examples" / "tenants.csv")


def onboard(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ONBOARD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_a_wrong_key_calls_versori_at_most_the_stop_count_and_says_what_to_fix_once(
    tmp_path: Path, prefect_api: str
) -> None:
    with emulator_process(tmp_path, key="not-the-key", prefect_api=prefect_api) as env:
        args = ["run", "--roster", ROSTER, "--profile", PROFILE, "--concurrency", "16"]
        done = onboard(args, env, tmp_path)
        stats = httpx.get(f"{env['VERSORI_BASE_URL']}/_emulator/stats").json()
        exported = onboard(["export", "--format", "csv"], env, tmp_path, timeout=60)
    said = done.stdout + done.stderr
    print(f"stdout {len(done.stdout.splitlines())} lines, stderr {len(done.stderr.splitlines())}")
    print(done.stdout)
    assert done.returncode == 1, said
    assert stats["requests"] == 3, f"ONBOARD_STOP_AFTER is 3: {stats}"
    assert said.count("VERSORI_API_KEY") == 1, said
    assert "Versori refused the API key (401): check VERSORI_API_KEY" in done.stdout
    assert "25 tenants failed because Versori refused the API key (401)" in done.stdout
    assert "retries the failed tenants" not in done.stdout
    assert len(done.stdout.splitlines()) <= 4, "grouped: no line per tenant"
    assert "not-the-key" not in said

    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 25
    assert {r["connector_name"] for r in rows} == {"zendesk-demo"}
    assert sum(r["error_code"] == "not_attempted" for r in rows) == 22


def test_the_stop_count_follows_onboard_stop_after(tmp_path: Path, prefect_api: str) -> None:
    with emulator_process(tmp_path, key="not-the-key", prefect_api=prefect_api) as env:
        env["ONBOARD_STOP_AFTER"] = "1"
        args = ["run", "--roster", ROSTER, "--profile", PROFILE, "--concurrency", "16"]
        done = onboard(args, env, tmp_path)
        stats = httpx.get(f"{env['VERSORI_BASE_URL']}/_emulator/stats").json()
    assert done.returncode == 1, done.stdout + done.stderr
    assert stats["requests"] == 1, stats


def test_an_unreachable_versori_is_named_with_its_url_port_and_setting(
    tmp_path: Path, prefect_api: str
) -> None:
    port = free_port()  # nothing listens there
    env = base_env(tmp_path) | {
        "PREFECT_API_URL": prefect_api,
        "VERSORI_BASE_URL": f"http://127.0.0.1:{port}",
        "VERSORI_API_KEY": "k",
        "ONBOARD_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    done = onboard(
        ["run", "--roster", ROSTER, "--profile", PROFILE, "--only", "t001"], env, tmp_path
    )
    assert done.returncode == 1, done.stdout + done.stderr
    expected = f"could not reach Versori at http://127.0.0.1:{port} (VERSORI_BASE_URL)"
    assert expected in done.stdout, done.stdout
    assert "The next `onboard run` retries the failed tenants." in done.stdout


def test_remind_on_an_empty_ledger_says_so_at_once_without_prefect(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    env = base_env(tmp_path) | {
        "ONBOARD_DB_URL": url,
        "VERSORI_API_KEY": "k",
        "ONBOARD_SMTP_HOST": "127.0.0.1",
        "ONBOARD_SMTP_SECURITY": "none",
        "ONBOARD_EMAIL_FROM": "onboarding@example.com",
    }
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "deployments.cli",
            "remind",
            "--profile",
            PROFILE,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - started
    print(f"remind on an empty ledger: {seconds:.2f} s")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert f"the ledger {url} holds no records yet" in done.stdout
    imported = {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert not {m for m in imported if m.partition(".")[0] == "prefect"}, "no Prefect, no server"
    assert seconds < 5, f"{seconds:.1f} s"


@pytest.mark.parametrize(
    "args",
    [["status"], ["export", "--format", "csv"], ["remind", "--profile", PROFILE]],
)
def test_a_reading_command_in_a_folder_without_a_ledger_creates_none(
    tmp_path: Path, args: list[str]
) -> None:
    """ONBOARD_DB_URL unset: the default, onboarding.db in the current folder."""
    env = base_env(tmp_path) | {"VERSORI_API_KEY": "k"}
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    done = onboard(args, env, folder, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    expected = f"No ledger at {folder / 'onboarding.db'}: run `onboard run` first"
    assert expected in done.stderr
    assert list(folder.iterdir()) == []


def test_a_remind_run_is_named_after_its_connectors_display_name(
    tmp_path: Path, prefect_api: str
) -> None:
    name = f"acme-crm-{uuid.uuid4().hex[:8]}"
    profile = tmp_path / "acme.yaml"
    profile.write_text(
        Path(PROFILE)
        .read_text()
        .replace("name: zendesk-demo", f"name: {name}\ndisplay_name: Acme CRM")
    )
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    connector = load_profile(profile).target_id
    ledger = Ledger(url)
    now = utcnow() - timedelta(hours=1)
    ledger.record_link(
        tenant_id="t001",
        connector_id=connector,
        profile=name,
        tenant_name="Acme",
        admin_email="it@acme.example.com",
        url="https://acme.zendesk.com/oauth/authorizations/new?state=s1",
        state="s1",
        created_at=now,
        expires_at=now + timedelta(hours=72),
    )
    ledger.mark_delivered("t001", connector, channel="email", state="s1")
    ledger.close()
    env = base_env(tmp_path) | {"PREFECT_API_URL": prefect_api, "ONBOARD_DB_URL": url}
    args = ["remind", "--profile", str(profile), "--after-hours", "0", "--dry-run"]
    done = onboard(args, env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    wanted = f"remind {name} (Acme CRM)"
    found = httpx.post(
        f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [wanted]}}}
    ).json()
    assert [r["name"] for r in found] == [wanted], done.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_the_runs_artifacts_name_connectors_by_display_name_and_say_why_it_stopped() -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.reporting.summary import OutcomeCounts, publish, summarise
    from onboarding.batch.outcomes import TenantOutcome

    def tenant(n: int, slack: str, code: str = "") -> TenantOutcome:
        parts = (
            TenantOutcome(f"t{n}", "delivered", connector="zendesk-demo"),
            TenantOutcome(f"t{n}", slack, error_code=code, connector="slack-demo"),
        )
        return TenantOutcome(f"t{n}", "failed" if code else "delivered", parts=parts)

    tally = OutcomeCounts.of([tenant(1, "delivered"), tenant(2, "failed", "not_found")])
    tally.stopped["slack-demo"] = {
        "reason": "Versori does not know system X (404 not found): check system_id",
        "cause": "Versori does not know system X (404 not found)",
        "detail": "3 tenants in a row (t2, t3, t4) failed with HTTP 404",
        "error_code": "not_found",
    }
    names = {"zendesk-demo": "Zendesk Demo", "slack-demo": "Slack Demo"}
    summary = summarise(tally, 1.0, connector_names=names)
    key = f"onboarding-test-{uuid.uuid4().hex[:12]}"

    @flow(name="test-first-hour-publish", persist_result=False)
    def publishing() -> None:
        publish(key, "Onboarding a + b", "Roster `r.csv`", summary)

    publishing()
    with get_client(sync_client=True) as client:
        keys = [key, key.replace("-", "-summary-", 1)]
        found = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
            )
        }
    table, markdown = found[keys[0]], str(found[keys[1]].data)
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert isinstance(data, list)
    assert {r["connector"] for r in data} == {"Zendesk Demo", "Slack Demo"}
    assert "| Slack Demo | 1 | 1 |" in markdown and "| slack-demo |" not in markdown
    assert (
        "**The batch stopped** (Slack Demo): Versori does not know system X (404 not found): "
        "check system_id." in markdown
    )
