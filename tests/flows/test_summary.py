"""flows/reporting/summary.py: a run's bounded tally (`OutcomeCounts`), its summary
(`summarise`), its final state (`final_state`), and the table and markdown artifacts
(`publish`, against the session's Prefect server)."""

from __future__ import annotations

import json
import sys
import tracemalloc
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

import flows.reporting.summary as summary_module
import onboarding.batch.outcomes as outcomes_module
from flows.reporting.summary import OutcomeCounts, final_state, publish, summarise
from onboarding.batch.outcomes import TenantOutcome
from onboarding.batch.run_summary import RunSummary

ALREADY = "already delivered or connected, no task run needed"


def outcome(n: int, failed: bool = False) -> TenantOutcome:
    if failed:
        return TenantOutcome(f"t{n:05d}", "failed", error_code="unavailable", error_message="503")
    return TenantOutcome(f"t{n:05d}", "delivered", link_host="x.example.com", masked_state="Zk3v…")


def skipped(n: int, why: str = ALREADY) -> TenantOutcome:
    return TenantOutcome(f"t{n:05d}", "skipped", error_message=why)


def campaign_outcome(n: int, slack: str = "delivered") -> TenantOutcome:
    parts = (
        TenantOutcome(f"t{n:05d}", "delivered", connector="zendesk-demo"),
        TenantOutcome(
            f"t{n:05d}",
            slack,
            error_code="unavailable" if slack == "failed" else "",
            connector="slack-demo",
        ),
    )
    status = "failed" if slack == "failed" else "delivered"
    return TenantOutcome(f"t{n:05d}", status, parts=parts)


# --- OutcomeCounts -----------------------------------------------------------------------------


def test_a_tally_counts_everything_and_keeps_a_bounded_sample_failures_first() -> None:
    tally = OutcomeCounts(keep=10)
    for n in range(10_000):
        tally.add(outcome(n, failed=n % 1000 == 999))
    assert tally.total == 10_000
    assert tally.by_status == {"delivered": 9990, "failed": 10}
    assert tally.errors == {"unavailable": 10}
    rows = tally.rows()
    assert len(rows) == 10 and all(r["status"] == "failed" for r in rows)
    assert rows[0]["tenant_id"] == "t00999", "failures in tenant order"


def test_failures_come_first_then_others_each_in_tenant_order() -> None:
    tally = OutcomeCounts(keep=4)
    for n, failed in [(9, False), (5, True), (1, False), (3, True)]:
        tally.add(outcome(n, failed))
    assert [(r["tenant_id"], r["status"]) for r in tally.rows()] == [
        ("t00003", "failed"),
        ("t00005", "failed"),
        ("t00001", "delivered"),
        ("t00009", "delivered"),
    ]


def test_failures_that_come_after_the_sample_is_full_still_push_successes_out() -> None:
    tally = OutcomeCounts(keep=3)
    for n in range(5):
        tally.add(outcome(n))
    tally.add(outcome(100, failed=True))
    tally.add(outcome(101, failed=True))
    rows = tally.rows()
    assert [r["tenant_id"] for r in rows] == ["t00100", "t00101", "t00000"]
    assert tally.rows_seen == 7


def test_a_tallys_memory_stays_flat_however_many_tenants_go_by() -> None:
    # Only what the tally, the outcomes and their rows allocate: the session's Prefect server
    # runs in a thread of this process meanwhile.
    ours = [
        tracemalloc.Filter(True, module.__file__ or "")
        for module in (summary_module, outcomes_module, sys.modules[__name__])
    ]

    def held() -> int:
        return sum(
            s.size for s in tracemalloc.take_snapshot().filter_traces(ours).statistics("filename")
        )

    tally = OutcomeCounts(keep=10)
    tracemalloc.start()
    try:
        for n in range(2_000):
            tally.add(outcome(n, failed=n % 7 == 0))
        after_few = held()
        for n in range(2_000, 30_000):
            tally.add(outcome(n, failed=n % 7 == 0))
        after_many = held()
    finally:
        tracemalloc.stop()
    assert tally.total == 30_000
    # 28,000 more outcomes and rows, a few hundred bytes each: kept, they would take megabytes.
    assert after_many - after_few < 10_000
    assert len(tally.rows()) == 10


def test_skipped_why_counts_the_reasons_skipped_tenants_give() -> None:
    tally = OutcomeCounts.of(
        [skipped(1), skipped(2), skipped(3, "another run holds it"), skipped(4, "")]
    )
    tally.add(TenantOutcome("t9", "failed", error_code="x", error_message="not a skip reason"))
    assert tally.skipped_why == {ALREADY: 2, "another run holds it": 1}
    assert tally.by_status == {"skipped": 4, "failed": 1}


