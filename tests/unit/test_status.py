"""`onboard status`: counts by status per connector, and the funnel of each connector."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.cli import app
from onboarding.clock import utcnow
from onboarding.ledger import Ledger


def test_status_prints_each_connectors_funnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    now = utcnow()
    for i in range(1, 5):
        ledger.record_link(
            tenant_id=f"t{i}",
            connector_id="c-crm",
            profile="crm",
            tenant_name=f"T{i}",
            admin_email=f"a{i}@x.example",
            url=f"https://crm.example/authorize?state=s{i}",
            state=f"s{i}",
            created_at=now,
            expires_at=now + timedelta(hours=72),
            delivered_by="store" if i < 3 else None,
        )
    ledger.close()
    monkeypatch.setenv("ONBOARD_DB_URL", url)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "Funnel (linked → delivered → opened → started → connected):" in result.output
    assert (
        "crm: linked 4 → delivered 2 (50%) → opened 0 (0%) → started 0 (0%) → connected 0"
        in result.output
    )
