"""Email delivery, reminders and recorded connections, through the real flows under Prefect's
test harness, against the emulator and a real SMTP server (STARTTLS + AUTH) on loopback."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

import flows.onboard_tenants as onboard_module
import flows.remind_tenants as remind_module
from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from flows.record_connection import record_connection_flow
from onboarding.clock import utcnow
from onboarding.ledger import Ledger, Status, records
from tests.flows.helpers import error_of, summary_of
from tests.smtp_server import DROP, SmtpTestServer

pytestmark = pytest.mark.usefixtures("prefect_harness")

PROFILE = str(Path(__file__).resolve().parents[2] / "examples" / "profile.yaml")
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def ledger(mail_ledger: Ledger) -> Ledger:
    return mail_ledger  # tests/flows/conftest.py


def roster(tmp_path: Path, names: list[str]) -> str:
    path = tmp_path / "tenants.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i, name in enumerate(names, 1):
            w.writerow([f"t{i}", name, f"admin{i}@t{i}.example.com", f"t{i}"])
    return str(path)


def onboard(path: str, deliver: str = "email") -> tuple[str, dict[str, Any]]:
    state = onboard_module.onboard_tenants(
        roster=path, profile=PROFILE, deliver=deliver, concurrency=3, return_state=True
    )
    return state.type.value, summary_of(state, raise_on_failure=False)


def onboard_raising(path: str) -> tuple[str, Exception]:
    """An `onboard` run that stops on an error: its state's type and the error."""
    state = onboard_module.onboard_tenants(
        roster=path, profile=PROFILE, deliver="email", concurrency=3, return_state=True
    )
    return state.type.value, error_of(state)


def remind(**kwargs: Any) -> tuple[str, dict[str, Any]]:
    state = remind_module.remind_tenants(profile=PROFILE, return_state=True, **kwargs)
    return state.type.value, summary_of(state, raise_on_failure=False)


def sent_to(smtp: SmtpTestServer) -> Counter[str]:
    return Counter(str(r.message()["To"]) for r in smtp.messages)


