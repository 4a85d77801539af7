"""Pacing: the brake a 429 applies to a whole process, and the global limit a paced run
creates or corrects before it starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from onboarding.pacing import CATCH_UP_SECONDS, Pacer, Spacing


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_a_brake_holds_every_caller_until_it_ends() -> None:
    t = FakeTime()
    taken: list[float] = []
    pacer = Pacer(acquire=lambda: taken.append(t.now), clock=t.clock, sleep=t.sleep)
    pacer.wait_turn()
    pacer.brake(2.0)
    pacer.brake(0.5)  # a shorter brake never shortens a longer one
    pacer.wait_turn()
    pacer.wait_turn()
    assert t.slept == [2.0]
    assert taken == [100.0, 102.0, 102.0]
    assert pacer.brakes == 2


def test_no_limiter_means_no_wait() -> None:
    t = FakeTime()
    pacer = Pacer(clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        pacer.wait_turn()
    assert t.slept == []


def test_spacing_lets_calls_through_evenly_and_catches_up_by_half_a_second_at_most() -> None:
    t = FakeTime()
    spacing = Spacing(10.0, clock=t.clock, sleep=t.sleep)
    burst = int(CATCH_UP_SECONDS * 10) + 1  # half a second's worth of calls, and this one
    for _ in range(burst + 3):
        spacing()
    assert t.slept == [0.1, 0.1, 0.1], "after the allowed burst, one call every 0.1 s"
    t.now += 5.0  # a stall: the next calls may come sooner, but only half a second's worth
    t.slept.clear()
    for _ in range(burst + 2):
        spacing()
    assert t.slept == [0.1, 0.1]


def test_slots_recover_after_the_concurrency_api_failed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.common import SlotDispenser

    calls: list[int] = []

    def take_block(self: SlotDispenser) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the API went away for a moment")

    monkeypatch.setattr(SlotDispenser, "_take_block", take_block)
    dispenser = SlotDispenser("onboarding-rate-x", rate=1000.0, block=2)
    with pytest.raises(ConnectionError):
        dispenser()
    for _ in range(5):  # the API is back: every later call gets its slot
        dispenser()
    assert len(calls) >= 4


@pytest.mark.usefixtures("prefect_harness")
def test_a_paced_run_creates_or_corrects_its_global_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from flows.onboard_tenants import onboard_tenants
    from onboarding.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer

    examples = Path(__file__).resolve().parent.parent / "examples"
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
    with get_client(sync_client=True) as client:  # a stale limit from an older profile
        client.upsert_global_concurrency_limit_by_name("onboarding-rate-paced", 99, 99.0)
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
    assert stats["by_status"] == {"200": 12}, "paced at the API's limit: no 429"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("onboarding-rate-paced")
    assert (limit.limit, limit.slot_decay_per_second, limit.active) == (10, 10.0, True)
