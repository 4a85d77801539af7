"""flows/batching/slices.py: how a batch's tenants become task runs. `tenants_per_task`,
`tenant_threads`, `slice_up` and `outcomes_of` as plain functions; `run_batch` in flow runs on
the session's Prefect server, with a task of the test's that records what it is given: at most
`concurrency` slices run at once, the roster is read as slices free up (flat memory), outcomes
decided without a task pass through, a crashed slice fails only its own tenants, and an
interrupt submits nothing more. The batch stopping on a bad key: tests/flows/test_flow.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from flows.batching.slices import (
    MAX_SLICE_SIZE,
    ONE_TASK_PER_TENANT_MAX,
    SLICE_SIZE,
    SLICES_PER_BATCH,
    outcomes_of,
    run_batch,
    slice_up,
    tenant_threads,
    tenants_per_task,
)
from flows.reporting.summary import OutcomeCounts
from flows.running.in_process import INTERRUPTED
from onboarding.batch.campaign import Campaign
from onboarding.batch.delivery import Delivery
from onboarding.batch.outcomes import TenantOutcome
from onboarding.batch.tenant_slices import SliceFailed, TenantSlice
from onboarding.errors import ServerError
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger
from onboarding.settings import RetrySettings
from tests.support import campaign_of

PROFILE = Path(__file__).resolve().parents[2] / "examples" / "profile.yaml"

pytestmark = pytest.mark.timeout(180)


def tenant(n: int) -> Tenant:
    return Tenant(tenant_id=f"t{n:03d}", name=f"T{n}", admin_email=f"a{n}@x.com")


def ids(tenants: list[Tenant]) -> list[str]:
    return [t.tenant_id for t in tenants]


# --- sizes and threads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "asked", "size"),
    [
        (1, None, 1),
        (ONE_TASK_PER_TENANT_MAX, None, 1),
        (ONE_TASK_PER_TENANT_MAX + 1, None, SLICE_SIZE),
        (SLICE_SIZE * SLICES_PER_BATCH, None, SLICE_SIZE),
        (2_000, None, 250),  # about SLICES_PER_BATCH slices
        (2_001, None, 251),
        (MAX_SLICE_SIZE * SLICES_PER_BATCH, None, MAX_SLICE_SIZE),
        (50_000, None, MAX_SLICE_SIZE),
        (10, 0, 1),  # 0 is "automatic", as None
        (10, 7, 7),
        (50_000, 1, 1),
    ],
)
def test_tenants_per_task_is_asked_or_one_for_small_batches_and_slices_for_large(
    total: int, asked: int | None, size: int
) -> None:
    assert tenants_per_task(total, asked) == size


@pytest.mark.parametrize(
    ("deliver", "threads"), [(Delivery.STORE, 16), (Delivery.EMAIL, 8), (Delivery.BOTH, 8)]
)
def test_tenant_threads_double_only_when_no_email_is_sent(deliver: Delivery, threads: int) -> None:
    assert tenant_threads(Campaign([], deliver), 8) == threads


def test_a_campaign_that_hands_its_links_over_needs_no_more_threads_than_calls(
    tmp_path: Path,
) -> None:
    """Its threads never wait for a commit (Campaign.defers_writes): one per call in flight;
    more would only wait for the client's call slots."""
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        campaign = campaign_of(load_profile(PROFILE), ledger, defer_writes=True)
        assert campaign.defers_writes
        assert tenant_threads(campaign, 8) == 8


# --- slice_up ----------------------------------------------------------------------------------


def test_slices_keep_roster_order_and_positions() -> None:
    got = list(slice_up([tenant(n) for n in range(1, 8)], 3))
    assert all(isinstance(s, TenantSlice) for s in got)
    slices = [s for s in got if isinstance(s, TenantSlice)]
    assert [ids(s.tenants) for s in slices] == [
        ["t001", "t002", "t003"],
        ["t004", "t005", "t006"],
        ["t007"],
    ]
    assert [(s.first, s.last) for s in slices] == [(1, 3), (4, 6), (7, 7)]
    assert [s.label for s in slices] == ["tenants 1-3", "tenants 4-6", "t007"]


def test_outcomes_pass_through_as_met_and_still_count_as_roster_positions() -> None:
    skipped = TenantOutcome("t002", "skipped")
    work: list[Tenant | TenantOutcome] = [tenant(1), skipped, tenant(3), tenant(4), tenant(5)]
    got = list(slice_up(work, 2))
    assert got[0] is skipped, "an outcome is not held back until its slice fills"
    slices = [s for s in got[1:] if isinstance(s, TenantSlice)]
    assert [ids(s.tenants) for s in slices] == [["t001", "t003"], ["t004", "t005"]]
    assert [(s.first, s.last) for s in slices] == [(1, 3), (4, 5)]
    assert slices[0].label == "tenants 1-3"