def test_a_campaign_tenant_counts_per_connector_and_has_a_row_per_connector() -> None:
    tally = OutcomeCounts.of([campaign_outcome(1), campaign_outcome(2, slack="failed")])
    assert tally.by_status == {"delivered": 1, "failed": 1}, "tenants, once each"
    assert tally.by_connector == {
        "zendesk-demo": {"delivered": 2},
        "slack-demo": {"delivered": 1, "failed": 1},
    }
    assert tally.errors == {"unavailable": 1}
    assert tally.rows_seen == 4
    assert [(r["tenant_id"], r["connector"], r["status"]) for r in tally.rows()] == [
        ("t00002", "slack-demo", "failed"),
        ("t00001", "zendesk-demo", "delivered"),
        ("t00001", "slack-demo", "delivered"),
        ("t00002", "zendesk-demo", "delivered"),
    ]


def test_a_tally_merges_chunk_summaries_into_one_table() -> None:
    first, second = OutcomeCounts(keep=4), OutcomeCounts(keep=4)
    for n in range(3):
        first.add(outcome(n))
    second.add(outcome(7, failed=True))
    second.add(outcome(8))
    batch = OutcomeCounts(keep=4)
    for part in (first, second):
        # As the unversioned format stored it in batch_chunks, which ledgers still hold.
        old = {
            "by_status": dict(part.by_status),
            "errors": dict(part.errors),
            "outcomes": part.rows(),
        }
        batch.merge(RunSummary.from_json(old))
    assert batch.total == 5 and batch.by_status["failed"] == 1
    assert [r["tenant_id"] for r in batch.rows()] == ["t00007", "t00000", "t00001", "t00002"]


def test_merging_chunk_summaries_counts_as_one_tally_of_every_tenant_would() -> None:
    outcomes = [
        *(outcome(n, failed=n % 5 == 0) for n in range(30)),
        *(skipped(n) for n in range(30, 36)),
        *(campaign_outcome(n, slack="failed" if n % 2 else "delivered") for n in range(36, 44)),
    ]
    whole = summarise(OutcomeCounts.of(outcomes), 1.0)
    merged = OutcomeCounts(keep=6)
    for start in range(0, len(outcomes), 10):  # chunks of 10, each its own summary
        chunk = OutcomeCounts(keep=6)
        for o in outcomes[start : start + 10]:
            chunk.add(o)
        merged.merge(summarise(chunk, 0.5))
    combined = summarise(merged, 1.0)
    for key in ("total", "failed", "skipped", "by_status", "errors", "skipped_why"):
        assert getattr(combined, key) == getattr(whole, key), key
    assert combined.by_connector == whole.by_connector
    assert len(combined.outcomes) == 6
    rows_in_all = len(whole.outcomes) + whole.outcomes_left_out
    assert rows_in_all == 30 + 6 + 2 * 8, "a campaign tenant has a row per connector"
    assert combined.outcomes_left_out == rows_in_all - 6
    assert all(r["status"] == "failed" for r in combined.outcomes), "failures first"


# --- summarise and final_state -----------------------------------------------------------------


def test_summarise_says_counts_sample_and_how_many_rows_were_left_out() -> None:
    tally = OutcomeCounts(keep=2)
    for o in [outcome(1), outcome(2, failed=True), skipped(3), outcome(4)]:
        tally.add(o)
    summary = summarise(tally, 3.14159, profile="zendesk-demo", dry_run=False)
    assert summary.to_json() == {
        "version": 1,
        "profile": "zendesk-demo",
        "dry_run": False,
        "total": 4,
        "failed": 1,
        "skipped": 1,
        "by_status": {"delivered": 2, "failed": 1, "skipped": 1},
        "by_connector": {},
        "errors": {"unavailable": 1},
        "skipped_why": {ALREADY: 1},
        "seconds": 3.14,
        "outcomes": tally.rows(),
        "outcomes_left_out": 2,
    }
    assert [r["tenant_id"] for r in summary.outcomes] == ["t00002", "t00001"]
    assert RunSummary.from_json(summary.to_json()) == summary


def test_a_run_with_no_failure_completes_saying_how_many_and_why_some_were_skipped() -> None:
    tally = OutcomeCounts.of(
        [outcome(1), skipped(2), skipped(3), skipped(4, "another run holds it")]
    )
    summary = summarise(tally, 1.0)
    state = final_state(summary, "onboarded or skipped")
    assert state.is_completed()
    assert state.message == (
        f"4 tenant(s) onboarded or skipped (2 skipped: {ALREADY}; 1 skipped: another run holds it)"
    )
    assert state.result() == summary.to_json()


def test_a_run_with_nothing_skipped_says_only_how_many() -> None:
    state = final_state(summarise(OutcomeCounts.of([outcome(1), outcome(2)]), 1.0), "reminded")
    assert state.is_completed() and state.message == "2 tenant(s) reminded"


