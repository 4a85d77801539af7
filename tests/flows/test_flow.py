"""The onboard-tenants flow under Prefect's test harness, against the emulator on a real socket."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

import flows.onboard_tenants as flow_module
from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from onboarding.ledger import Ledger, Status
from tests.flows.helpers import error_of, summary_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROFILE = str(EXAMPLES / "profile.yaml")


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", db)
    monkeypatch.setenv("VERSORI_API_KEY", DEFAULT_API_KEY)
    monkeypatch.delenv("VERSORI_API_KEY_BLOCK", raising=False)
    return {"db": db, "tmp": tmp_path}


def write_roster(path: Path, subdomains: list[str]) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i, sub in enumerate(subdomains, 1):
            w.writerow([f"t{i:03d}", f"Tenant {sub}", f"admin@{sub}.example.com", sub])
    return str(path)


def run(roster: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    state = flow_module.onboard_tenants(roster=roster, profile=PROFILE, return_state=True, **kwargs)
    return state.type.value, summary_of(state, raise_on_failure=False)


def run_raising(roster: str, **kwargs: Any) -> tuple[str, Exception]:
    """A run that stops on an error: its state's type and the error."""
    state = flow_module.onboard_tenants(roster=roster, profile=PROFILE, return_state=True, **kwargs)
    return state.type.value, error_of(state)


@pytest.fixture
def emulator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    config = getattr(request, "param", None) or EmulatorConfig()
    with EmulatorServer(config) as server:
        monkeypatch.setenv("VERSORI_BASE_URL", server.base_url)
        yield server


def test_all_succeed_then_rerun_skips_everything(env: dict[str, Any], emulator: Any) -> None:
    roster = write_roster(env["tmp"] / "r.csv", [f"acme{i}" for i in range(12)])
    state, summary = run(roster, concurrency=4)
    assert state == "COMPLETED"
    assert summary["by_status"] == {"delivered": 12}
    # The summary shows the connector's funnel in the ledger.
    (funnel,) = summary["funnel"].values()
    assert funnel.startswith(
        "linked 12 → delivered 12 (100%) → opened 0 (0%) → started 0 (0%) → connected 0"
    )
    ledger = Ledger(env["db"])
    record = ledger.get("t001", summary["connector_id"])
    assert record is not None and record.status is Status.DELIVERED
    assert record.url and record.url.startswith("https://acme0.zendesk.com/")
    assert ledger.find_by_state(record.state or "") == record
    assert record.expires_at is not None and record.created_at is not None
    assert (record.expires_at - record.created_at).total_seconds() == 72 * 3600

    requests_before = emulator.stats()["requests"]
    state, summary = run(roster, concurrency=4)
    assert state == "COMPLETED"
    assert summary["by_status"] == {"skipped": 12}
    # A run with nothing to do says why it made no task run (the UI shows none).
    assert summary["skipped_why"] == {"already delivered or connected, no task run needed": 12}
    assert emulator.stats()["requests"] == requests_before


@pytest.mark.parametrize(
    "emulator",
    [
        EmulatorConfig(
            script={
                "flaky": ["503", "502"],
                "throttled": ["429"],
                "down": ["503*"],
                "invalid": ["400"],
                "badlink": ["bad_url"],
            }
        )
    ],
    indirect=True,
)
@pytest.mark.parametrize("per_task", [1, 6, 4], ids=["one-per-task", "one-slice", "two-slices"])
def test_retries_only_transient_failures_and_records_why(
    env: dict[str, Any], emulator: Any, per_task: int
) -> None:
    roster = write_roster(
        env["tmp"] / "r.csv", ["ok", "flaky", "throttled", "down", "invalid", "badlink"]
    )
    state, summary = run(roster, concurrency=3, tenants_per_task=per_task)
    assert state == "FAILED"
    outcomes = {o["tenant_id"]: o for o in summary["outcomes"]}
    ledger = Ledger(env["db"])
    connector = summary["connector_id"]
    attempts = {t: ledger.get(t, connector).attempts for t in outcomes}  # type: ignore[union-attr]
    # ok:1, flaky: 503, 502, ok = 3, throttled: 429, ok = 2, down: 1 + 3 retries,
    # invalid (400): never retried, badlink (URL check): never retried.
    assert attempts == {"t001": 1, "t002": 3, "t003": 2, "t004": 4, "t005": 1, "t006": 1}
    assert emulator.stats()["requests"] == sum(attempts.values())
    assert [outcomes[t]["status"] for t in ("t001", "t002", "t003")] == ["delivered"] * 3
    assert outcomes["t004"]["error_code"] == "unavailable"
    assert outcomes["t005"]["status"] == "failed"
    assert outcomes["t006"]["error_code"] == "link_check_failed"
    failed = ledger.get("t006", connector)
    assert failed is not None and failed.url is None, "a URL failing the checks is never stored"
    assert summary["failed"] == 3