def test_nothing_or_only_outcomes_make_no_slice() -> None:
    assert list(slice_up([], 5)) == []
    done = [TenantOutcome("t1", "skipped"), TenantOutcome("t2", "connected")]
    assert list(slice_up(done, 5)) == done


def test_slice_up_reads_the_roster_only_as_far_as_the_slice_it_yields() -> None:
    pulled: list[int] = []

    def roster() -> Iterator[Tenant]:
        for n in range(1, 1_000_001):
            pulled.append(n)
            yield tenant(n)

    slices = slice_up(roster(), 100)
    first = next(slices)
    assert isinstance(first, TenantSlice) and len(first.tenants) == 100
    assert len(pulled) == 100


# --- outcomes_of -------------------------------------------------------------------------------


def test_a_slices_own_list_of_outcomes_is_taken_as_it_is() -> None:
    outcomes = [TenantOutcome("t001", "delivered"), TenantOutcome("t002", "failed")]
    assert outcomes_of(TenantSlice([tenant(1), tenant(2)]), outcomes) is outcomes


def test_a_slice_failed_gives_its_outcomes() -> None:
    outcomes = [TenantOutcome("t001", "delivered"), TenantOutcome("t002", "failed")]
    failed = SliceFailed("tenants 1-2", outcomes, {})
    assert outcomes_of(TenantSlice([tenant(1), tenant(2)]), failed) == outcomes


def test_another_error_fails_every_tenant_not_yet_decided_with_it() -> None:
    batch = TenantSlice([tenant(1), tenant(2), tenant(3)])
    batch.done["t002"] = TenantOutcome("t002", "delivered")
    crashed = outcomes_of(batch, RuntimeError("worker lost"))
    assert [(o.tenant_id, o.status, o.error_code) for o in crashed] == [
        ("t001", "failed", "internal_error"),
        ("t002", "delivered", ""),
        ("t003", "failed", "internal_error"),
    ]
    assert crashed[0].error_message == "RuntimeError", "an unknown error's text is not shown"
    own = outcomes_of(TenantSlice([tenant(1)]), ServerError(503, "unavailable", "down"))
    assert [(o.status, o.error_code) for o in own] == [("failed", "unavailable")]
    odd = outcomes_of(TenantSlice([tenant(1)]), "not a result")
    assert [(o.status, o.error_code, o.error_message) for o in odd] == [
        ("failed", "internal_error", "RuntimeError")
    ]


# --- run_batch, in flow runs on the session's server -------------------------------------------


class Watch:
    """What the test's task and the batch show: slices running at once, tenants pulled from
    the roster and counted done, and the pool a slice is given."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.slices: list[list[str]] = []
        self.pools: set[object] = set()
        self.pulled = 0
        self.collected = 0
        self.ahead: list[int] = []  # tenants pulled but not yet counted, at each pull
        self.finished = False
        self.crash: set[str] = set()
        self.interrupt_after = 0

    # The `progress` run_batch is given: counts what it collected.
    def advance(self, failed: int = 0, count: int = 1) -> None:
        self.collected += count

    def finish(self) -> None:
        self.finished = True

    def roster(self, n: int) -> Iterator[Tenant | TenantOutcome]:
        for i in range(1, n + 1):
            self.ahead.append(self.pulled - self.collected)
            self.pulled += 1
            yield tenant(i)


WATCH: dict[str, Watch] = {}  # the one the running test looks at (the task gets it by name)


@task(name="test-batching-slice", persist_result=False, retries=0)
def slice_task(
    tenant_slice: TenantSlice, campaign: Campaign, pool: ThreadPoolExecutor | None = None
) -> list[TenantOutcome]:
    watch = WATCH["now"]
    with watch.lock:
        watch.running += 1
        watch.most_running = max(watch.most_running, watch.running)
        watch.slices.append(ids(tenant_slice.tenants))
        watch.pools.add(pool)
        if watch.interrupt_after and len(watch.slices) >= watch.interrupt_after:
            INTERRUPTED.set()
    try:
        time.sleep(watch.seconds)
        if watch.crash & set(ids(tenant_slice.tenants)):
            raise RuntimeError("the slice crashed")
        return [TenantOutcome(t.tenant_id, "delivered") for t in tenant_slice.tenants]
    finally:
        with watch.lock:
            watch.running -= 1


def run(
    watch: Watch, work: Iterator[Tenant | TenantOutcome], total: int, **kw: Any
) -> OutcomeCounts:
    """run_batch over `work` in a flow run of its own (the roster is the flow's closure, not a
    parameter: a generator, read as the batch goes); the batch's tally."""

    @flow(name="test-batching", persist_result=False)
    def batch() -> OutcomeCounts:
        return run_batch(
            Campaign([], Delivery.STORE),
            slice_task,
            work,
            total,
            kw.get("concurrency", 2),
            kw.get("per_task"),
            progress=watch,  # type: ignore[arg-type]
            retry=RetrySettings(),
        )

    WATCH["now"] = watch
    try:
        return batch()
    finally:
        WATCH.pop("now", None)
        INTERRUPTED.clear()


