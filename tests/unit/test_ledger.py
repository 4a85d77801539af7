"""The ledger on SQLite and PostgreSQL (see the `ledger` fixture in conftest.py)."""

from __future__ import annotations

import threading
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from onboarding.clock import utcnow
from onboarding.errors import InputError
from onboarding.ledger import Ledger, Record, Status, records

pytestmark = pytest.mark.timeout(120)

CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
OTHER = "01M8F12B95S4BX0QFB3TPDWZ0Z"
NOW = datetime(2030, 5, 17, 12, 30, 15, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)


def link(
    ledger: Ledger,
    tenant_id: str,
    *,
    connector_id: str = CONNECTOR,
    created_at: datetime = NOW,
    ttl: timedelta = 72 * HOUR,
    **overrides: Any,
) -> None:
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "connector_id": connector_id,
        "profile": "zendesk-demo",
        "tenant_name": f"Tenant {tenant_id}",
        "admin_email": f"admin@{tenant_id}.example.com",
        "url": f"https://login.example.com/authorize?state=state-{tenant_id}",
        "state": f"state-{tenant_id}",
        "created_at": created_at,
        "expires_at": created_at + ttl,
        "run_id": "run-1",
    }
    values.update(overrides)
    ledger.record_link(**values)


def fail(ledger: Ledger, tenant_id: str, *, connector_id: str = CONNECTOR, **kw: Any) -> None:
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "connector_id": connector_id,
        "profile": "zendesk-demo",
        "tenant_name": f"Tenant {tenant_id}",
        "admin_email": f"admin@{tenant_id}.example.com",
        "error_code": "server_error",
        "error_message": "HTTP 503 unavailable: try later",
        "run_id": "run-2",
    }
    values.update(kw)
    ledger.record_failure(**values)


def get(ledger: Ledger, tenant_id: str, connector_id: str = CONNECTOR) -> Record:
    record = ledger.get(tenant_id, connector_id)
    assert record is not None
    return record


def set_status(ledger: Ledger, tenant_id: str, status: Status) -> None:
    # Nothing in the Ledger writes `connected` (the app's callback does); write it directly.
    with ledger.engine.begin() as conn:
        conn.execute(
            records.update().where(records.c.tenant_id == tenant_id).values(status=status.value)
        )


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# --- writes and reads ------------------------------------------------------------------------


def test_record_link_then_get(ledger: Ledger) -> None:
    before = datetime.now(UTC)
    link(ledger, "t1")
    record = get(ledger, "t1")
    assert record == Record(
        tenant_id="t1",
        connector_id=CONNECTOR,
        profile="zendesk-demo",
        tenant_name="Tenant t1",
        admin_email="admin@t1.example.com",
        status=Status.LINK_CREATED,
        url="https://login.example.com/authorize?state=state-t1",
        state="state-t1",
        created_at=NOW,
        expires_at=NOW + 72 * HOUR,
        delivered_at=None,
        connected_at=None,
        delivery_channel=None,
        attempts=1,
        error_code=None,
        error_message=None,
        run_id="run-1",
        updated_at=record.updated_at,
    )
    assert isinstance(record.status, Status)
    for value in (record.created_at, record.expires_at, record.updated_at):
        assert_utc(value)
    assert before - timedelta(seconds=5) <= record.updated_at <= datetime.now(UTC) + HOUR


def test_get_unknown(ledger: Ledger) -> None:
    link(ledger, "t1")
    assert ledger.get("t2", CONNECTOR) is None
    assert ledger.get("t1", OTHER) is None


def test_times_with_another_offset_keep_their_instant(ledger: Ledger) -> None:
    paris = timezone(timedelta(hours=2))
    created = NOW.astimezone(paris)
    link(ledger, "t1", created_at=created, ttl=HOUR)
    ledger.mark_delivered("t1", CONNECTOR, channel="store", at=created)
    record = get(ledger, "t1")
    assert record.created_at == NOW
    assert record.expires_at == NOW + HOUR
    assert_utc(record.created_at)
    # `now` in another offset compares as the same instant too.
    minute = timedelta(minutes=1)
    assert ledger.ids_needing_nothing(CONNECTOR, now=(NOW + 59 * minute).astimezone(paris)) == {
        "t1"
    }
    assert ledger.ids_needing_nothing(CONNECTOR, now=(NOW + 61 * minute).astimezone(paris)) == set()
    assert ledger.count_past_expiry(CONNECTOR, (NOW + 59 * minute).astimezone(paris)) == 0
    assert ledger.count_past_expiry(CONNECTOR, (NOW + 61 * minute).astimezone(paris)) == 1
    ledger.mark_delivered("t1", CONNECTOR, channel="email", at=(NOW + minute).astimezone(paris))
    assert get(ledger, "t1").delivered_at == NOW + minute
    assert get(ledger, "t1").last_sent_at == NOW + minute