def test_rerun_picks_up_failed_tenants(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "b", "c"])
    monkeypatch.setenv("VERSORI_BASE_URL", "http://127.0.0.1:1")  # nothing listens there
    state, summary = run(roster)
    assert state == "FAILED"
    assert {o["error_code"] for o in summary["outcomes"]} == {"connection_error"}
    ledger = Ledger(env["db"])
    record = ledger.get("t002", summary["connector_id"])
    assert record is not None and record.status is Status.FAILED and record.attempts == 4
    # Where it called, port included, and the setting that chose it.
    assert "could not reach Versori at http://127.0.0.1:1 (VERSORI_BASE_URL)" in (
        record.error_message or ""
    )

    with EmulatorServer() as server:
        monkeypatch.setenv("VERSORI_BASE_URL", server.base_url)
        state, summary = run(roster)
    assert state == "COMPLETED"
    assert summary["by_status"] == {"delivered": 3}


@pytest.mark.parametrize("per_task", [1, 5])
def test_unauthorised_key_stops_the_batch_early(
    env: dict[str, Any], emulator: Any, monkeypatch: pytest.MonkeyPatch, per_task: int
) -> None:
    monkeypatch.setenv("VERSORI_API_KEY", "wrong-key")
    roster = write_roster(env["tmp"] / "r.csv", [f"t{i}" for i in range(40)])
    state, summary = run(roster, concurrency=2, tenants_per_task=per_task)
    assert state == "FAILED"
    # One call at a time until the key answers otherwise: the stop's 3, whatever the
    # concurrency (401 is not retried).
    assert emulator.stats()["requests"] <= 3, "401 is not retried and stops new calls"
    codes = {o["error_code"] for o in summary["outcomes"]}
    assert codes == {"unauthenticated", "not_attempted"}
    assert summary["failed"] == 40
    record = Ledger(env["db"]).get("t040", summary["connector_id"])
    assert record is not None and record.error_code == "not_attempted"
    assert "wrong-key" not in json.dumps(summary)


def test_dry_run_calls_nothing(env: dict[str, Any], emulator: Any) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "b"])
    state, summary = run(roster, dry_run=True)
    assert state == "COMPLETED"
    assert summary["by_status"] == {"would_initialise": 2}
    assert emulator.stats()["requests"] == 0


def test_only_restricts_the_batch(env: dict[str, Any], emulator: Any) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "b", "c"])
    state, summary = run(roster, only=["t002"])
    assert state == "COMPLETED"
    assert [o["tenant_id"] for o in summary["outcomes"]] == ["t002"]


def test_bad_roster_fails_before_any_call(env: dict[str, Any], emulator: Any) -> None:
    bad = env["tmp"] / "bad.csv"
    bad.write_text("tenant_id,name,admin_email,subdomain\nt1,A,not-an-email,a\nt1,B,b@x.com,b\n")
    state, result = run_raising(str(bad))
    assert state == "FAILED"
    assert "bad.csv:2: admin_email" in str(result) and "bad.csv:3: tenant_id" in str(result)
    assert emulator.stats()["requests"] == 0