@pytest.mark.usefixtures("prefect_harness")
def test_one_tenant_a_task_at_most_concurrency_at_once_reading_the_roster_as_they_finish() -> None:
    watch = Watch()
    tally = run(watch, watch.roster(12), 12, concurrency=2)
    assert tally.by_status == {"delivered": 12}
    assert sorted(watch.slices) == [[f"t{n:03d}"] for n in range(1, 13)]
    assert watch.most_running == 2, "concurrency 2: two task runs at once, no more"
    # Slices are submitted ahead only up to twice the task runs at once: the roster is not
    # read ahead of what is in flight, however long it is.
    assert max(watch.ahead) <= 2 * 2
    assert watch.collected == 12 and watch.finished
    assert watch.pools == {None}, "one tenant a task: no shared tenant pool"


@pytest.mark.usefixtures("prefect_harness")
def test_slices_of_several_tenants_share_one_pool_and_run_a_bounded_number_at_once() -> None:
    watch = Watch()
    tally = run(watch, watch.roster(43), 43, concurrency=4, per_task=5)
    assert tally.total == 43
    assert sorted(watch.slices) == [
        [f"t{n:03d}" for n in range(first, min(first + 5, 44))] for first in range(1, 44, 5)
    ]
    # concurrency 4, 5 tenants a slice: max(2, ceil(2 * 4 / 5)) = 2 slices at once.
    assert watch.most_running == 2
    # Four slices in flight, and the next one being read (4 of its 5 tenants).
    assert max(watch.ahead) <= 2 * 2 * 5 + 4
    (pool,) = watch.pools
    assert isinstance(pool, ThreadPoolExecutor)
    assert pool._max_workers == 8, "links only stored: twice the concurrency in threads"


@pytest.mark.usefixtures("prefect_harness")
def test_outcomes_decided_before_the_batch_are_counted_without_a_task_run() -> None:
    watch = Watch(seconds=0.0)
    work: list[Tenant | TenantOutcome] = [
        TenantOutcome("t000", "skipped", error_message="already delivered"),
        tenant(1),
        TenantOutcome("t002", "connected"),
    ]
    tally = run(watch, iter(work), 3, concurrency=2)
    assert tally.by_status == {"skipped": 1, "delivered": 1, "connected": 1}
    assert watch.slices == [["t001"]]
    assert tally.skipped_why == {"already delivered": 1}


@pytest.mark.usefixtures("prefect_harness")
def test_a_crashed_task_run_fails_its_own_tenants_only() -> None:
    watch = Watch(seconds=0.0)
    watch.crash = {"t003"}
    tally = run(watch, watch.roster(8), 8, concurrency=2, per_task=3)
    assert tally.by_status == {"delivered": 5, "failed": 3}
    failed = [r["tenant_id"] for r in tally.rows() if r["status"] == "failed"]
    assert failed == ["t001", "t002", "t003"]
    assert {r["error_code"] for r in tally.rows() if r["status"] == "failed"} == {"internal_error"}


@pytest.mark.usefixtures("prefect_harness")
def test_after_an_interrupt_no_new_slice_is_submitted_and_the_rest_is_left_alone() -> None:
    watch = Watch(seconds=0.05)
    watch.interrupt_after = 3
    tally = run(watch, watch.roster(40), 40, concurrency=2)
    assert INTERRUPTED.is_set() is False, "cleared after the test"
    started = len(watch.slices)
    # The third task run set it: what was in flight then (at most 2 x 2) still finishes.
    assert 3 <= started <= 3 + 2 * 2
    assert tally.total == started, "untried tenants get no outcome: the ledger keeps their rows"
    assert watch.pulled <= started + 1, "the roster is not read further"