def test_attempts_count_across_links_and_failures(ledger: Ledger) -> None:
    link(ledger, "t1")
    assert get(ledger, "t1").attempts == 1
    fail(ledger, "t1")
    assert get(ledger, "t1").attempts == 2
    link(ledger, "t1", created_at=NOW + HOUR)
    assert get(ledger, "t1").attempts == 3
    fail(ledger, "t1", count_attempt=False)
    assert get(ledger, "t1").attempts == 3
    fail(ledger, "t1")
    assert get(ledger, "t1").attempts == 4


def test_record_failure_keeps_the_previous_link(ledger: Ledger) -> None:
    link(ledger, "t1")
    fail(ledger, "t1", error_code="x" * 150, error_message="boom " * 100, tenant_name="Renamed")
    record = get(ledger, "t1")
    assert record.status is Status.FAILED
    assert record.url == "https://login.example.com/authorize?state=state-t1"
    assert record.state == "state-t1"
    assert record.created_at == NOW
    assert record.expires_at == NOW + 72 * HOUR
    assert record.error_code == "x" * 100
    assert record.error_message == "boom " * 100
    assert record.tenant_name == "Renamed"
    assert record.run_id == "run-2"


def test_first_failure_creates_the_row(ledger: Ledger) -> None:
    fail(ledger, "t1")
    fail(ledger, "t2", count_attempt=False)
    one, two = get(ledger, "t1"), get(ledger, "t2")
    assert (one.status, one.attempts, one.url, one.state) == (Status.FAILED, 1, None, None)
    assert (two.status, two.attempts) == (Status.FAILED, 0)
    assert one.error_code == "server_error"
    assert one.created_at is None


def test_a_new_link_clears_the_error_and_the_delivery(ledger: Ledger) -> None:
    link(ledger, "t1")
    ledger.mark_delivered("t1", CONNECTOR, channel="email", at=NOW + HOUR)
    fail(ledger, "t1")
    link(ledger, "t1", created_at=NOW + 2 * HOUR, url="https://x/?state=s2", state="s2")
    record = get(ledger, "t1")
    assert record.status is Status.LINK_CREATED
    assert (record.error_code, record.error_message) == (None, None)
    assert (record.delivered_at, record.delivery_channel) == (None, None)
    assert (record.url, record.state, record.created_at) == (
        "https://x/?state=s2",
        "s2",
        NOW + 2 * HOUR,
    )
    assert ledger.find_by_state("state-t1") is None


def test_mark_delivered(ledger: Ledger) -> None:
    link(ledger, "t1")
    link(ledger, "t2")
    ledger.mark_delivered("t1", CONNECTOR, channel="store", at=NOW + HOUR)
    before = datetime.now(UTC) - timedelta(seconds=5)
    ledger.mark_delivered("t2", CONNECTOR, channel="email")
    one, two = get(ledger, "t1"), get(ledger, "t2")
    assert (one.status, one.delivery_channel, one.delivered_at) == (
        Status.DELIVERED,
        "store",
        NOW + HOUR,
    )
    assert_utc(one.delivered_at)
    assert (two.status, two.delivery_channel) == (Status.DELIVERED, "email")
    assert two.delivered_at is not None and two.delivered_at >= before
    assert one.url is not None and one.attempts == 1
    ledger.mark_delivered("nobody", CONNECTOR, channel="store")
    assert ledger.get("nobody", CONNECTOR) is None


def test_find_by_state(ledger: Ledger) -> None:
    link(ledger, "t1")
    link(ledger, "t2", connector_id=OTHER)
    found = ledger.find_by_state("state-t2")
    assert found is not None
    assert (found.tenant_id, found.connector_id) == ("t2", OTHER)
    assert ledger.find_by_state("state-t1") == get(ledger, "t1")
    assert ledger.find_by_state("no-such-state") is None
    assert ledger.find_by_state("") is None


# --- queries ---------------------------------------------------------------------------------