def test_artifacts_hold_no_link_or_state(env: dict[str, Any], emulator: Any) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "b"])
    final = flow_module.onboard_tenants(roster=roster, profile=PROFILE, return_state=True)
    assert final.is_completed()
    states = [r.state for r in Ledger(env["db"]).iter_records()]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[final.state_details.flow_run_id])
            ),
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=["onboarding-zendesk-demo", "onboarding-summary-zendesk-demo"]
                )
            ),
        )
    assert {a.key for a in artifacts} >= {
        "onboarding-zendesk-demo",
        "onboarding-summary-zendesk-demo",
    }
    table = next(a for a in artifacts if a.key == "onboarding-zendesk-demo")
    text = json.dumps(table.data) if not isinstance(table.data, str) else table.data
    assert "t001" in text and "a.zendesk.com" in text
    for s in states:
        assert s and s not in text
    assert "state=" not in text


def test_tenants_inline_instead_of_a_roster(env: dict[str, Any], emulator: Any) -> None:
    tenants = [
        {
            "tenant_id": "api-1",
            "name": "One",
            "admin_email": "one@x.com",
            "fields": {"subdomain": "one"},
        },
        {
            "tenant_id": "api-2",
            "name": "Two",
            "admin_email": "two@x.com",
            "fields": {"subdomain": "two"},
        },
    ]
    state = flow_module.onboard_tenants(profile=PROFILE, tenants=tenants, return_state=True)
    assert state.is_completed()
    assert state.result()["by_status"] == {"delivered": 2}  # type: ignore[index]
    assert state.result()["roster"] == "tenants parameter"  # type: ignore[index]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)  # type: ignore[arg-type]
    assert run.name == "zendesk-demo (Zendesk Demo) for api-1, api-2"
    assert "profile:zendesk-demo" in run.tags

    bad = [{"tenant_id": "api-3", "name": "Three", "admin_email": "three", "fields": {}}]
    state = flow_module.onboard_tenants(profile=PROFILE, tenants=bad, return_state=True)
    assert state.is_failed()
    text = str(state.result(raise_on_failure=False))
    assert "tenants parameter:1: admin_email" in text and "tenants parameter:1: subdomain" in text
    assert emulator.stats()["requests"] == 2

    both = flow_module.onboard_tenants(
        profile=PROFILE, tenants=tenants, roster="x.csv", return_state=True
    )
    assert both.is_failed() and "not both" in str(both.result(raise_on_failure=False))


def tenant_events(flow_run_id: Any, expected: int, timeout: float = 15.0) -> list[Any]:
    """The onboarding.tenant.* events related to a flow run, once `expected` have arrived."""
    import time

    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    query = EventFilter(
        event=EventNameFilter(prefix=["onboarding.tenant."]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(filter=query, limit=50)
            if len(page.events) >= expected or time.monotonic() > deadline:
                return page.events
            time.sleep(0.25)


@pytest.mark.parametrize("emulator", [EmulatorConfig(script={"bad": ["400"]})], indirect=True)
@pytest.mark.parametrize("per_task", [1, 3])
def test_each_status_change_is_a_prefect_event_without_secrets(
    env: dict[str, Any], emulator: Any, per_task: int
) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "bad", "c"])
    final = flow_module.onboard_tenants(
        roster=roster, profile=PROFILE, tenants_per_task=per_task, return_state=True
    )
    assert final.is_failed()
    events = tenant_events(final.state_details.flow_run_id, 3)
    by_tenant = {e.resource.id: e for e in events}
    assert {k: e.event for k, e in by_tenant.items()} == {
        "onboarding.tenant.t001": "onboarding.tenant.delivered",
        "onboarding.tenant.t002": "onboarding.tenant.failed",
        "onboarding.tenant.t003": "onboarding.tenant.delivered",
    }
    assert len(events) == 3, "one event per status change, none for a transient retry"
    failed = by_tenant["onboarding.tenant.t002"]
    assert failed.payload == {"error_code": "validation_failed"}
    assert failed.resource["onboarding.connector-id"] == "01M8F12B95S4BX0QFB3TPDWZ0Q"
    assert failed.resource["onboarding.profile"] == "zendesk-demo"
    ledger = Ledger(env["db"])
    secrets = [r.state for r in ledger.iter_records() if r.state]
    secrets += [r.url for r in ledger.iter_records() if r.url]
    text = json.dumps([e.model_dump(mode="json") for e in events])
    assert secrets and not any(s in text for s in secrets)
    assert "@" not in text, "no email address in an event"