def body_text(smtp: SmtpTestServer, address: str) -> list[str]:
    out = []
    for received in smtp.messages:
        message = received.message()
        if str(message["To"]) == address:
            out.append(message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    return out


def test_each_admin_gets_exactly_its_link_and_a_rerun_sends_nothing(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer, emulator: Any
) -> None:
    path = roster(tmp_path, ["Acme", "Globex", "Initech"])
    state, summary = onboard(path)
    assert state == "COMPLETED", summary
    assert summary["by_status"] == {"delivered": 3}
    assert sent_to(smtp) == {f"admin{i}@t{i}.example.com": 1 for i in (1, 2, 3)}
    for i in (1, 2, 3):
        record = ledger.get(f"t{i}", CONNECTOR)
        assert record is not None and record.status is Status.DELIVERED
        assert record.delivery_channel == "email" and record.url
        (text,) = body_text(smtp, f"admin{i}@t{i}.example.com")
        assert record.url in text.split(), "the link arrives exactly, on a line of its own"
        message = next(
            r.message() for r in smtp.messages if r.message()["To"] == record.admin_email
        )
        assert message["Message-ID"] == record.message_id
        assert message.get_content_type() == "multipart/alternative"
        html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert f'href="{record.url.replace("&", "&amp;")}"' in html
    assert smtp.connections <= 3, "one SMTP connection per worker thread, reused"

    requests = emulator.stats()["requests"]
    state, summary = onboard(path)
    assert state == "COMPLETED" and summary["by_status"] == {"skipped": 3}
    assert len(smtp.messages) == 3 and emulator.stats()["requests"] == requests


def test_a_421_is_retried_with_the_same_link_and_a_550_is_not(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer, emulator: Any
) -> None:
    smtp.on_rcpt("admin1@t1.example.com", "421 4.3.0 Try again later")
    smtp.on_rcpt("admin2@t2.example.com", "550 5.1.1 No such user here", always=True)
    path = roster(tmp_path, ["Busy", "Gone", "Fine"])
    state, summary = onboard(path)
    assert state == "FAILED"
    outcomes = {o["tenant_id"]: o for o in summary["outcomes"]}
    assert outcomes["t1"]["status"] == "delivered"
    assert emulator.stats()["requests"] == 3, "a mail retry reuses the link it already has"
    busy = ledger.get("t1", CONNECTOR)
    # `attempts` counts Versori calls: the mail's retry made none.
    assert busy is not None and busy.attempts == 1 and busy.status is Status.DELIVERED

    gone = ledger.get("t2", CONNECTOR)
    assert gone is not None and gone.status is Status.FAILED and gone.attempts == 1
    assert gone.error_code == "smtp_rejected" and "550" in (gone.error_message or "")
    assert gone.url and gone.url not in (gone.error_message or "")
    assert outcomes["t2"]["error_code"] == "smtp_rejected"
    assert sent_to(smtp) == {"admin1@t1.example.com": 1, "admin3@t3.example.com": 1}


def test_a_dropped_connection_loses_no_tenant(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer
) -> None:
    smtp.on_data("admin2@t2.example.com", DROP)
    path = roster(tmp_path, [f"T{i}" for i in range(1, 7)])
    state, summary = onboard(path, deliver="both")
    assert state == "COMPLETED", summary
    assert sent_to(smtp) == {f"admin{i}@t{i}.example.com": 1 for i in range(1, 7)}
    assert ledger.counts_by_status(CONNECTOR) == {"delivered": 6}
    record = ledger.get("t2", CONNECTOR)
    assert record is not None and record.delivery_channel == "both"


def test_a_crash_while_sending_resends_the_same_message_id_and_nothing_else(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer
) -> None:
    path = roster(tmp_path, ["A", "B"])
    assert onboard(path)[0] == "COMPLETED"
    first = ledger.get("t1", CONNECTOR)
    assert first is not None and first.message_id
    # What a crash between `sending` and `delivered` leaves behind:
    ledger.mark_sending("t1", CONNECTOR, message_id=first.message_id)
    assert onboard(path)[0] == "COMPLETED"
    assert sent_to(smtp) == {"admin1@t1.example.com": 2, "admin2@t2.example.com": 1}
    ids = [
        r.message()["Message-ID"] for r in smtp.messages if r.message()["To"] == first.admin_email
    ]
    assert ids == [first.message_id, first.message_id], "a duplicate is recognisable"


def test_markup_in_a_tenant_name_is_escaped(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer
) -> None:
    path = roster(tmp_path, ["<script>alert(1)</script> & Co"])
    assert onboard(path)[0] == "COMPLETED"
    (received,) = smtp.messages
    html = received.message().get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html
    assert "\n" not in str(received.message()["Subject"])


def test_reminders_resend_reissue_stale_links_and_stop_at_the_cap(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer, emulator: Any
) -> None:
    path = roster(tmp_path, ["Fresh", "Stale", "Stored"])
    assert onboard(path)[0] == "COMPLETED"
    # t2's link is past its time; t3 only ever had its link stored, so it is never emailed.
    stale = ledger.get("t2", CONNECTOR)
    assert stale is not None and stale.state
    with ledger.engine.begin() as conn:
        past = utcnow() - timedelta(hours=1)
        conn.execute(update(records).where(records.c.tenant_id == "t2").values(expires_at=past))
        conn.execute(
            update(records)
            .where(records.c.tenant_id == "t3")
            .values(delivery_channel="store", expires_at=past)
        )
    requests = emulator.stats()["requests"]

    state, summary = remind(after_hours=0, max_reminders=1, dry_run=True)
    assert state == "COMPLETED"
    assert sorted(o["status"] for o in summary["outcomes"]) == ["would_reissue", "would_remind"]
    assert len(smtp.messages) == 3

    state, summary = remind(after_hours=0, max_reminders=1)
    assert state == "COMPLETED", summary
    assert summary["by_status"] == {"reminded": 2} and summary["expired"] == 1
    assert emulator.stats()["requests"] == requests + 1, "only the stale link is re-issued"
    reissued = ledger.get("t2", CONNECTOR)
    assert reissued is not None and reissued.state != stale.state and reissued.reminders == 1
    assert reissued.expires_at and reissued.expires_at > utcnow()
    old = ledger.find_superseded(stale.state)
    assert old is not None and old.tenant_id == "t2"
    (first, reminder) = body_text(smtp, "admin2@t2.example.com")
    assert stale.url in first.split() and reissued.url in reminder.split()
    subjects = [str(r.message()["Subject"]) for r in smtp.messages[3:]]
    assert all(s.startswith("Reminder") for s in subjects) and len(subjects) == 2
    assert ledger.get("t3", CONNECTOR).status is Status.EXPIRED  # type: ignore[union-attr]

    state, summary = remind(after_hours=0, max_reminders=1)
    assert state == "COMPLETED" and summary["total"] == 0, "the cap holds"
    assert len(smtp.messages) == 5


def test_record_connection_marks_the_owner_and_refuses_unknown_or_superseded_states(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer
) -> None:
    path = roster(tmp_path, ["A", "B"])
    assert onboard(path)[0] == "COMPLETED"
    record = ledger.get("t1", CONNECTOR)
    assert record is not None and record.state

    state = record_connection_flow(state=record.state, connection_id="conn-1", return_state=True)
    assert state.is_completed()
    assert state.result()["tenant_id"] == "t1"  # type: ignore[index]
    connected = ledger.get("t1", CONNECTOR)
    assert connected is not None and connected.status is Status.CONNECTED
    assert connected.connection_id == "conn-1" and connected.connected_at is not None

    unknown = record_connection_flow(state="no-such-state-value", return_state=True)
    assert unknown.is_failed() and "no tenant owns state" in (unknown.message or "")
    assert "no-such-state-value" not in (unknown.message or "")

    # Re-issue t2's link, then the old state's callback arrives late.
    other = ledger.get("t2", CONNECTOR)
    assert other is not None and other.state and other.url
    ledger.record_link(
        tenant_id="t2",
        connector_id=CONNECTOR,
        profile="zendesk-demo",
        tenant_name="B",
        admin_email=other.admin_email,
        url=other.url.replace(other.state, "fresh-state"),
        state="fresh-state",
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(hours=1),
    )
    late = record_connection_flow(state=other.state, return_state=True)
    assert late.is_failed() and "belonged to tenant t2" in (late.message or "")
    assert ledger.get("t2", CONNECTOR).status is not Status.CONNECTED  # type: ignore[union-attr]

    # A connected tenant is never reminded.
    _, summary = remind(after_hours=0, max_reminders=3)
    assert "t1" not in {o["tenant_id"] for o in summary["outcomes"]}


def test_secrets_from_prefect_blocks(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret
    from prefect_email import EmailServerCredentials

    kwargs = smtp.sender_kwargs()
    Secret(value=DEFAULT_API_KEY).save("versori-api-key-test", overwrite=True)
    EmailServerCredentials(
        smtp_server=kwargs["host"],
        smtp_port=kwargs["port"],
        smtp_type="STARTTLS",
        username=kwargs["username"],
        password=kwargs["password"],
    ).save("smtp-test", overwrite=True)
    for name in (
        "VERSORI_API_KEY",
        "ONBOARD_SMTP_HOST",
        "ONBOARD_SMTP_PORT",
        "ONBOARD_SMTP_USERNAME",
        "ONBOARD_SMTP_PASSWORD",
        "ONBOARD_SMTP_SECURITY",
    ):
        monkeypatch.delenv(name)
    monkeypatch.setenv("VERSORI_API_KEY_BLOCK", "versori-api-key-test")
    monkeypatch.setenv("ONBOARD_SMTP_BLOCK", "smtp-test")
    state, summary = onboard(roster(tmp_path, ["Blocky"]))
    assert state == "COMPLETED", summary
    assert sent_to(smtp) == {"admin1@t1.example.com": 1}

    monkeypatch.setenv("ONBOARD_SMTP_BLOCK", "no-such-block")
    state, result = onboard_raising(roster(tmp_path, ["Other"]))
    assert state == "FAILED" and "no EmailServerCredentials block named 'no-such-block'" in str(
        result
    )


def test_broken_and_disconnected_tenants_get_a_reconnect_email_and_stay_so(
    tmp_path: Path, ledger: Ledger, smtp: SmtpTestServer, emulator: Any
) -> None:
    """What sync found (a credential broken, a connection gone) is what `onboard remind`
    writes to: a reconnect email of its own ("... stopped working"), through the same links;
    their status stays broken / disconnected until the tenant connects again."""
    path = roster(tmp_path, ["Broken Co", "Gone Co", "Fine Co"])
    assert onboard(path)[0] == "COMPLETED"
    with ledger.engine.begin() as conn:
        long_ago = utcnow() - timedelta(days=30)
        for tenant, status, reason, connection in (
            ("t1", Status.BROKEN, "broken", "01M8F12B95S4BX0QFB3TPDWZ2A"),
            ("t2", Status.DISCONNECTED, "disconnected", None),
            ("t3", Status.ACTIVATED, None, "01M8F12B95S4BX0QFB3TPDWZ2C"),
        ):
            conn.execute(
                update(records)
                .where(records.c.tenant_id == tenant)
                .values(
                    status=status.value,
                    reconnect_of=reason,
                    connection_id=connection,
                    reminders=0,
                    last_sent_at=long_ago,
                    expires_at=long_ago,
                )
            )
    before = len(smtp.messages)
    state, summary = remind(after_hours=1, max_reminders=1)
    assert state == "COMPLETED", summary
    assert sorted(o["tenant_id"] for o in summary["outcomes"]) == ["t1", "t2"]
    mailed = {str(r.message()["To"]): r.message() for r in smtp.messages[before:]}
    assert set(mailed) == {"admin1@t1.example.com", "admin2@t2.example.com"}
    broken = mailed["admin1@t1.example.com"]
    assert "connection for Broken Co stopped working" in str(broken["Subject"])
    [text] = body_text(smtp, "admin1@t1.example.com")[-1:]
    assert "no longer accepts its sign-in" in " ".join(text.split())
    t1, t2 = ledger.get("t1", CONNECTOR), ledger.get("t2", CONNECTOR)
    assert t1 is not None and t1.status is Status.BROKEN and t1.reminders == 1
    assert t1.connection_id == "01M8F12B95S4BX0QFB3TPDWZ2A", "kept: the reconnect updates it"
    assert t2 is not None and t2.status is Status.DISCONNECTED
    assert ledger.get("t3", CONNECTOR).status is Status.ACTIVATED  # type: ignore[union-attr]
