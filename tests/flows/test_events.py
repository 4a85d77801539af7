"""flows/reporting/events.py: `TenantEventSender` turns tenant status changes into Prefect
events, sent in batches from a thread of its own. Its rules against a fake API client (levels,
batching, flushing, retries, lost events, an interrupt), then against the session's real
Prefect server: the events read back, and an API that is down."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

import flows.reporting.events as events_module
from flows.inputs.options import TenantEvents
from flows.reporting.events import BATCH_MAX, TenantEventSender
from onboarding.batch.outcomes import StatusChange
from onboarding.batch.tenant_events import event_name

pytestmark = pytest.mark.timeout(120)

RUN_ID = "0a5a0b1c-0000-4000-8000-000000000001"
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"


def change(n: int, status: str = "delivered", error_code: str = "") -> StatusChange:
    return StatusChange(f"t{n:04d}", CONNECTOR, "zendesk-demo", status, error_code)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class FakeApi:
    """The sync Prefect client as the sender uses it: POST /events. `fail` holds errors for the
    next requests; `hold`, while set up, keeps a request waiting until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail: list[Exception] = []
        self.fail_always = False
        self.hold: threading.Event | None = None
        self.requested = threading.Event()
        self.clients = 0

    def get_client(self, sync_client: bool = False) -> contextlib.AbstractContextManager[FakeApi]:
        assert sync_client
        self.clients += 1
        return contextlib.nullcontext(self)

    def request(self, method: str, path: str, json: list[dict[str, Any]]) -> None:
        assert (method, path) == ("POST", "/events")
        self.requested.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.fail_always:
            raise ConnectionError("the API is down")
        if self.fail:
            raise self.fail.pop(0)
        self.batches.append(list(json))

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr("prefect.client.orchestration.get_client", fake.get_client)
    return fake


# --- names, levels, what an event holds --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "name"),
    [
        ("link_created", "onboarding.tenant.linked"),
        ("delivered", "onboarding.tenant.delivered"),
        ("failed", "onboarding.tenant.failed"),
        ("connected", "onboarding.tenant.connected"),
        ("reminded", "onboarding.tenant.reminded"),
    ],
)
def test_event_name(status: str, name: str) -> None:
    assert event_name(status) == name


@pytest.mark.parametrize(
    ("level", "sent"),
    [
        (TenantEvents.ALL, ["link_created", "delivered", "failed"]),
        (TenantEvents.FAILURES, ["failed"]),
        (TenantEvents.OFF, []),
    ],
)
def test_the_level_says_which_changes_become_events(
    api: FakeApi, level: TenantEvents, sent: list[str]
) -> None:
    with TenantEventSender(level, RUN_ID) as sender:
        for n, status in enumerate(["link_created", "delivered", "failed"]):
            sender(change(n, status, "unavailable" if status == "failed" else ""))
    assert [e["event"] for e in api.sent] == [event_name(s) for s in sent]
    assert (sender.sent, sender.lost) == (len(sent), 0)
    if level is TenantEvents.OFF:
        assert api.clients == 0, "off: no thread, no client"


def test_auto_is_failures_on_a_temporary_server_and_all_on_a_server() -> None:
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert TenantEventSender(TenantEvents.AUTO, RUN_ID).level is TenantEvents.FAILURES
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert TenantEventSender(TenantEvents.AUTO, RUN_ID).level is TenantEvents.ALL


def test_an_event_carries_ids_status_and_error_code_and_nothing_else(api: FakeApi) -> None:
    with TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        sender(change(1, "failed", "validation_failed"))
        sender(change(2, "delivered"))
    failed, delivered = api.sent
    assert set(failed) == {"id", "occurred", "event", "resource", "related", "payload"}
    uuid.UUID(failed["id"])
    assert failed["id"] != delivered["id"]
    assert datetime.fromisoformat(failed["occurred"]).utcoffset() is not None
    assert failed["event"] == "onboarding.tenant.failed"
    assert failed["resource"] == {
        "prefect.resource.id": "onboarding.tenant.t0001",
        "prefect.resource.name": "t0001",
        "onboarding.connector-id": CONNECTOR,
        "onboarding.profile": "zendesk-demo",
    }
    assert failed["related"] == [
        {
            "prefect.resource.id": f"prefect.flow-run.{RUN_ID}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": RUN_ID,  # outside a flow run: its id for a name
        }
    ]
    assert failed["payload"] == {"error_code": "validation_failed"}
    assert delivered["payload"] == {}, "no error code, no payload"