@pytest.fixture
def mixed(ledger: Ledger) -> Ledger:
    """Rows in every situation, for CONNECTOR unless named otherwise."""
    link(ledger, "live")  # expires NOW + 72h
    link(ledger, "expired", created_at=NOW - 100 * HOUR)  # expired at NOW - 28h
    link(ledger, "delivered")
    ledger.mark_delivered("delivered", CONNECTOR, channel="email")
    link(ledger, "reminded")
    set_status(ledger, "reminded", Status.REMINDED)
    link(ledger, "stale-delivered", created_at=NOW - 100 * HOUR)
    ledger.mark_delivered("stale-delivered", CONNECTOR, channel="email")
    link(ledger, "failed")
    fail(ledger, "failed")  # keeps its unexpired link, but failed is not live
    fail(ledger, "never-linked")
    link(ledger, "connected", created_at=NOW - 100 * HOUR)
    set_status(ledger, "connected", Status.CONNECTED)  # live even though its link expired
    link(ledger, "marked-expired")
    set_status(ledger, "marked-expired", Status.EXPIRED)
    link(ledger, "other", connector_id=OTHER)
    return ledger


def test_live_tenant_ids(mixed: Ledger) -> None:
    # "live" holds an unexpired link that was never delivered: the next run must deliver it.
    assert mixed.ids_needing_nothing(CONNECTOR, now=NOW) == {
        "delivered",
        "reminded",
        "connected",
    }
    mixed.mark_delivered("other", OTHER, channel="store")
    assert mixed.ids_needing_nothing(OTHER, now=NOW) == {"other"}
    assert mixed.ids_needing_nothing("01M8F12B95S4BX0QFB3TPDWZ00", now=NOW) == set()
    # At the expiry instant a link is no longer live.
    assert mixed.ids_needing_nothing(CONNECTOR, now=NOW + 72 * HOUR) == {"connected"}
    # Without `now`: the real clock, long before NOW (2030), so every link is still live.
    assert mixed.ids_needing_nothing(CONNECTOR) == {
        "delivered",
        "reminded",
        "stale-delivered",
        "connected",
    }


def test_counts_by_status(mixed: Ledger) -> None:
    assert mixed.counts_by_status(CONNECTOR) == {
        "link_created": 2,
        "delivered": 2,
        "reminded": 1,
        "failed": 2,
        "connected": 1,
        "expired": 1,
    }
    assert mixed.counts_by_status(OTHER) == {"link_created": 1}
    assert mixed.counts_by_status() == {
        "link_created": 3,
        "delivered": 2,
        "reminded": 1,
        "failed": 2,
        "connected": 1,
        "expired": 1,
    }


def test_counts_by_status_empty(ledger: Ledger) -> None:
    assert ledger.counts_by_status() == {}
    assert ledger.count_past_expiry(None, NOW) == 0
    assert list(ledger.iter_records()) == []
    assert ledger.ids_needing_nothing(CONNECTOR) == set()


def test_count_past_expiry(mixed: Ledger) -> None:
    # expired + stale-delivered; not failed, connected, or the `expired` status.
    assert mixed.count_past_expiry(CONNECTOR, NOW) == 2
    assert mixed.count_past_expiry(None, NOW) == 2
    assert mixed.count_past_expiry(OTHER, NOW) == 0
    # At NOW + 72h the fresh links' time is up too: live, delivered, reminded; and other's.
    assert mixed.count_past_expiry(CONNECTOR, NOW + 72 * HOUR) == 5
    assert mixed.count_past_expiry(None, NOW + 72 * HOUR) == 6
    assert mixed.count_past_expiry(None, NOW - 1000 * HOUR) == 0


def test_iter_records_order_and_filter(ledger: Ledger) -> None:
    for tenant_id in ["t3", "t10", "a", "t1", "t2"]:
        link(ledger, tenant_id)
        link(ledger, tenant_id, connector_id=OTHER)
    everything = [(r.tenant_id, r.connector_id) for r in ledger.iter_records()]
    expected = sorted(["a", "t1", "t10", "t2", "t3"])
    # A tenant's rows together (a campaign's export reads tenant by tenant), connectors sorted.
    assert everything == [(t, c) for t in expected for c in sorted([CONNECTOR, OTHER])]
    only = list(ledger.iter_records(OTHER))
    assert [r.tenant_id for r in only] == expected
    assert all(r.connector_id == OTHER and isinstance(r, Record) for r in only)
    both = list(ledger.iter_records([OTHER, CONNECTOR]))
    assert len(both) == 10 and list(ledger.iter_records(["nobody"])) == []


