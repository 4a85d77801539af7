"""Issue 10, defect 10: secrets at rest. The ledger file and the demo's .eml files are readable
by their owner only (export files: tests/unit/test_export.py); a database URL is shown with
every secret hidden."""

from __future__ import annotations

import os
import smtplib
import stat
from email.message import EmailMessage
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.cli import app
from onboarding.db_url import redact
from onboarding.ledger import Ledger
from tests.unit.test_ledger import link

pytestmark = pytest.mark.timeout(120)


def _others_bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o077


@pytest.fixture(autouse=True)
def _usual_umask() -> object:
    old = os.umask(0o022)  # files would otherwise be 0644
    yield
    os.umask(old)


def test_a_new_sqlite_ledger_is_private(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        link(ledger, "t1")
        files = list(tmp_path.glob("ledger.db*"))
        assert len(files) >= 2  # the database and its WAL
        assert {f.name: _others_bits(f) for f in files} == {f.name: 0 for f in files}
    finally:
        ledger.close()


def test_eml_files_are_private(tmp_path: Path) -> None:
    from demo.smtp import LocalSmtpServer

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@x.example", "b@y.example", "link"
    message["Message-ID"] = "<m1@x.example>"
    message.set_content("https://login.example.com/authorize?state=secret-state")
    with LocalSmtpServer(tmp_path) as server, smtplib.SMTP(server.host, server.port) as smtp:
        smtp.send_message(message)
    files = list(tmp_path.glob("*.eml"))
    assert len(files) == 1 and _others_bits(files[0]) == 0


@pytest.mark.parametrize(
    "key", ["password", "PASSWORD", "passwd", "pwd", "secret", "token", "key", "sslpassword"]
)
def test_the_database_url_hides_every_password_like_query_value(key: str) -> None:
    url = f"postgresql+psycopg://admin:s3cr3t-pw@db.example.com/ledger?{key}=hush-1&sslmode=require"
    shown = redact(url)
    assert "s3cr3t-pw" not in shown and "hush-1" not in shown
    assert "sslmode=require" in shown and "db.example.com" in shown


def test_status_does_not_print_a_query_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    monkeypatch.setenv("ONBOARD_DB_URL", url)

    class Spy(Ledger):
        def __init__(self, _url: str) -> None:
            super().__init__(url)
            self.db.url = "postgresql+psycopg://admin@db.example.com/l?password=hush-2"

    # Where `onboard status` imports it from when it runs.
    monkeypatch.setattr("onboarding.ledger.Ledger", Spy)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "hush-2" not in result.output
    assert "Ledger postgresql+psycopg://admin@db.example.com/l?password=%2A%2A%2A" in result.output


def test_an_unusable_url_message_holds_no_secret() -> None:
    from onboarding.errors import InputError

    with pytest.raises(InputError) as info:
        Ledger("postgresql+psycopg://admin@127.0.0.1:1/db?password=hush-3&connect_timeout=2")
    assert "hush-3" not in str(info.value)