def test_outside_a_flow_run_and_without_an_id_an_event_has_no_related_run(api: FakeApi) -> None:
    with TenantEventSender(TenantEvents.ALL) as sender:
        sender(change(1))
    assert api.sent[0]["related"] == []


# --- batches and flushes -----------------------------------------------------------------------


def test_a_full_batch_goes_at_once_and_leaving_sends_the_rest(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "FLUSH_SECONDS", 30.0)  # no flush by time here
    with TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        for n in range(BATCH_MAX):
            sender(change(n))
        assert wait_for(lambda: len(api.sent) == BATCH_MAX), "sent without waiting 30 s"
        for n in range(10):
            sender(change(BATCH_MAX + n))
        time.sleep(0.2)
        assert len(api.sent) == BATCH_MAX, "fewer than a batch wait for the flush"
    assert [len(batch) for batch in api.batches] == [BATCH_MAX, 10]
    assert [e["resource"]["prefect.resource.name"] for e in api.sent] == [
        f"t{n:04d}" for n in range(BATCH_MAX + 10)
    ], "every event once, in order"
    assert sender.sent == BATCH_MAX + 10


def test_a_backlog_goes_in_batches_of_at_most_batch_max(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "FLUSH_SECONDS", 30.0)
    api.hold = threading.Event()  # the first send hangs while more pile up
    with TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        for n in range(BATCH_MAX):
            sender(change(n))
        assert api.requested.wait(5)
        for n in range(BATCH_MAX, 3 * BATCH_MAX - 100):
            sender(change(n))
        api.hold.set()
        assert wait_for(lambda: len(api.sent) == 3 * BATCH_MAX - 100), "the backlog is full"
    assert [len(batch) for batch in api.batches] == [BATCH_MAX, BATCH_MAX, BATCH_MAX - 100]
    assert sender.sent == 3 * BATCH_MAX - 100


def test_what_is_queued_is_sent_every_flush_seconds(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "FLUSH_SECONDS", 0.1)
    with TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        sender(change(1))
        sender(change(2))
        assert wait_for(lambda: len(api.sent) == 2, timeout=2), "flushed before the end"
        sender(change(3))
        assert wait_for(lambda: len(api.sent) == 3, timeout=2)
    assert len(api.batches) >= 2


# --- when the API fails ------------------------------------------------------------------------


def test_a_failed_send_is_tried_again_with_the_same_batch(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "SEND_TRIES", 2)
    api.fail = [ConnectionError("busy")]
    with TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        for n in range(3):
            sender(change(n))
    assert [len(b) for b in api.batches] == [3]
    assert (sender.sent, sender.lost) == (3, 0)


def test_events_that_cannot_be_sent_are_counted_and_logged(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events_module, "SEND_TRIES", 1)
    api.fail_always = True
    with (
        caplog.at_level(logging.WARNING, logger="flows.reporting.events"),
        TenantEventSender(TenantEvents.ALL, RUN_ID) as sender,
    ):
        for n in range(3):
            sender(change(n))
    assert (sender.sent, sender.lost) == (0, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert "could not send 3 tenant event(s): the API is down" in messages
    assert any(
        m.startswith("3 tenant event(s) could not be sent to the Prefect API") for m in messages
    )


def test_an_interrupt_gives_up_at_once_instead_of_retrying(api: FakeApi) -> None:
    api.fail_always = True  # five tries would wait 1 + 2 + 4 + 8 s
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), TenantEventSender(TenantEvents.ALL, RUN_ID) as sender:
        for n in range(3):
            sender(change(n))
        raise KeyboardInterrupt
    assert time.monotonic() - started < events_module.INTERRUPTED_JOIN_SECONDS + 0.5
    assert sender.lost == 3


