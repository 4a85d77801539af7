"""A paced run against a strict API (the emulator's sliding window): no 429. The pacer itself
is tested in tests/unit/test_pacing.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.usefixtures("prefect_harness")
def test_a_paced_run_meets_no_429_from_a_strict_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
    from flows.onboard_tenants import onboard_tenants

    examples = Path(__file__).resolve().parents[2] / "examples"
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        (examples / "profile.yaml").read_text().replace("name: zendesk-demo", "name: paced")
        + "\nrate_limit_per_second: 10\nmax_concurrency: 2\n"
    )
    roster = tmp_path / "r.csv"
    roster.write_text(
        "tenant_id,name,admin_email,subdomain\n"
        + "".join(f"p{i},P{i},a{i}@x.com,p{i}\n" for i in range(12))
    )
    with EmulatorServer(EmulatorConfig(rate_limit=10)) as emulator:
        monkeypatch.setenv("VERSORI_BASE_URL", emulator.base_url)
        monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
        monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'l.db'}")
        state: Any = onboard_tenants(
            roster=str(roster), profile=str(profile), concurrency=16, return_state=True
        )
        stats = emulator.stats()
    assert state.is_completed(), state.message
    assert state.result()["by_status"] == {"delivered": 12}
    assert stats["by_status"] == {"200": 12}, "paced under the API's limit: no 429"
