"""`onboard demo`, the Quickstart's first command, as a user runs it: its own process, the
emulator and SMTP server it starts, the single-connector run and then the campaign."""

from __future__ import annotations

import email.policy
import subprocess
import sys
from collections import Counter
from email import message_from_bytes
from pathlib import Path

import pytest

from demo.processes import base_env
from onboarding.ledger import Ledger

ONBOARD = str(Path(sys.executable).parent / "onboard")
ZENDESK = "01M8F12B95S4BX0QFB3TPDWZ0Q"
SLACK = "01M8F12B95S4BX0QFB3TPDWZ0S"
CRM = "01M8F12B95S4BX0QFB3TPDWZ0W"  # demo/emulator_config.py DEMO_CRM


@pytest.mark.e2e
def test_the_demo_onboards_the_roster_then_runs_a_two_connector_campaign(
    tmp_path: Path, prefect_api: str
) -> None:
    env = base_env(tmp_path)
    env["PREFECT_API_URL"] = prefect_api  # the session's server, not a temporary one
    output = tmp_path / "demo"
    done = subprocess.run(
        [ONBOARD, "demo", "--output", str(output)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "25 tenant(s)" in done.stdout and "23 delivered, 2 failed" in done.stdout
    assert "Then a campaign" in done.stdout
    assert "23 .eml file(s) from the first run" in done.stdout
    assert "25 from the campaign" in done.stdout

    ledger = Ledger(f"sqlite:///{output / 'onboarding.db'}")
    # Zendesk: t024's link, refused in the first run, made in the campaign; t023 is down.
    assert ledger.counts_by_status(ZENDESK) == {"delivered": 24, "failed": 1}
    assert ledger.counts_by_status(SLACK) == {"delivered": 25}
    messages = [
        message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in sorted((output / "mail").glob("*.eml"))
    ]
    assert len(messages) == 51  # + the connect act: t001, t002 and t002's reconnect email
    campaign = messages[23:48]
    assert len({str(m["To"]) for m in campaign}) == 25  # one email per tenant
    # "<who asks> would like to connect to your <connectors> for <tenant>"
    subjects = Counter(
        str(m["Subject"]).split(" to your ", 1)[1].rsplit(" for ", 1)[0] for m in campaign
    )
    # t024 lacked both links: one email with the two; the others lacked Slack's only (t023's
    # Zendesk link failed again, and its email went with Slack's).
    # Each connector by its display_name (the profile's name made readable).
    assert subjects == {"Slack Demo": 24, "Zendesk Demo and Slack Demo": 1}

    # Last, t001 connects through a durable link emailed to it and is activated; t002 too, then
    # its credential breaks, sync finds it, a reconnect email goes out and its click updates the
    # same connection; the funnel is printed.
    assert "callback: 'Acme Corp is connected to Acme Crm'" in done.stdout
    assert "`onboard sync` found it broken; a reconnect email went out" in done.stdout
    assert "The same connection, updated in place." in done.stdout
    assert (
        "acme-crm: linked 2 → delivered 2 (100%) → opened 2 (100%) → started 2 (100%) → "
        "connected 2 (100%) → activated 2 (100%)" in done.stdout
    )
    text = messages[48].get_body(preferencelist=("plain",))
    assert text is not None and "/c/" in str(text.get_content())
    reconnect = messages[-1]
    assert "Acme Crm connection for Globex stopped working" in str(reconnect["Subject"])
    for tenant in ("t001", "t002"):
        record = ledger.get(tenant, CRM)
        assert record is not None and record.status.value == "activated" and record.connection_id
    ledger.close()