def test_a_run_with_failures_fails_saying_how_many_and_that_the_next_run_retries_them() -> None:
    tally = OutcomeCounts.of([outcome(1), outcome(2, failed=True), outcome(3, failed=True)])
    tally.add(skipped(4))
    summary = summarise(tally, 1.0)
    state = final_state(summary, "onboarded or skipped")
    assert state.is_failed()
    assert state.message == "2 of 4 tenant(s) failed; the next run retries them"
    assert state.result(raise_on_failure=False) == summary.to_json()


# --- publish, on the session's Prefect server --------------------------------------------------


@flow(name="test-publish", persist_result=False)
def publishing(key: str, title: str, source: str, summary: dict[str, Any]) -> None:
    """`publish` where the product calls it: in a flow run."""
    publish(key, title, source, RunSummary.from_json(summary))


def artifacts(*keys: str) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys)))
        )
    return {a.key: a for a in found if a.key is not None}


def table_of(artifact: Any) -> list[dict[str, str]]:
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(data, list)
    return data


@pytest.mark.usefixtures("prefect_harness")
def test_publish_writes_a_table_without_states_and_a_markdown_summary() -> None:
    key = f"onboarding-test-{uuid.uuid4().hex[:12]}"
    tally = OutcomeCounts(keep=2)
    for o in [outcome(1), outcome(2, failed=True), skipped(3), outcome(4, failed=True)]:
        tally.add(o)
    tally.add(
        TenantOutcome("t00005", "failed", error_code="validation_failed", error_message="bad")
    )
    summary = summarise(tally, 2.5, dry_run=True, coverage={"fully": 1, "partly": 0, "none": 4})
    publishing(key, "Onboarding zendesk-demo", "Roster `r.csv`", summary.to_json())
    summary_key = key.replace("-", "-summary-", 1)
    found = artifacts(key, summary_key)
    assert set(found) == {key, summary_key}
    table, markdown = found[key], found[summary_key]
    assert table.type == "table" and markdown.type == "markdown"
    assert table_of(table) == [
        {
            "tenant": "t00002",
            "status": "failed",
            "link host": "",
            "state": "",
            "error": "unavailable: 503",
        },
        {
            "tenant": "t00004",
            "status": "failed",
            "link host": "",
            "state": "",
            "error": "unavailable: 503",
        },
    ]
    assert table.description == (
        "Tenants of Roster `r.csv` (first 2, failures first; `onboard export` has all)"
    )
    text = str(markdown.data)
    assert text.startswith("# Onboarding zendesk-demo (dry run)\n")
    assert "Roster `r.csv`: 5 tenant(s) in 2.5 s." in text
    assert "| delivered | 1 |\n| failed | 3 |\n| skipped | 1 |" in text
    assert f"1 skipped: {ALREADY}." in text
    assert "1 tenant(s) fully connected, 0 partly, 4 not at all." in text
    assert "| unavailable | 2 |\n| validation_failed | 1 |" in text, "most common first"
    assert "| connector |" not in text, "one connector: no connector table"


@pytest.mark.usefixtures("prefect_harness")
def test_publish_for_a_campaign_names_the_connector_of_each_row_and_counts_each() -> None:
    key = f"onboarding-test-{uuid.uuid4().hex[:12]}"
    tally = OutcomeCounts.of([campaign_outcome(1), campaign_outcome(2, slack="failed")])
    publishing(key, "Onboarding a + b", "tenants parameter", summarise(tally, 1.0).to_json())
    found = artifacts(key, key.replace("-", "-summary-", 1))
    rows = table_of(found[key])
    assert [(r["tenant"], r["connector"], r["status"]) for r in rows] == [
        ("t00002", "slack-demo", "failed"),
        ("t00001", "zendesk-demo", "delivered"),
        ("t00001", "slack-demo", "delivered"),
        ("t00002", "zendesk-demo", "delivered"),
    ]
    assert found[key].description == "Tenants of tenants parameter", "nothing left out"
    text = str(found[key.replace("-", "-summary-", 1)].data)
    assert "| connector | delivered | failed |" in text
    assert "| zendesk-demo | 2 | 0 |" in text and "| slack-demo | 1 | 1 |" in text


def test_a_summary_of_a_newer_version_is_refused_and_an_unversioned_one_read() -> None:
    from onboarding.errors import InputError

    old = {"by_status": {"delivered": 2, "failed": 1}, "errors": {}, "outcomes": []}
    read = RunSummary.from_json(old)
    assert (read.total, read.failed, read.stopped) == (3, 1, {})
    assert RunSummary.from_json(read.to_json()) == read
    with pytest.raises(InputError, match="version 2 was written by a newer version"):
        RunSummary.from_json({**read.to_json(), "version": 2})