def hung_api_interrupted(api: FakeApi) -> tuple[TenantEventSender, float]:
    api.hold = threading.Event()
    sender = TenantEventSender(TenantEvents.ALL, RUN_ID)
    try:
        with pytest.raises(KeyboardInterrupt), sender:
            for n in range(5):
                sender(change(n))
            sender._wake.set()  # send these now: the thread takes them, the API hangs
            assert api.requested.wait(5)
            for n in range(5, 8):
                sender(change(n))
            started = time.monotonic()
            raise KeyboardInterrupt
        return sender, time.monotonic() - started
    finally:
        api.hold.set()


def test_an_interrupt_with_the_api_hanging_leaves_within_the_join_time(api: FakeApi) -> None:
    sender, took = hung_api_interrupted(api)
    assert took < events_module.INTERRUPTED_JOIN_SECONDS + 0.5
    assert sender.lost >= 3, "the queued events are given up and counted"


@pytest.mark.xfail(
    strict=True,
    reason="TenantEventSender.__exit__ counts as lost only the queue: the batch its thread is "
    "still sending to a hung API when an interrupt gives up on it is dropped without being "
    "counted or logged (5 of 8 here), against 'never silently dropped'",
)
def test_an_interrupt_with_the_api_hanging_counts_every_event_not_sent(api: FakeApi) -> None:
    sender, _ = hung_api_interrupted(api)
    assert sender.lost == 8


# --- on the session's Prefect server -----------------------------------------------------------


def read_events(flow_run_id: str, expected: int, timeout: float = 15.0) -> list[Any]:
    from prefect.client.orchestration import get_client
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
                return list(page.events)
            time.sleep(0.2)


@pytest.mark.usefixtures("prefect_harness")
def test_the_server_takes_the_events_as_sent() -> None:
    run_id = str(uuid.uuid4())
    with TenantEventSender(TenantEvents.ALL, run_id) as sender:
        sender(change(1, "link_created"))
        sender(change(1, "delivered"))
        sender(change(2, "failed", "unavailable"))
    assert (sender.sent, sender.lost) == (3, 0)
    events = read_events(run_id, 3)
    got = sorted(
        (e.resource.id, e.event, dict(e.payload), e.resource["onboarding.connector-id"])
        for e in events
    )
    assert got == [
        ("onboarding.tenant.t0001", "onboarding.tenant.delivered", {}, CONNECTOR),
        ("onboarding.tenant.t0001", "onboarding.tenant.linked", {}, CONNECTOR),
        (
            "onboarding.tenant.t0002",
            "onboarding.tenant.failed",
            {"error_code": "unavailable"},
            CONNECTOR,
        ),
    ]
    assert {e.related[0].id for e in events} == {f"prefect.flow-run.{run_id}"}


@pytest.fixture
def api_down() -> Iterator[None]:
    """This process's Prefect API pointed at a port where nothing listens, for every thread
    (as the `prefect_harness` fixture points it at the session's server)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context

    with socket_closed_port() as port:
        dead = f"http://127.0.0.1:{port}/api"
    updates = {PREFECT_API_URL: dead, PREFECT_CLIENT_MAX_RETRIES: 0}
    # The second context is made once the first is entered: it takes those settings.
    with (
        temporary_settings(updates=updates),
        _temporary_global_settings_context(get_settings_context()),
    ):
        yield


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.usefixtures("api_down")
def test_with_the_api_down_every_event_is_counted_lost_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events_module, "SEND_TRIES", 1)
    with (
        caplog.at_level(logging.WARNING, logger="flows.reporting.events"),
        TenantEventSender(TenantEvents.ALL, RUN_ID) as sender,
    ):
        for n in range(4):
            sender(change(n, "failed", "unavailable"))
    assert (sender.sent, sender.lost) == (0, 4)
    assert any("4 tenant event(s) could not be sent" in r.getMessage() for r in caplog.records)