def test_connection_coverage_counts_tenants_connected_to_all_some_none(ledger: Ledger) -> None:
    for tenant_id in ["full", "part", "none", "one-only"]:
        link(ledger, tenant_id)
    for tenant_id in ["full", "part", "none"]:
        link(ledger, tenant_id, connector_id=OTHER)
    for tenant_id, connector_id in [("full", CONNECTOR), ("full", OTHER), ("part", OTHER)]:
        ledger.mark_connected(tenant_id, connector_id, connection_id=None, at=NOW)
    assert ledger.connection_coverage([CONNECTOR, OTHER]) == {"fully": 1, "partly": 1, "none": 2}
    assert ledger.connection_coverage([CONNECTOR]) == {"fully": 1, "partly": 0, "none": 3}
    assert ledger.connection_coverage(["nobody"]) == {"fully": 0, "partly": 0, "none": 0}
    slack = "01M8F12B95S4BX0QFB3TPDWZ0S"
    link(ledger, "full", connector_id=slack, profile="slack-demo")
    recorded = ledger.connector_profiles()
    assert recorded == {CONNECTOR: "zendesk-demo", slack: "slack-demo", OTHER: "zendesk-demo"}
    assert list(recorded) == sorted(recorded), "in id order, as status shows them"


def test_iter_records_streams_many(ledger: Ledger) -> None:
    """More rows than one yield_per batch (1000)."""
    row = {
        "connector_id": CONNECTOR,
        "profile": "p",
        "status": Status.LINK_CREATED.value,
        "updated_at": NOW,
        "attempts": 1,
    }
    with ledger.engine.begin() as conn:  # one statement: 1500 upserts would be slow
        conn.execute(records.insert(), [{**row, "tenant_id": f"t{n:04d}"} for n in range(1500)])
    ids = [r.tenant_id for r in ledger.iter_records(CONNECTOR)]
    assert ids == [f"t{n:04d}" for n in range(1500)]


def test_reopening_keeps_the_rows(ledger_url: str) -> None:
    first = Ledger(ledger_url)
    try:
        link(first, "t1")
    finally:
        first.close()
    second = Ledger(ledger_url)  # create_all again: must not fail nor wipe
    try:
        assert get(second, "t1").attempts == 1
    finally:
        second.close()


def test_concurrent_record_link(ledger: Ledger) -> None:
    threads, per_thread = 8, 50
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        start.wait()
        for n in range(per_thread):
            link(ledger, f"w{worker}-t{n:02d}")
            link(ledger, f"shared-{n:02d}", run_id=f"run-{worker}")

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, w) for w in range(threads)]:
            future.result()  # re-raises, e.g. "database is locked"
    rows = list(ledger.iter_records(CONNECTOR))
    assert len(rows) == threads * per_thread + per_thread
    shared = [r for r in rows if r.tenant_id.startswith("shared-")]
    assert len(shared) == per_thread
    assert {r.attempts for r in shared} == {threads}  # no lost update
    own = [r for r in rows if not r.tenant_id.startswith("shared-")]
    assert {r.attempts for r in own} == {1}
    assert ledger.counts_by_status(CONNECTOR) == {"link_created": threads * per_thread + per_thread}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "nosuchdb://admin:s3cr3t-pw@db.example.com/onboarding",
        "postgresql+nosuchdriver://admin:s3cr3t-pw@db.example.com/onboarding",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(InputError) as info:
        Ledger(url)
    message = str(info.value)
    assert "ONBOARD_DB_URL" in message
    assert "s3cr3t-pw" not in message
    if "admin" in url:
        assert "admin:***@db.example.com" in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://admin:s3cr3t-pw@127.0.0.1:1/onboarding",
        # libpq refuses an unknown option before connecting: still the URL's fault.
        "postgresql+psycopg://admin:s3cr3t-pw@127.0.0.1:1/onboarding?no_such_option=1",
    ],
)
def test_unreachable_postgres(url: str) -> None:
    with pytest.raises(InputError) as info:
        Ledger(url)
    message = str(info.value)
    assert message.startswith(
        "cannot open the ledger at postgresql+psycopg://admin:***@127.0.0.1:1/"
    )
    assert "check ONBOARD_DB_URL" in message
    assert "s3cr3t-pw" not in message


def test_sqlite_in_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(
        InputError, match=r"cannot open the ledger at sqlite:///.*check ONBOARD_DB_URL"
    ):
        Ledger(f"sqlite:///{tmp_path}/no/such/folder/ledger.db")


