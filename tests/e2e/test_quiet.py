"""A successful command on Prefect's temporary server ends quietly, and that server has recorded
every task run of it by then.

Before flows/running/in_process.py waited for it (`let_temporary_server_catch_up`), each of
these commands ended, after "Stopping temporary server", with ~150 lines of
`Error flushing 1 events`
tracebacks from the server's task-run recorder, cancelled mid-write while still behind the run,
and that server's database (PREFECT_HOME/prefect.db) kept a third of the task runs `Running` and
others not at all. Each command checked starts a temporary server of its own, on a database that
is already migrated (as on any run but a machine's first).

A run and a campaign are checked on tests/e2e/test_cli.py's first run as in the README
(test_run_against_emulator_in_another_process, with assert_quiet and task_runs_by_state from
here): a test of their own here repeated that run and its temporary server's start."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from demo.processes import PROJECT
from tests.e2e.test_cli import ONBOARD, emulator_process

pytestmark = pytest.mark.e2e

PROFILE = str(PROJECT / "examples" / "profile.yaml")
ROSTER = str(PROJECT / "examples" / "tenants.csv")


def on_temporary_server(env: dict[str, str], migrated_prefect_db: Path) -> Path:
    """The command's Prefect home, holding a migrated database; its path."""
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    return home / "prefect.db"


def onboard(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ONBOARD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_quiet(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Stopping temporary server" in result.stderr  # the end of the run was seen
    assert "Traceback" not in result.stderr, result.stderr
    assert "ERROR" not in result.stderr, result.stderr


def task_runs_by_state(prefect_db: Path) -> dict[str, int]:
    """The temporary server's own record of the task runs (it ends with the command)."""
    with sqlite3.connect(prefect_db) as db:
        rows = db.execute("SELECT state_type, count(*) FROM task_run GROUP BY state_type")
        return {str(state): int(n) for state, n in rows}


def test_remind_ends_quietly(tmp_path: Path, prefect_api: str, migrated_prefect_db: Path) -> None:
    from tests.smtp_server import SmtpTestServer

    with SmtpTestServer() as smtp, emulator_process(tmp_path) as env:
        env.update(
            ONBOARD_SMTP_HOST=smtp.host,
            ONBOARD_SMTP_PORT=str(smtp.port),
            ONBOARD_SMTP_SECURITY="none",
            ONBOARD_EMAIL_FROM="onboarding@saas.example.com",
        )
        # The links go out on the session's server (no temporary one to start): 25 emails.
        emailed = onboard(
            {**env, "PREFECT_API_URL": prefect_api},
            tmp_path,
            *("run", "--roster", ROSTER, "--profile", PROFILE, "--deliver", "email"),
        )
        assert emailed.returncode == 0, emailed.stdout + emailed.stderr
        prefect_db = on_temporary_server(env, migrated_prefect_db)
        reminded = onboard(env, tmp_path, "remind", "--profile", PROFILE, "--after-hours", "0")
        assert_quiet(reminded)
        assert "25 reminded" in reminded.stdout
        assert len(smtp.messages) == 50
        runs = task_runs_by_state(prefect_db)
        assert runs and set(runs) == {"COMPLETED"}, runs
