"""`onboard demo`'s stage: the Versori emulator and the demo's SMTP server on this machine, and
the environment that points a run at them, with a fresh ledger and mail folder each time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from demo.smtp import LocalSmtpServer

# Faults the demo injects into a few example tenants so that retries and failures show.
DEMO_SCRIPT = {
    "flaky-": ["503", "503"],
    "throttled-": ["429"],
    "down-under-": ["503*"],
    "badlink-": ["bad_url"],
}
# Settings that would send the demo's run somewhere other than its own stand-ins.
_UNSET = (
    "VERSORI_API_KEY_BLOCK",
    "ONBOARD_SMTP_BLOCK",
    "ONBOARD_SMTP_USERNAME",
    "ONBOARD_SMTP_PASSWORD",
    "ONBOARD_SMTP_CA_FILE",
)


@dataclass(frozen=True)
class DemoStage:
    ledger: Path
    ledger_url: str
    mail_dir: Path


@contextmanager
def demo_stage(output: Path) -> Iterator[DemoStage]:
    """The emulator and the SMTP server running, and this process's environment (which the
    run reads) pointing at them and at a ledger in `output`; the last demo's ledger and mail
    there are deleted first. Both servers stop on exit; the environment stays as set."""
    output.mkdir(parents=True, exist_ok=True)
    mail_dir = output / "mail"
    for stale in [*output.glob("onboarding.db*"), *mail_dir.glob("*.eml")]:
        stale.unlink()
    ledger = output / "onboarding.db"
    ledger_url = f"sqlite:///{ledger.resolve()}"
    with (
        EmulatorServer(EmulatorConfig(script=DEMO_SCRIPT, seed=7)) as emulator,
        LocalSmtpServer(mail_dir) as smtp,
    ):
        for name in _UNSET:
            os.environ.pop(name, None)
        os.environ.update(
            VERSORI_BASE_URL=emulator.base_url,
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=ledger_url,
            ONBOARD_SMTP_HOST=smtp.host,
            ONBOARD_SMTP_PORT=str(smtp.port),
            ONBOARD_SMTP_SECURITY="none",
            ONBOARD_EMAIL_FROM="onboarding@demo.example.com",
        )
        yield DemoStage(ledger=ledger, ledger_url=ledger_url, mail_dir=mail_dir)