def test_a_failing_statement_does_not_show_the_link(ledger: Ledger) -> None:
    state = uuid.uuid4().hex  # not in this file's source, which a traceback quotes
    url = f"https://login.example.com/authorize?state={state}"
    with pytest.raises(IntegrityError) as info:
        link(ledger, "t1", profile=None, url=url, state=state)  # NOT NULL violated
    shown = "".join(traceback.format_exception(info.value))  # with the driver's error
    assert state not in shown
    assert state not in repr(info.value)
    assert "hidden" in str(info.value)
    # The ledger still works afterwards.
    link(ledger, "t1")
    assert get(ledger, "t1").attempts == 1


def test_chunk_summaries_are_kept_per_batch_and_forgotten(ledger: Ledger) -> None:
    summary = {"by_status": {"delivered": 2}, "errors": {}, "failed": 0, "outcomes": []}
    ledger.record_chunk("b1", 0, "run-a", summary)
    ledger.record_chunk("b1", 0, "run-b", {**summary, "failed": 1})  # a re-run replaces it
    ledger.record_chunk("b2", 3, None, summary)
    assert ledger.chunk_summary("b1", 0) == {**summary, "failed": 1}
    assert ledger.chunk_summary("b1", 1) is None
    ledger.forget_batch("b1")
    assert ledger.chunk_summary("b1", 0) is None and ledger.chunk_summary("b2", 3) == summary
    assert ledger.forget_chunks_before(utcnow() - timedelta(days=1)) == 0
    assert ledger.forget_chunks_before(utcnow() + timedelta(seconds=1)) == 1
    assert ledger.chunk_summary("b2", 3) is None


def test_live_tenant_ids_among_a_chunk_of_more_ids_than_one_query_takes(ledger: Ledger) -> None:
    for n in (5, 1500):
        link(ledger, f"t{n}")
        ledger.mark_delivered(f"t{n}", CONNECTOR, channel="store")
    among = [f"t{n}" for n in range(2000)]
    assert ledger.ids_needing_nothing(CONNECTOR, only_ids=among) == {"t5", "t1500"}
    assert ledger.ids_needing_nothing(CONNECTOR, only_ids=["t6"]) == set()


def test_group_commit_writes_each_row_once_and_fails_only_the_bad_one() -> None:
    import threading
    import time

    from onboarding.ledger.group_commit import GroupCommit

    committed: list[str] = []
    groups: list[int] = []

    def flush(rows: list[dict[str, Any]]) -> None:
        if any(r["tenant_id"] == "bad" for r in rows):
            raise ValueError("constraint")
        time.sleep(0.002)  # a commit takes a moment, so callers pile up behind it
        groups.append(len(rows))
        committed.extend(r["tenant_id"] for r in rows)

    writer = GroupCommit(flush)
    errors: list[BaseException] = []

    def caller(n: int) -> None:
        for i in range(40):
            tenant = "bad" if (n, i) == (3, 7) else f"t{n}-{i}"
            try:
                writer.write({"tenant_id": tenant, "connector_id": "c"})
            except ValueError as err:
                errors.append(err)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(committed) == sorted(
        f"t{n}-{i}" for n in range(16) for i in range(40) if (n, i) != (3, 7)
    )
    assert len(errors) == 1, "only the bad row's caller fails"
    assert max(groups) > 1, "rows that arrive together are committed together"


