"""A slice of tenants, one attempt at a time, without Prefect: each tenant called once per
attempt, a retry calls only the tenants that failed transiently, and every final outcome is
reported once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from demo.emulator_config import EmulatedConnector
from demo.versori_rules import build_url
from onboarding.batch.campaign import Campaign, onboard_tenant
from onboarding.batch.outcomes import StatusChange, TenantOutcome
from onboarding.batch.retry_policy import BatchStop, RetryRule, Tries
from onboarding.batch.tenant_slices import SliceFailed, TenantSlice, run_slice
from onboarding.errors import (
    APITimeoutError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
)
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger
from onboarding.versori.wire import InitialiseRequest, parse_additional_params
from tests.support import campaign_of

PROFILE = Path(__file__).resolve().parents[2] / "examples" / "profile.yaml"


def tenants(n: int) -> list[Tenant]:
    return [
        Tenant(
            tenant_id=f"t{i}",
            name=f"T{i}",
            admin_email=f"a{i}@x.com",
            fields={"subdomain": f"t{i}"},
        )
        for i in range(1, n + 1)
    ]


class Script:
    """Versori, failing each tenant's initialise calls as scripted (a list of errors, then a
    link as the emulator makes it); the tenant is named by the subdomain in authorizeUrl."""

    def __init__(self, plan: dict[str, list[Exception]]) -> None:
        self.plan = {k: list(v) for k, v in plan.items()}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def initialise(
        self, organisation_id: str, connector_id: str, request: InitialiseRequest
    ) -> str:
        tenant_id = request.authorize_url.split("//", 1)[1].split(".", 1)[0]
        with self._lock:
            self.calls[tenant_id] += 1
            errors = self.plan.get(tenant_id)
            error = errors.pop(0) if errors else None
        if error is not None:
            raise error
        profile = load_profile(PROFILE)
        connector = EmulatedConnector(
            organisation_id, connector_id, profile.credential_id, organisation_id, profile.client_id
        )
        body = request.model_dump(by_alias=True)
        pairs = parse_additional_params(request.additional_params or "")
        return build_url(request.authorize_url, connector, body, pairs, f"state-{tenant_id}")


def calling(campaign: Campaign, versori: Script) -> Campaign:
    campaign.connectors[0].client = versori  # type: ignore[assignment]
    return campaign


@pytest.fixture(params=[False, True], ids=["waits-for-its-link", "defers-its-link"])
def job(tmp_path: Path, request: pytest.FixtureRequest) -> Campaign:
    """A campaign whose tenants wait for their link's commit, or hand it to the ledger's writer
    and go on (Campaign.defer_writes, as a batch that only stores asks): every test holds for
    both."""
    changes: list[StatusChange] = []
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    campaign = campaign_of(
        load_profile(PROFILE), ledger, on_status=changes.append, defer_writes=request.param
    )
    assert campaign.defers_writes is request.param
    campaign.changes = changes  # type: ignore[attr-defined]
    return campaign


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def test_every_tenant_once_in_roster_order(job: Campaign, pool: ThreadPoolExecutor) -> None:
    step = Script({})
    batch = TenantSlice(tenants(10), first=11, last=20)
    outcomes = run_slice(calling(job, step), batch, onboard_tenant, pool, last_attempt=False)
    assert [o.tenant_id for o in outcomes] == [f"t{i}" for i in range(1, 11)]
    assert set(step.calls.values()) == {1}
    assert batch.label == "tenants 11-20"


def test_a_retry_calls_only_the_tenants_that_failed_transiently(
    job: Campaign, pool: ThreadPoolExecutor
) -> None:
    step = Script(
        {
            "t2": [ServerError(503, "unavailable", "down"), ServerError(502, "bad", "gw")],
            "t3": [BadRequestError(400, "validation_failed", "bad")],
            "t4": [RateLimitedError(429, "rate_limited", "slow", retry_after=0.05)],
        }
    )
    batch = TenantSlice(tenants(5))
    with pytest.raises(SliceFailed) as first:
        run_slice(calling(job, step), batch, onboard_tenant, pool, last_attempt=False)
    assert set(first.value.retryable) == {"t2", "t4"}
    assert job.connectors[0].pacer.hold_offs == 1, "the 429's Retry-After holds calls off"
    # The 400 is final at once and reported once; transient failures are not reported yet.
    failures = [(c.tenant_id, c.status) for c in job.changes if c.status == "failed"]  # type: ignore[attr-defined]
    assert failures == [("t3", "failed")]
    assert "t3: validation_failed" in str(first.value)

    with pytest.raises(SliceFailed) as second:
        run_slice(calling(job, step), batch, onboard_tenant, pool, last_attempt=False)
    assert set(second.value.retryable) == {"t2"}
    with pytest.raises(SliceFailed) as third:  # t3 still failed, so the slice still fails
        run_slice(calling(job, step), batch, onboard_tenant, pool, last_attempt=False)
    assert third.value.retryable == {}
    assert step.calls == {"t1": 1, "t2": 3, "t3": 1, "t4": 2, "t5": 1}
    by_tenant = {o.tenant_id: o.status for o in third.value.outcomes}
    assert by_tenant == {
        "t1": "delivered",
        "t2": "delivered",
        "t3": "failed",
        "t4": "delivered",
        "t5": "delivered",
    }


def test_on_the_last_attempt_a_transient_failure_is_final(
    job: Campaign, pool: ThreadPoolExecutor
) -> None:
    step = Script({"t1": [ServerError(503, "unavailable", "down")]})
    batch = TenantSlice(tenants(3))
    with pytest.raises(SliceFailed) as failed:
        run_slice(calling(job, step), batch, onboard_tenant, pool, last_attempt=True)
    assert failed.value.retryable == {}
    assert [o.error_code for o in failed.value.outcomes] == ["unavailable", "", ""]
    changes = job.changes  # type: ignore[attr-defined]
    failures = [(c.tenant_id, c.status, c.error_code) for c in changes if c.status == "failed"]
    assert failures == [("t1", "failed", "unavailable")]


def test_one_tenant_raises_its_own_error(job: Campaign) -> None:
    step = Script({"t1": [ServerError(503, "unavailable", "down")]})
    batch = TenantSlice(tenants(1))
    with pytest.raises(ServerError):
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert batch.label == "t1"
    assert (
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)[0].status
        == "delivered"
    )


def not_found(tenant: str) -> NotFoundError:
    return NotFoundError(404, "not_found", f"credential not found ({tenant})")


def test_one_tenant_specific_404_fails_that_tenant_alone(job: Campaign) -> None:
    step = Script({"t2": [not_found("t2")]})
    batch = TenantSlice(tenants(30))
    with pytest.raises(SliceFailed) as failed:
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert job.stop_reason == ""
    assert sum(step.calls.values()) == 30, "every tenant was tried"
    failed_codes = {o.tenant_id: o.error_code for o in failed.value.outcomes if not o.ok}
    assert failed_codes == {"t2": "not_found"}


def test_three_404s_in_a_row_from_distinct_tenants_stop_the_batch(job: Campaign) -> None:
    step = Script({t: [not_found(t)] for t in ("t1", "t2", "t3")})
    batch = TenantSlice(tenants(6))
    with pytest.raises(SliceFailed) as failed:
        run_slice(
            calling(job, step), batch, onboard_tenant, None, last_attempt=False
        )  # in order, one at a time
    stop = job.connectors[0].stop
    assert "3 tenants in a row (t1, t2, t3)" in stop.detail
    assert job.stop_reason == stop.reason and stop.reason.startswith("Versori does not know")
    assert step.calls == {"t1": 1, "t2": 1, "t3": 1}
    codes = [o.error_code for o in failed.value.outcomes]
    assert codes == ["not_found"] * 3 + ["not_attempted"] * 3
    record = job.connectors[0].ledger.get("t4", job.connectors[0].profile.target_id)
    assert record is not None and record.error_code == "not_attempted"
    assert record.attempts == 0, "a tenant never tried counts no attempt"


def test_a_success_between_404s_keeps_the_batch_going(job: Campaign) -> None:
    step = Script({t: [not_found(t)] for t in ("t1", "t2", "t4", "t5")})
    batch = TenantSlice(tenants(6))
    with pytest.raises(SliceFailed):
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert job.stop_reason == ""
    assert len(step.calls) == 6


def test_the_same_tenant_twice_is_no_evidence() -> None:
    stop = BatchStop(after=3)
    for _ in range(5):
        stop.failed("t1", not_found("t1"))
    assert stop.reason == ""
    stop.failed("t2", not_found("t2"))
    stop.failed("t3", PermissionDeniedError(403, "forbidden", "no"))  # another class: anew
    assert stop.reason == ""
    stop.failed("t4", ServerError(503, "unavailable", "down"))  # transient: neither
    stop.failed("t5", PermissionDeniedError(403, "forbidden", "no"))
    stop.failed("t6", PermissionDeniedError(403, "forbidden", "no"))
    assert "3 tenants in a row (t3, t5, t6)" in stop.detail
    assert stop.reason.startswith("Versori refused the API key for the connector (403")


def test_a_stopped_batch_keeps_the_real_error_of_a_tenant_it_tried(job: Campaign) -> None:
    """A tenant waiting for its retry when the batch stops was attempted: it is recorded with
    its own error, not as not attempted."""
    step = Script(
        {
            "t1": [ServerError(503, "unavailable", "down")],
            **{t: [not_found(t)] for t in ["t2", "t3", "t4"]},
        }
    )
    batch = TenantSlice(tenants(5))
    with pytest.raises(SliceFailed) as first:
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert "t1" not in first.value.retryable, "the batch stopped: no retry for anyone"
    codes = {o.tenant_id: o.error_code for o in first.value.outcomes}
    assert codes == {
        "t1": "unavailable",
        "t2": "not_found",
        "t3": "not_found",
        "t4": "not_found",
        "t5": "not_attempted",
    }


def test_a_transient_failure_is_retried_until_the_batch_stops(job: Campaign) -> None:
    step = Script({"t1": [ServerError(503, "unavailable", "down")], "t2": [not_found("t2")]})
    batch = TenantSlice(tenants(3))
    with pytest.raises(SliceFailed) as first:
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert set(first.value.retryable) == {"t1"}
    outcomes = run_slice_outcomes(job, batch, step)
    assert outcomes == {"t1": "delivered", "t2": "failed", "t3": "delivered"}


def run_slice_outcomes(job: Campaign, batch: TenantSlice, step: Script) -> dict[str, str]:
    try:
        outcomes = run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    except SliceFailed as failed:
        outcomes = failed.outcomes
    return {o.tenant_id: o.status for o in outcomes}


def test_after_a_timeout_one_retry_at_most(job: Campaign) -> None:
    stalls: list[Exception] = [APITimeoutError("no answer within 2 s") for _ in range(5)]
    step = Script({"t1": stalls})
    batch = TenantSlice(tenants(1))
    with pytest.raises(APITimeoutError):
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    with pytest.raises(SliceFailed) as second:  # transient, but not tried again
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert second.value.retryable == {}
    assert step.calls == {"t1": 2}
    assert [o.error_code for o in second.value.outcomes] == ["timeout"]


def test_no_new_try_after_the_tenant_deadline(job: Campaign) -> None:
    job.rule = RetryRule(deadline=0.0)
    step = Script({"t1": [ServerError(503, "unavailable", "down")] * 3})
    batch = TenantSlice(tenants(2))
    with pytest.raises(SliceFailed) as failed:
        run_slice(calling(job, step), batch, onboard_tenant, None, last_attempt=False)
    assert failed.value.retryable == {}
    assert step.calls == {"t1": 1, "t2": 1}


def test_a_tenant_another_run_holds_is_waited_for_then_skipped_if_done(
    job: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs at once: a tenant the other run holds is not called; once it lets go, the
    tenant is looked at again and, delivered by the other run, skipped."""
    other = "other-run"
    cid = job.connectors[0].profile.target_id
    with job.connectors[0].ledger.run_lease(other):
        assert job.connectors[0].ledger.claim(other, [("t1", cid)]) == {("t1", cid)}
        polls: list[float] = []

        def let_go_after_a_poll(seconds: float) -> None:
            polls.append(seconds)
            record_delivered(job, "t1")
            job.connectors[0].ledger.release(other, [("t1", cid)])

        monkeypatch.setattr("onboarding.batch.tenant_slices.time.sleep", let_go_after_a_poll)
        step = Script({})
        outcomes = run_slice(
            calling(job, step), TenantSlice(tenants(3)), onboard_tenant, None, last_attempt=False
        )
    assert polls, "it waited for the claim"
    assert {o.tenant_id: o.status for o in outcomes} == {
        "t1": "skipped",
        "t2": "delivered",
        "t3": "delivered",
    }
    assert step.calls == {"t2": 1, "t3": 1}
    assert job.connectors[0].ledger.claim("third-run", [("t2", cid), ("t3", cid)]) == {
        ("t2", cid),
        ("t3", cid),
    }, "the run let go of its tenants once decided"


