"""Ledger operations for email delivery, reminders, re-issued links and connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from onboarding.ledger import Ledger, Status
from tests.unit.test_ledger import CONNECTOR, HOUR, NOW, OTHER, get, link


def test_reissue_keeps_the_old_state_in_history(ledger: Ledger) -> None:
    link(ledger, "t1", state="old-state", url="https://a.example/x?state=old-state")
    link(
        ledger,
        "t1",
        state="new-state",
        url="https://a.example/x?state=new-state",
        created_at=NOW + HOUR,
    )
    record = get(ledger, "t1")
    assert (record.state, record.attempts) == ("new-state", 2)
    assert ledger.find_by_state("old-state") is None
    old = ledger.find_superseded("old-state")
    assert old is not None and (old.tenant_id, old.connector_id) == ("t1", CONNECTOR)
    assert old.created_at == NOW
    assert ledger.find_superseded("new-state") is None
    # Recording the same link again (a retried write) adds no history.
    link(ledger, "t1", state="new-state", created_at=NOW + HOUR)
    assert ledger.find_superseded("new-state") is None


def test_sending_then_delivered(ledger: Ledger) -> None:
    link(ledger, "t1")
    ledger.mark_sending("t1", CONNECTOR, message_id="<m1@x>")
    assert get(ledger, "t1").status is Status.SENDING
    assert ledger.ids_needing_nothing(CONNECTOR, now=NOW) == set(), "sending is not done"
    ledger.mark_delivered("t1", CONNECTOR, channel="email", at=NOW)
    record = get(ledger, "t1")
    assert (record.status, record.message_id, record.last_sent_at) == (
        Status.DELIVERED,
        "<m1@x>",
        NOW,
    )
    assert ledger.ids_needing_nothing(CONNECTOR, now=NOW) == {"t1"}


def test_tenant_fields_are_kept_for_reissue(ledger: Ledger) -> None:
    link(ledger, "t1", tenant_fields={"subdomain": "acme", "plan": "growth"})
    assert get(ledger, "t1").tenant_fields == {"subdomain": "acme", "plan": "growth"}


def test_reminders_count_and_due_selection(ledger: Ledger) -> None:
    for tenant in ("due", "recent", "capped", "stored", "connected", "expired-due"):
        link(ledger, tenant)
    ledger.mark_delivered("due", CONNECTOR, channel="email", at=NOW - 50 * HOUR)
    ledger.mark_delivered("recent", CONNECTOR, channel="email", at=NOW - HOUR)
    ledger.mark_delivered("capped", CONNECTOR, channel="both", at=NOW - 50 * HOUR)
    for _ in range(3):
        ledger.mark_reminded("capped", CONNECTOR, channel="both", at=NOW - 49 * HOUR)
    ledger.mark_delivered("stored", CONNECTOR, channel="store", at=NOW - 50 * HOUR)
    ledger.mark_delivered("connected", CONNECTOR, channel="email", at=NOW - 50 * HOUR)
    ledger.mark_connected("connected", CONNECTOR, connection_id="c-1", at=NOW)
    ledger.mark_delivered("expired-due", CONNECTOR, channel="email", at=NOW - 60 * HOUR)
    assert len(ledger.expire_links(CONNECTOR, NOW + 100 * HOUR)) >= 1

    due = ledger.due_for_reminder(CONNECTOR, sent_before=NOW - 48 * HOUR, max_reminders=3)
    assert [r.tenant_id for r in due] == ["expired-due", "due"]
    capped = get(ledger, "capped")
    assert (capped.status, capped.reminders, capped.last_sent_at) == (
        Status.EXPIRED,
        3,
        NOW - 49 * HOUR,
    )
    connected = get(ledger, "connected")
    assert (connected.status, connected.connection_id) == (Status.CONNECTED, "c-1")


def test_expire_links_touches_only_past_and_unconnected(ledger: Ledger) -> None:
    link(ledger, "old", created_at=NOW - 100 * HOUR)
    link(ledger, "fresh")
    link(ledger, "other", connector_id=OTHER, created_at=NOW - 100 * HOUR)
    link(ledger, "connected", created_at=NOW - 100 * HOUR)
    ledger.mark_connected("connected", CONNECTOR, connection_id=None, at=NOW)
    assert ledger.expire_links(CONNECTOR, NOW) == ["old"]
    assert get(ledger, "old").status is Status.EXPIRED
    assert get(ledger, "fresh").status is Status.LINK_CREATED
    assert get(ledger, "other", OTHER).status is Status.LINK_CREATED
    assert get(ledger, "connected").status is Status.CONNECTED


def test_an_older_ledger_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the issue-2 schema, with one row in it
        conn.execute(
            "CREATE TABLE onboarding_records (tenant_id VARCHAR(128) NOT NULL, connector_id "
            "VARCHAR(26) NOT NULL, profile VARCHAR(200) NOT NULL, tenant_name TEXT NOT NULL, "
            "admin_email VARCHAR(320) NOT NULL, status VARCHAR(20) NOT NULL, url TEXT, "
            "state VARCHAR(256), created_at DATETIME, expires_at DATETIME, delivered_at DATETIME, "
            "connected_at DATETIME, delivery_channel VARCHAR(20), attempts INTEGER NOT NULL, "
            "error_code VARCHAR(100), error_message TEXT, run_id VARCHAR(64), "
            "updated_at DATETIME NOT NULL, PRIMARY KEY (tenant_id, connector_id))"
        )
        conn.execute(
            "INSERT INTO onboarding_records VALUES ('t1', ?, 'p', 'T', 'a@x.com', 'delivered', "
            "'https://a.example/?state=s', 's', NULL, NULL, NULL, NULL, 'store', 1, NULL, NULL, "
            "NULL, '2030-01-01 00:00:00')",
            (CONNECTOR,),
        )
    ledger = Ledger(f"sqlite:///{path}")
    record = get(ledger, "t1")
    assert (record.status, record.reminders, record.tenant_fields) == (Status.DELIVERED, 0, None)
    ledger.mark_reminded("t1", CONNECTOR, channel="email", at=NOW)
    assert get(ledger, "t1").reminders == 1
    ledger.close()
    Ledger(f"sqlite:///{path}").close()  # a second open finds nothing to add
