"""`onboard run` interrupted: the report counts each tenant as the ledger does (DONE_STATUSES),
opened and declined tenants among those done."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import update

from deployments import cli_output
from onboarding.clock import utcnow
from onboarding.ledger import DONE_STATUSES, HELD_STATUSES, LIVE_STATUSES, Ledger, Status, records


def _ledger_with(url: str, statuses: dict[str, Status]) -> None:
    ledger = Ledger(url)
    now = utcnow()
    for tenant_id, status in statuses.items():
        ledger.record_link(
            tenant_id=tenant_id,
            connector_id="c-crm",
            profile="crm",
            tenant_name=tenant_id,
            admin_email=f"{tenant_id}@x.example",
            url=f"https://crm.example/authorize?state=s-{tenant_id}",
            state=f"s-{tenant_id}",
            created_at=now,
            expires_at=now + timedelta(hours=72),
            delivered_by=None,
        )
        with ledger.engine.begin() as conn:
            conn.execute(
                update(records).where(records.c.tenant_id == tenant_id).values(status=status.value)
            )
    ledger.close()


def test_opened_and_declined_tenants_count_as_done_when_a_run_is_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _ledger_with(
        url,
        {
            "t1": Status.DELIVERED,
            "t2": Status.OPENED,
            "t3": Status.DECLINED,
            "t4": Status.FAILED,
            "t5": Status.SENDING,
        },
    )
    tenants = [SimpleNamespace(tenant_id=f"t{i}") for i in range(1, 8)]
    connector = SimpleNamespace(target_id="c-crm", name="crm")
    inputs: Any = SimpleNamespace(roster=tenants, profiles=[connector])
    cli_output.report_interrupted_run(inputs, url)
    said = " ".join(capsys.readouterr().out.split())
    assert said.startswith(
        "Interrupted: 3 of 7 tenant(s) delivered, 1 failed, 1 in progress when stopped, "
        "the rest (2) not started;"
    ), said


def test_every_status_has_one_progress_kind_agreeing_with_the_ledger() -> None:
    from onboarding.ledger.schema import RunProgress, run_progress

    for status in Status:
        kind = run_progress(status)
        assert (kind is RunProgress.DONE) == (status in DONE_STATUSES or status in HELD_STATUSES)
        assert (kind is RunProgress.BEGUN) == (
            status is Status.PENDING or (status in LIVE_STATUSES and status not in DONE_STATUSES)
        )
    assert run_progress("delivered") is RunProgress.DONE
    assert run_progress("no_such_status") is RunProgress.NOT_STARTED