def test_a_tenant_held_by_a_live_run_past_the_wait_is_skipped_not_called(
    job: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = job.connectors[0].profile.target_id
    monkeypatch.setattr("onboarding.batch.tenant_slices.CLAIM_WAIT_SECONDS", 0.0)
    with job.connectors[0].ledger.run_lease("other-run"):
        job.connectors[0].ledger.claim("other-run", [("t1", cid)])
        step = Script({})
        outcomes = run_slice(
            calling(job, step), TenantSlice(tenants(2)), onboard_tenant, None, last_attempt=False
        )
    assert step.calls == {"t2": 1}
    assert outcomes[0].status == "skipped" and "another run" in outcomes[0].error_message


def test_a_dead_runs_claim_is_taken_over(job: Campaign) -> None:
    cid = job.connectors[0].profile.target_id
    job.connectors[0].ledger.claim("dead-run", [("t1", cid)])  # no lease: as after its lease lapsed
    step = Script({})
    outcomes = run_slice(
        calling(job, step), TenantSlice(tenants(1)), onboard_tenant, None, last_attempt=False
    )
    assert outcomes[0].status == "delivered" and step.calls == {"t1": 1}


def record_delivered(job: Campaign, tenant_id: str) -> None:
    from datetime import timedelta

    from onboarding.clock import utcnow

    now = utcnow()
    job.connectors[0].ledger.record_link(
        tenant_id=tenant_id,
        connector_id=job.connectors[0].profile.target_id,
        profile=job.connectors[0].profile.name,
        tenant_name=tenant_id,
        admin_email="a@x.com",
        url="https://x.example/authorize?state=s",
        state=f"state-{tenant_id}",
        created_at=now,
        expires_at=now + timedelta(hours=1),
        delivered_by="store",
    )


def test_a_step_that_returns_a_failed_outcome_fails_its_one_tenant_slice(
    job: Campaign,
) -> None:
    # A campaign's tenant comes back failed (one connector failed for good) without raising.
    def step(campaign: Campaign, tenant: Tenant, tries: Tries) -> TenantOutcome:
        return TenantOutcome(tenant.tenant_id, "failed", error_code="bad_url")

    with pytest.raises(SliceFailed) as failed:
        run_slice(job, TenantSlice(tenants(1)), step, None, last_attempt=False)
    assert failed.value.retryable == {}
    assert [o.error_code for o in failed.value.outcomes] == ["bad_url"]


# --- links handed to the ledger's writer (Campaign.defers_writes) ------------------------------


@pytest.fixture
def deferring(tmp_path: Path) -> Campaign:
    changes: list[StatusChange] = []
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    campaign = campaign_of(load_profile(PROFILE), ledger, on_status=changes.append)
    campaign.defer_writes = True
    campaign.changes = changes  # type: ignore[attr-defined]
    return campaign


def test_a_deferred_link_is_recorded_before_it_is_reported_counted_or_let_go(
    deferring: Campaign, pool: ThreadPoolExecutor
) -> None:
    from sqlalchemy import select

    from onboarding.ledger.schema import claims

    connector = deferring.connectors[0]
    ledger, target = connector.ledger, connector.profile.target_id
    reported: list[tuple[str, str]] = []

    def on_status(change: StatusChange) -> None:
        record = ledger.get(change.tenant_id, target)
        reported.append((change.tenant_id, record.status.value if record else "not recorded"))

    connector.on_status = on_status
    flush = ledger._links._flush
    claimed_while_written: list[bool] = []

    def flush_and_look(rows: list[dict[str, Any]]) -> None:
        with ledger.engine.connect() as conn:
            held = set(conn.execute(select(claims.c.tenant_id)).scalars())
        claimed_while_written.append(all(r["tenant_id"] in held for r in rows))
        flush(rows)

    ledger._links._flush = flush_and_look
    outcomes = run_slice(
        calling(deferring, Script({})), TenantSlice(tenants(12)), onboard_tenant, pool, False
    )
    assert [o.status for o in outcomes] == ["delivered"] * 12
    assert sorted(reported) == sorted((f"t{i}", "delivered") for i in range(1, 13))
    assert claimed_while_written and all(claimed_while_written), "claims held until written"
    with ledger.engine.connect() as conn:
        assert list(conn.execute(select(claims.c.tenant_id))) == [], "and let go after"


def test_a_deferred_link_the_ledger_could_not_record_is_tried_again_then_failed(
    deferring: Campaign, pool: ThreadPoolExecutor
) -> None:
    from onboarding.errors import LedgerUnavailableError

    connector = deferring.connectors[0]
    ledger = connector.ledger
    flush = ledger._links._flush
    # Refused when written: t2 in the first attempt only, t3 in every attempt (a group that
    # holds either fails as a whole, and the writer writes its rows again one by one).
    refusals = {"t2": 1, "t3": 99}

    def refusing(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if refusals.get(row["tenant_id"], 0) > 0:
                if len(rows) == 1:  # its own try: counted
                    refusals[row["tenant_id"]] -= 1
                raise LedgerUnavailableError(f"the ledger is gone ({row['tenant_id']})")
        flush(rows)

    ledger._links._flush = refusing
    versori = Script({})
    batch = TenantSlice(tenants(4))
    with pytest.raises(SliceFailed) as first:
        run_slice(calling(deferring, versori), batch, onboard_tenant, pool, last_attempt=False)
    assert set(first.value.retryable) == {"t2", "t3"}
    assert isinstance(first.value.retryable["t2"], LedgerUnavailableError)
    with pytest.raises(SliceFailed) as last:
        run_slice(calling(deferring, versori), batch, onboard_tenant, pool, last_attempt=True)
    by_tenant = {o.tenant_id: (o.status, o.error_code) for o in last.value.outcomes}
    assert by_tenant == {
        "t1": ("delivered", ""),
        "t2": ("delivered", ""),
        "t3": ("failed", "ledger_unavailable"),
        "t4": ("delivered", ""),
    }
    # A link that was never recorded is made again, as when recording it failed in the step.
    assert versori.calls == {"t1": 1, "t2": 2, "t3": 2, "t4": 1}
    changes = deferring.changes  # type: ignore[attr-defined]
    assert sorted((c.tenant_id, c.status) for c in changes) == [
        ("t1", "delivered"),
        ("t2", "delivered"),
        ("t3", "failed"),
        ("t4", "delivered"),
    ], "nothing reported for a link before it is recorded"


def test_only_a_campaign_that_only_stores_under_one_connector_defers(tmp_path: Path) -> None:
    from onboarding.batch.campaign import Campaign as CampaignType
    from onboarding.batch.delivery import Delivery

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    one = campaign_of(load_profile(PROFILE), ledger, defer_writes=True)
    assert one.defers_writes
    assert not campaign_of(load_profile(PROFILE), ledger, defer_writes=False).defers_writes
    emailing = campaign_of(load_profile(PROFILE), ledger, deliver=Delivery.EMAIL, defer_writes=True)
    assert not emailing.defers_writes, "an email needs its link recorded first"
    two = CampaignType([*one.connectors, *one.connectors], Delivery.STORE, defer_writes=True)
    assert not two.defers_writes
