"""The `onboard` CLI: bad input exits 2 at once (in-process), and a real run end to end
(`onboard emulator` and `onboard run` as separate processes, as a user would in two shells)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from demo.processes import PROJECT, base_env, child, free_port, wait_for_http
from deployments.cli import app
from onboarding.ledger import Ledger

PROFILE = str(PROJECT / "examples" / "profile.yaml")
SLACK = str(PROJECT / "examples" / "profile-slack.yaml")
ROSTER = str(PROJECT / "examples" / "tenants.csv")
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
runner = CliRunner()


ONBOARD = str(Path(sys.executable).parent / "onboard")


@contextmanager
def emulator_process(
    tmp_path: Path, *flags: str, key: str = "emulator-key", prefect_api: str | None = None
) -> Iterator[dict[str, str]]:
    """`onboard emulator` in its own process, and the environment an `onboard` command needs
    to use it with a fresh SQLite ledger (and a private Prefect home), on the Prefect server at
    `prefect_api` (without it, each command starts Prefect's temporary server)."""
    port = free_port()
    env = base_env(tmp_path)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    args = [ONBOARD, "emulator", "--port", str(port), *flags]
    with child(args, dict(env), tmp_path / "emulator.log") as emulator:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz", proc=emulator)
        env.update(
            VERSORI_BASE_URL=base,
            VERSORI_API_KEY=key,
            ONBOARD_DB_URL=f"sqlite:///{tmp_path / 'ledger.db'}",
        )
        yield env


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("VERSORI_API_KEY", "k")
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    return tmp_path


def test_bad_roster_rows_are_all_named_and_exit_2(cli_env: Path) -> None:
    roster = cli_env / "r.csv"
    roster.write_text(
        "tenant_id,name,admin_email,subdomain\nt1,A,a@x.com,a\nt1,B,nope,b\nt3,,c@x.com,\n"
    )
    result = runner.invoke(app, ["run", "--roster", str(roster), "--profile", PROFILE])
    assert result.exit_code == 2
    text = result.stderr
    assert "r.csv:3: tenant_id: duplicate 't1' (first at line 2)" in text
    assert "r.csv:3: admin_email:" in text
    assert "r.csv:4: name: is required" in text
    assert "r.csv:4: subdomain:" in text
    assert "nothing was sent to Versori" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--roster", "missing.csv", "--profile", PROFILE], "missing.csv: roster file not found"),
        (["--roster", ROSTER, "--profile", "missing.yaml"], "missing.yaml: file not found"),
        (["--roster", ROSTER, "--profile", PROFILE, "--only", "nobody"], "'nobody' is not in it"),
    ],
)
def test_missing_inputs_exit_2(cli_env: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2
    assert expected in result.stderr


def test_profile_errors_name_file_line_and_field(cli_env: Path) -> None:
    profile = cli_env / "p.yaml"
    text = Path(PROFILE).read_text()
    text = text.replace("connector_id: 01M8F12B95S4BX0QFB3TPDWZ0Q", "connector_id: not-a-ulid")
    text = text.replace('login_hint: "{admin_email}"', 'state: "mine"')
    profile.write_text(text)
    result = runner.invoke(app, ["run", "--roster", ROSTER, "--profile", str(profile)])
    assert result.exit_code == 2
    line = text.splitlines().index("connector_id: not-a-ulid") + 1
    assert f"p.yaml:{line}: connector_id: the value is not a ULID" in result.stderr
    assert "additional_params: sets state, which Versori sets itself" in result.stderr


def test_no_api_key_exits_2(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERSORI_API_KEY")
    result = runner.invoke(app, ["run", "--roster", ROSTER, "--profile", PROFILE])
    assert result.exit_code == 2
    assert "VERSORI_API_KEY is not set" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("VERSORI_BASE_URL", "http://versori.example.com/api", "is plain http to versori.example"),
        ("VERSORI_BASE_URL", "ftp://versori.example.com", "is not an http(s) URL"),
        ("VERSORI_API_KEY", "key with spaces", "contains whitespace"),
    ],
)
def test_a_bad_versori_setting_exits_2_before_prefect_starts(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """Refused by the run's input check, not inside the flow after the temporary server
    started (which was a traceback and exit 1); the value itself is never shown."""
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["run", "--roster", ROSTER, "--profile", PROFILE])
    assert result.exit_code == 2, result.output
    assert variable in result.stderr and expected in result.stderr
    assert value not in result.stderr
    assert "Beginning flow run" not in result.output + result.stderr


