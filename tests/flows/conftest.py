"""What the email flow tests share: a real SMTP server (STARTTLS + AUTH) on loopback, and the
environment that points a run at it, at an emulator and at a fresh SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from onboarding.demo.emulator import DEFAULT_API_KEY
from onboarding.ledger import Ledger
from tests.smtp_server import SmtpTestServer


@pytest.fixture
def smtp() -> Iterator[SmtpTestServer]:
    with SmtpTestServer(tls="starttls", auth=True) as server:
        yield server


def mail_run_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp: SmtpTestServer, emulator_url: str
) -> Ledger:
    """Point this process's runs at `smtp`, the emulator at `emulator_url` and a new SQLite
    ledger (returned; the caller closes it), with no block names that would send them
    elsewhere."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    kwargs = smtp.sender_kwargs()
    for name in ("ONBOARD_SMTP_BLOCK", "VERSORI_API_KEY_BLOCK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_BASE_URL", emulator_url)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    monkeypatch.setenv("ONBOARD_SMTP_HOST", kwargs["host"])
    monkeypatch.setenv("ONBOARD_SMTP_PORT", str(kwargs["port"]))
    monkeypatch.setenv("ONBOARD_SMTP_SECURITY", kwargs["security"])
    monkeypatch.setenv("ONBOARD_SMTP_CA_FILE", str(kwargs["ca_file"]))
    monkeypatch.setenv("ONBOARD_SMTP_USERNAME", kwargs["username"])
    monkeypatch.setenv("ONBOARD_SMTP_PASSWORD", kwargs["password"])
    monkeypatch.setenv("ONBOARD_EMAIL_FROM", "Onboarding <onboarding@saas.example.com>")
    return Ledger(db)
