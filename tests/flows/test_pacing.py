"""Pacing: the brake a 429 applies to a whole process, and the global limit a paced run
creates or corrects before it starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from onboarding import constants
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
    pacer.wait_before_call()
    pacer.hold_off(2.0)
    pacer.hold_off(0.5)  # a shorter brake never shortens a longer one
    pacer.wait_before_call()
    pacer.wait_before_call()
    assert t.slept == [2.0]
    assert taken == [100.0, 102.0, 102.0]
    assert pacer.hold_offs == 2


def test_no_limiter_means_no_wait() -> None:
    t = FakeTime()
    pacer = Pacer(clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        pacer.wait_before_call()
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
    from flows.pacing import SlotDispenser

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


class FlakyConcurrencyAPI:
    """Stands in for Prefect's sync client: `increment_concurrency_slots` raises each error of
    `failures` in turn, then grants every request."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = list(failures)
        self.requests = 0
        self.clients = 0

    def __call__(self, sync_client: bool = False) -> Any:
        assert sync_client
        self.clients += 1
        return self

    def __enter__(self) -> FlakyConcurrencyAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def increment_concurrency_slots(self, names: list[str], slots: int, mode: str) -> Any:
        import httpx

        self.requests += 1
        if self.failures:
            raise self.failures.pop(0)
        return httpx.Response(200, json=[{"name": names[0]}])


def _status_error(status: int, headers: dict[str, str] | None = None) -> BaseException:
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:4200/api/v2/concurrency_limits/increment")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


@pytest.mark.parametrize(
    "failure",
    [
        lambda: ConnectionError("the API went away for a moment"),
        lambda: __import__("httpx").ConnectError("All connection attempts failed"),
        lambda: _status_error(503),
    ],
    ids=["ConnectionError", "httpx.ConnectError", "503"],
)
def test_one_failed_slot_request_is_retried_and_pacing_recovers(
    monkeypatch: pytest.MonkeyPatch, failure: Any
) -> None:
    """Issue 10 #9: the sync client fails once; no caller fails, every later slot is granted."""
    import prefect.client.orchestration

    from flows import pacing as flow_pacing
    from flows.pacing import SlotDispenser

    api = FlakyConcurrencyAPI([failure()])
    monkeypatch.setattr(prefect.client.orchestration, "get_client", api)
    monkeypatch.setattr(flow_pacing, "SLOT_RETRY_DELAYS", (0.01, 0.01))
    dispenser = SlotDispenser("onboarding-rate-x", rate=1000.0, block=2)
    for _ in range(9):
        dispenser()
    assert api.requests >= 5
    assert api.clients == api.requests, "a new client for every try"


def test_slot_requests_recover_after_the_retries_are_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.client.orchestration

    from flows import pacing as flow_pacing
    from flows.pacing import SlotDispenser

    api = FlakyConcurrencyAPI([ConnectionError("down")] * 3)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", api)
    monkeypatch.setattr(flow_pacing, "SLOT_RETRY_DELAYS", (0.01, 0.01))
    dispenser = SlotDispenser("onboarding-rate-x", rate=1000.0, block=2)
    with pytest.raises(ConnectionError):
        dispenser()  # three failures in a row: this caller is told
    for _ in range(5):  # the API is back: every later call gets its slot
        dispenser()


def test_a_client_error_from_the_concurrency_api_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx
    import prefect.client.orchestration

    from flows import pacing as flow_pacing
    from flows.pacing import SlotDispenser

    api = FlakyConcurrencyAPI([_status_error(404)])
    monkeypatch.setattr(prefect.client.orchestration, "get_client", api)
    monkeypatch.setattr(flow_pacing, "SLOT_RETRY_DELAYS", (0.01, 0.01))
    with pytest.raises(httpx.HTTPStatusError):
        SlotDispenser("onboarding-rate-x", rate=1000.0, block=2)()
    assert api.requests == 1


def test_a_hostile_retry_after_on_423_is_clamped(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.client.orchestration

    from flows.pacing import SlotDispenser

    slept: list[float] = []
    api = FlakyConcurrencyAPI(
        [_status_error(423, {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})]
    )
    monkeypatch.setattr(prefect.client.orchestration, "get_client", api)
    monkeypatch.setattr(time, "sleep", slept.append)
    SlotDispenser("onboarding-rate-x", rate=1000.0, block=2)._take_block()
    assert slept == [constants.MAX_RETRY_AFTER_SECONDS]


@pytest.mark.usefixtures("prefect_harness")
def test_a_paced_run_creates_or_corrects_its_global_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from flows.onboard_tenants import onboard_tenants
    from onboarding.demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer

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