def test_a_campaign_fanned_out_to_a_deployment_exits_2(cli_env: Path) -> None:
    slack = str(PROJECT / "examples" / "profile-slack.yaml")
    args = ["run", "--roster", ROSTER, "--profile", PROFILE, "--profile", slack]
    result = runner.invoke(app, [*args, "--fan-out", "deployment"])
    assert result.exit_code == 2, result.output
    assert "fan_out deployment: a campaign" in result.stderr


def test_bad_ledger_url_exits_2(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_DB_URL", "postgresql+psycopg://me:hunter2@127.0.0.1:1/x")
    result = runner.invoke(app, ["run", "--roster", ROSTER, "--profile", PROFILE])
    assert result.exit_code == 2
    assert "ONBOARD_DB_URL" in result.stderr and "hunter2" not in result.stderr


@pytest.mark.e2e
def test_run_against_emulator_in_another_process(
    tmp_path: Path, prefect_api: str, migrated_prefect_db: Path
) -> None:
    """The first run as in the README, on Prefect's temporary server; the rest on a server, but
    for a campaign at the end, on the temporary server again.

    Both commands on the temporary server end quietly with every task run recorded
    (tests/e2e/test_quiet.py says why): they are that file's "a run and a campaign", which
    repeated this very first run (a temporary server's start, 15 s) in a test of its own."""
    from tests.e2e.test_quiet import assert_quiet, task_runs_by_state

    assert Path(ONBOARD).exists(), "the onboard console script is installed with the project"
    onboard = ONBOARD
    with emulator_process(tmp_path, "--api-key", "e2e-key", key="e2e-key") as env:
        # The temporary server's database as on any run but a machine's first: migrated (the
        # session's server migrated one from nothing), which saves 10 s of migrations here.
        home = Path(env["PREFECT_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        prefect_db = home / "prefect.db"
        shutil.copyfile(migrated_prefect_db, prefect_db)
        base = env["VERSORI_BASE_URL"]
        first = subprocess.run(
            [onboard, "run", "--roster", ROSTER, "--profile", PROFILE, "--concurrency", "4"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.returncode == 0, first.stdout + first.stderr
        assert "25 delivered" in first.stdout
        assert httpx.get(f"{base}/_emulator/stats").json()["by_status"] == {"200": 25}
        assert_quiet(first)
        # One task run per tenant, each recorded in its final state: none lost at shutdown.
        assert task_runs_by_state(prefect_db) == {"COMPLETED": 25}

        again = subprocess.run(
            [onboard, "run", "--roster", ROSTER, "--profile", PROFILE],
            env={**env, "PREFECT_API_URL": prefect_api},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "25 skipped" in again.stdout
        assert httpx.get(f"{base}/_emulator/stats").json()["requests"] == 25

        exported = subprocess.run(
            [onboard, "export", "--format", "csv"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        rows = list(csv.DictReader(io.StringIO(exported.stdout)))
        assert len(rows) == 25 and {r["status"] for r in rows} == {"delivered"}
        assert list(rows[0]) == [
            "tenant_id",
            "connector_id",
            "connector_name",
            "status",
            "url",
            "state",
            "created_at",
            "expires_at",
            "attempts",
            "error_code",
            "error_message",
            "connection_id",
            "connected_at",
            "delivered_at",
            "opened_at",
            "last_sent_at",
            "reminders",
            "activation_id",
            "activated_at",
            "checked_at",
        ]
        assert all(r["delivered_at"] and not r["connection_id"] for r in rows)
        assert all(r["state"] and f"state={r['state']}" in r["url"] for r in rows)
        assert "e2e-key" not in first.stdout + first.stderr
        for r in rows:  # the console shows host and masked state, never the link itself
            assert r["state"] not in first.stdout + first.stderr

        jsonl = subprocess.run(
            [onboard, "export", "--format", "jsonl", "--output", str(tmp_path / "o.jsonl")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert jsonl.returncode == 0
        lines = (tmp_path / "o.jsonl").read_text().splitlines()
        assert len(lines) == 25 and json.loads(lines[0])["tenant_id"] == "t001"

        status = subprocess.run(
            [onboard, "status"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and "delivered" in status.stdout and "25" in status.stdout

        # A campaign (a second connector) on the temporary server again, in the same Prefect
        # home: it ends quietly too, its task runs recorded beside the first run's.
        campaign = subprocess.run(
            [onboard, "run", "--roster", ROSTER, "--profile", PROFILE, "--profile", SLACK],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert_quiet(campaign)
        assert "slack-demo (Slack Demo): 25 delivered" in campaign.stdout
        assert task_runs_by_state(prefect_db) == {"COMPLETED": 50}


@pytest.mark.e2e
def test_run_exits_1_when_tenants_fail_and_the_ledger_says_why(
    tmp_path: Path, prefect_api: str
) -> None:
    onboard = ONBOARD
    with emulator_process(tmp_path, "--error-rate", "1.0", prefect_api=prefect_api) as env:
        base = env["VERSORI_BASE_URL"]
        result = subprocess.run(
            [
                onboard,
                "run",
                "--roster",
                ROSTER,
                "--profile",
                PROFILE,
                "--only",
                "t001",
                "--only",
                "t002",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert "2 failed" in result.stdout
        assert "The next `onboard run` retries the failed tenants." in result.stdout
        # 1 attempt + 3 retries each, all 503: transient, retried, then recorded.
        assert httpx.get(f"{base}/_emulator/stats").json()["by_status"] == {"503": 8}


@pytest.mark.e2e
def test_email_batch_rerun_remind_and_connect_from_the_command_line(
    tmp_path: Path, prefect_api: str
) -> None:
    from tests.smtp_server import SmtpTestServer

    onboard = ONBOARD
    roster = tmp_path / "tenants.csv"
    roster.write_text(
        "tenant_id,name,admin_email,subdomain\n"
        "a1,Acme,admin@acme.example.com,acme\n"
        "g2,Globex,it@globex.example.com,globex\n"
    )
    with (
        SmtpTestServer(tls="starttls", auth=True) as smtp,
        emulator_process(tmp_path, prefect_api=prefect_api) as env,
    ):
        mail = smtp.sender_kwargs()
        env.update(
            ONBOARD_SMTP_HOST=mail["host"],
            ONBOARD_SMTP_PORT=str(mail["port"]),
            ONBOARD_SMTP_SECURITY="starttls",
            ONBOARD_SMTP_CA_FILE=str(mail["ca_file"]),
            ONBOARD_SMTP_USERNAME=mail["username"],
            ONBOARD_SMTP_PASSWORD=mail["password"],
            ONBOARD_EMAIL_FROM="onboarding@saas.example.com",
        )

        def onboard_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [onboard, *args],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )

        run_args = ["run", "--roster", str(roster), "--profile", PROFILE, "--deliver", "email"]
        first = onboard_cli(*run_args)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "2 delivered" in first.stdout
        assert sorted(str(r.message()["To"]) for r in smtp.messages) == [
            "admin@acme.example.com",
            "it@globex.example.com",
        ]
        assert mail["password"] not in first.stdout + first.stderr

        again = onboard_cli(*run_args)
        assert again.returncode == 0 and "2 skipped" in again.stdout
        assert len(smtp.messages) == 2, "a re-run never mails a delivered tenant again"

        reminded = onboard_cli("remind", "--profile", PROFILE, "--after-hours", "0")
        assert reminded.returncode == 0, reminded.stdout + reminded.stderr
        assert len(smtp.messages) == 4
        assert str(smtp.messages[-1].message()["Subject"]).startswith("Reminder")

        exported = onboard_cli("export", "--format", "jsonl")
        state = next(
            json.loads(line)["state"]
            for line in exported.stdout.splitlines()
            if json.loads(line)["tenant_id"] == "a1"
        )
        connected = onboard_cli("mark-connected", "--state", state, "--connection-id", "c-9")
        assert connected.returncode == 0, connected.stdout + connected.stderr
        assert "Tenant a1 is connected" in connected.stdout
        assert "Event onboarding.tenant.connected sent to" in connected.stdout
        query = {
            "filter": {
                "event": {"name": ["onboarding.tenant.connected"]},
                "resource": {"id": ["onboarding.tenant.a1"]},
            },
            "limit": 5,
        }
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server stores events shortly after POST
            found = httpx.post(f"{prefect_api}/events/filter", json=query).json()["events"]
            if found:
                break
            time.sleep(0.1)
        assert [e["resource"]["onboarding.connector-id"] for e in found] == [CONNECTOR]
        unknown = onboard_cli("mark-connected", "--state", "not-a-state")
        assert unknown.returncode == 1 and "no tenant owns state" in unknown.stderr

        status = onboard_cli("status")
        assert "connected" in status.stdout and "reminded" in status.stdout


def test_email_delivery_without_smtp_settings_exits_2(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ONBOARD_SMTP_HOST", "ONBOARD_EMAIL_FROM", "ONBOARD_SMTP_BLOCK"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(
        app, ["run", "--roster", ROSTER, "--profile", PROFILE, "--deliver", "email"]
    )
    assert result.exit_code == 2
    assert "ONBOARD_SMTP_HOST and ONBOARD_EMAIL_FROM" in result.stderr


def test_blocks_create_saves_what_the_environment_holds(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret
    from prefect_email import EmailServerCredentials

    monkeypatch.setenv("VERSORI_API_KEY", "key-from-env")
    monkeypatch.setenv("ONBOARD_SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("ONBOARD_SMTP_USERNAME", "mailer")
    monkeypatch.setenv("ONBOARD_SMTP_PASSWORD", "pw-from-env")
    monkeypatch.setenv("ONBOARD_SMTP_SECURITY", "ssl")
    assert runner.invoke(app, ["blocks", "register"]).exit_code == 0
    result = runner.invoke(app, ["blocks", "create", "--api-key-block", "k", "--smtp-block", "s"])
    assert result.exit_code == 0, result.output
    assert "key-from-env" not in result.output and "pw-from-env" not in result.output
    assert "VERSORI_API_KEY_BLOCK=k ONBOARD_SMTP_BLOCK=s" in result.output
    secret = Secret.load("k")
    assert isinstance(secret, Secret)  # load's sync form: no event loop runs here
    assert secret.get() == "key-from-env"
    smtp = EmailServerCredentials.load("s")
    assert (smtp.smtp_server, smtp.username, smtp.smtp_type.name) == (
        "smtp.example.com",
        "mailer",
        "SSL",
    )
    assert smtp.password.get_secret_value() == "pw-from-env"

    monkeypatch.delenv("VERSORI_API_KEY")
    missing = runner.invoke(app, ["blocks", "create", "--skip-smtp"])
    assert missing.exit_code == 2 and "VERSORI_API_KEY is not set" in missing.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "not_imported"),
    [
        (
            ["--help"],
            {"prefect", "sqlalchemy", "httpx", "pydantic_settings", "aiosmtpd", "uvicorn"},
        ),
        (["status"], {"prefect", "httpx"}),
        (["export", "--format", "csv"], {"prefect", "httpx"}),
        (["mark-connected", "--state", "not-a-state"], {"prefect"}),
    ],
)
def test_commands_import_only_what_they_use(
    tmp_path: Path, args: list[str], not_imported: set[str]
) -> None:
    """Each of these starts in well under a second because it leaves out the packages that
    take seconds to import (Prefect above all): checked on the real command's imports."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()  # a ledger to read: without one, these commands stop at once (exit 2)
    env = {**base_env(tmp_path), "ONBOARD_DB_URL": url}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "deployments.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr[-2000:]
    imported = {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "typer" in imported, "-X importtime lists what was imported"
    assert {m for m in imported if m.partition(".")[0] in not_imported} == set()
    # Of the Prefect layer, only the plain enums its options are typed with.
    assert {m for m in imported if m.startswith("flows.")} <= {
        "flows.inputs",
        "flows.inputs.options",
    }


@pytest.mark.e2e
def test_smtp_sink_writes_what_it_is_sent_to_an_eml_file(tmp_path: Path) -> None:
    """`onboard smtp-sink` in its own process, as in the README's second shell; a message sent
    with smtplib to the address it prints lands in its folder."""
    import smtplib
    from email.message import EmailMessage

    port, folder, log = free_port(), tmp_path / "sink", tmp_path / "sink.log"
    args = [ONBOARD, "smtp-sink", "--port", str(port), "--output", str(folder)]
    with child(args, base_env(tmp_path), log) as sink:
        deadline = time.monotonic() + 30
        while "export ONBOARD_SMTP_HOST" not in log.read_text() and time.monotonic() < deadline:
            assert sink.poll() is None, log.read_text()
            time.sleep(0.1)
        banner = log.read_text()
        assert (
            f"export ONBOARD_SMTP_HOST=127.0.0.1 ONBOARD_SMTP_PORT={port} "
            "ONBOARD_SMTP_SECURITY=none ONBOARD_EMAIL_FROM=onboarding@example.com\n"
        ) in banner
        message = EmailMessage()
        message["From"], message["To"] = "onboarding@example.com", "admin@acme.example.com"
        message["Subject"], message["Message-ID"] = "Connect Acme", "<m-1@example.com>"
        message.set_content("https://acme.example.com/authorize?state=s-1")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.send_message(message)
        [eml] = folder.glob("*.eml")
        assert eml.name == "0001-m-1@example.com.eml"
        assert "state=s-1" in eml.read_text() and eml.stat().st_mode & 0o777 == 0o600