def test_tenant_events_can_be_failures_only_or_off(env: dict[str, Any], emulator: Any) -> None:
    roster = write_roster(env["tmp"] / "r.csv", ["a", "b"])
    quiet = flow_module.onboard_tenants(
        roster=roster, profile=PROFILE, tenant_events="failures", return_state=True
    )
    assert quiet.is_completed()
    assert tenant_events(quiet.state_details.flow_run_id, 1, timeout=3) == []


def test_the_example_automations_are_valid_for_prefect() -> None:
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load((EXAMPLES / "automations.yaml").read_text())
    automations = [AutomationCore.model_validate(a) for a in spec["automations"]]
    assert [a.trigger.expect for a in automations] == [  # type: ignore[union-attr]
        {"onboarding.tenant.failed"},
        {"onboarding.tenant.broken"},
        {"onboarding.tenant.connected"},
    ]


def test_a_roster_url_with_a_credential_is_never_a_plain_parameter(
    env: dict[str, Any], emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server, a signed roster URL as the `roster` parameter is refused (the server would
    keep it in clear); `secret:<block>` reads the same URL from a Secret block instead."""
    import http.server
    import threading

    from prefect.blocks.system import Secret

    write_roster(env["tmp"] / "r.csv", ["signed1", "signed2"])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(env["tmp"]), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ONBOARD_ROSTER_ALLOWED_HOSTS", "127.0.0.1")
        signed = f"http://127.0.0.1:{server.server_port}/r.csv?X-Amz-Signature=s1gn3d"
        state, result = run_raising(signed)
        assert state == "FAILED"
        assert "secret:<block name>" in str(result) and "s1gn3d" not in str(result)
        assert emulator.app.state.emulator.stats()["requests"] == 0

        Secret(value=signed).save("roster-url-test", overwrite=True)
        state, summary = run("secret:roster-url-test")
        assert state == "COMPLETED", summary
        assert summary["by_status"] == {"delivered": 2}
        assert "s1gn3d" not in json.dumps(summary)

        state, result = run_raising("secret:no-such-block")
        assert state == "FAILED" and "no Secret block named 'no-such-block'" in str(result)
    finally:
        server.shutdown()


@pytest.mark.parametrize("emulator", [EmulatorConfig(latency_ms=100)], indirect=True)
def test_two_batches_of_one_profile_at_once_do_each_tenant_once(
    env: dict[str, Any], emulator: Any
) -> None:
    """Two batches of one roster at once share its tenants through their claims in the
    ledger: each tenant is done by one of them and skipped by the other; no tenant gets two
    links, and neither batch waits for the other to end."""
    import threading
    import time

    roster = write_roster(env["tmp"] / "r.csv", [f"turn{i}" for i in range(40)])
    results: list[tuple[str, dict[str, Any]]] = []

    def batch() -> None:
        results.append(run(roster, concurrency=2))

    first = threading.Thread(target=batch)
    first.start()
    deadline = time.monotonic() + 60
    while emulator.app.state.emulator.stats()["requests"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = threading.Thread(target=batch)
    second.start()
    first.join(120)
    second.join(120)
    assert emulator.app.state.emulator.stats()["requests"] == 40
    counts: Counter[str] = Counter()
    for _, summary in results:
        counts.update(summary["by_status"])
    assert counts == {"delivered": 40, "skipped": 40}, results
    assert {r[0] for r in results} == {"COMPLETED"}