def test_concurrent_links_all_land_once(ledger: Ledger) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        link(ledger, f"c{i:03d}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(200)))
    records = list(ledger.iter_records())
    assert len(records) == 200 and {r.attempts for r in records} == {1}
    assert {r.state for r in records} == {f"state-c{i:03d}" for i in range(200)}


def test_links_handed_over_together_are_committed_together(ledger: Ledger) -> None:
    """The writer commits the links it was handed in groups, one transaction each: record_link's
    statements take a group (an executemany) on both databases. They once carried an IN list
    SQLAlchemy refuses in an executemany, so every group failed and was written again row by
    row, a transaction each."""
    from sqlalchemy import event

    commits: list[int] = []
    event.listen(ledger.engine, "commit", lambda conn: commits.append(1))
    now = utcnow()
    written = [
        ledger.submit_link(
            tenant_id=f"g{i:02d}",
            connector_id=CONNECTOR,
            profile="zendesk",
            tenant_name=f"G{i}",
            admin_email=f"a{i}@example.com",
            url=f"https://login.example.com/authorize?state=state-g{i:02d}",
            state=f"state-g{i:02d}",
            created_at=now,
            expires_at=now + timedelta(days=7),
            delivered_by="store",
        )
        for i in range(40)
    ]
    for w in written:
        w.wait()
    records = [r for r in ledger.iter_records(CONNECTOR) if r.tenant_id.startswith("g")]
    assert len(records) == 40 and {r.attempts for r in records} == {1}
    assert {r.status for r in records} == {Status.DELIVERED}
    assert len(commits) <= 4, f"{len(commits)} transactions for 40 links handed over at once"


def test_a_link_is_reported_only_once_committed_and_never_when_it_failed(ledger: Ledger) -> None:
    seen: list[str] = []
    now = utcnow()

    def submit(tenant_id: str, profile: str | None) -> Any:
        def then() -> None:  # runs in the writer's thread, after the commit
            record = ledger.get(tenant_id, CONNECTOR)
            seen.append(f"{tenant_id}:{record.status.value if record else 'missing'}")

        return ledger.submit_link(
            tenant_id=tenant_id,
            connector_id=CONNECTOR,
            profile=profile,  # type: ignore[arg-type]  # None: a NOT NULL refused
            tenant_name="T",
            admin_email="a@example.com",
            url=f"https://login.example.com/authorize?state=state-{tenant_id}",
            state=f"state-{tenant_id}",
            created_at=now,
            expires_at=now + timedelta(days=7),
            then=then,
        )

    good, bad = submit("ok", "zendesk"), submit("bad", None)
    good.wait()
    with pytest.raises(IntegrityError):
        bad.wait()
    assert seen == ["ok:link_created"]
    assert ledger.get("bad", CONNECTOR) is None


# --- the writer itself (GroupCommit), with a flush of the test's ------------------------------


def test_submit_returns_at_once_and_a_waiter_is_not_kept_lingering() -> None:
    import time
    from functools import partial

    from onboarding.ledger.group_commit import GroupCommit

    groups: list[list[str]] = []
    done: list[int] = []
    writer = GroupCommit(lambda rows: groups.append([r["tenant_id"] for r in rows]), linger=30)
    handed = [
        writer.submit({"tenant_id": f"t{i}", "connector_id": "c"}, then=partial(done.append, i))
        for i in range(5)
    ]
    assert groups == [] and not any(w.done.is_set() for w in handed), "nothing waited for it"
    started = time.monotonic()
    handed[2].wait()  # someone waits: what is there goes now, not after the 30 s linger
    assert time.monotonic() - started < 5
    assert groups == [["t0", "t1", "t2", "t3", "t4"]]
    assert done == [0, 1, 2, 3, 4], "each row's `then` ran before its waiter woke"


def test_the_same_tenant_twice_goes_in_two_groups_and_a_failure_is_its_rows_own() -> None:
    from onboarding.ledger.group_commit import GroupCommit

    groups: list[list[str]] = []

    def flush(rows: list[dict[str, Any]]) -> None:
        if any(r.get("bad") for r in rows):
            raise ValueError("constraint")
        groups.append([f"{r['tenant_id']}{r.get('n', '')}" for r in rows])

    writer = GroupCommit(flush, linger=30)
    first = writer.submit({"tenant_id": "t1", "connector_id": "c", "n": 1})
    again = writer.submit({"tenant_id": "t1", "connector_id": "c", "n": 2})
    broken = writer.submit({"tenant_id": "t2", "connector_id": "c", "bad": True})
    other = writer.submit({"tenant_id": "t3", "connector_id": "c"})
    again.wait()
    first.wait()
    other.wait()
    with pytest.raises(ValueError):
        broken.wait()
    # The first group failed as a whole (t2), so its rows went one by one; t1's second row
    # waited for a group of its own.
    assert groups == [["t11"], ["t3"], ["t12"]]


def test_an_idle_writer_ends_and_the_next_row_starts_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from onboarding.ledger import group_commit
    from onboarding.ledger.group_commit import GroupCommit

    monkeypatch.setattr(group_commit, "IDLE_SECONDS", 0.05)
    rows: list[str] = []
    writer = GroupCommit(lambda group: rows.extend(r["tenant_id"] for r in group), linger=0)
    writer.write({"tenant_id": "t1", "connector_id": "c"})
    deadline = time.monotonic() + 5
    while writer._writer is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer._writer is None, "an idle writer thread ends"
    writer.write({"tenant_id": "t2", "connector_id": "c"})
    assert rows == ["t1", "t2"]
