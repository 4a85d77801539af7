"""flows/running/in_process.py without a server: the wait for Prefect's temporary server to
record a run's task runs ends as soon as it holds as many as the run submitted, every one final
(else after its counts stand still), and the settings without heartbeats are made once for the
settings in force."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import flows.running.in_process as in_process


class FakeServer:
    """Answers /ui/task_runs/count from a script of counts, the last repeated."""

    def __init__(self, *counts: dict[str, int]) -> None:
        self.counts = list(counts)
        self.asked = 0

    def request(self, method: str, path: str, json: Any = None) -> Any:
        assert (method, path) == ("POST", "/ui/task_runs/count")
        answer = self.counts[min(self.asked, len(self.counts) - 1)]
        self.asked += 1
        return FakeResponse(answer)


class FakeResponse:
    def __init__(self, body: dict[str, int]) -> None:
        self.body = body

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict[str, int]:
        return self.body


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeServer]]:
    """The fake server let_temporary_server_catch_up talks to (append one), events drained."""
    from prefect.client import orchestration
    from prefect.events.worker import EventsWorker

    servers: list[FakeServer] = []

    @contextmanager
    def get_client(**_: Any) -> Iterator[FakeServer]:
        yield servers[-1]

    monkeypatch.setattr(orchestration, "get_client", get_client)
    monkeypatch.setattr(EventsWorker, "drain_all", classmethod(lambda cls, timeout=None: None))
    monkeypatch.setattr(in_process, "on_temporary_server", lambda: True)
    yield servers


def test_the_wait_ends_once_the_server_holds_every_task_run_submitted_all_final(
    server: list[FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(in_process, "SETTLED_SECONDS", 30.0)  # never reached here
    flow_run_id = uuid.uuid4()
    for _ in range(3):
        in_process.count_task_run(flow_run_id)
    server.append(
        FakeServer({"COMPLETED": 1, "RUNNING": 2}, {"COMPLETED": 2, "FAILED": 1, "RUNNING": 0})
    )
    started = time.monotonic()
    in_process.let_temporary_server_catch_up(flow_run_id)
    assert time.monotonic() - started < 5
    assert server[-1].asked == 2, "the first answer had task runs not final yet"
    assert str(flow_run_id) not in in_process._TASK_RUNS, "the count is forgotten once read"


def test_fewer_task_runs_than_submitted_are_waited_for(
    server: list[FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(in_process, "SETTLED_SECONDS", 30.0)
    monkeypatch.setattr(in_process, "POLL_SECONDS", 0.01)
    flow_run_id = uuid.uuid4()
    for _ in range(2):
        in_process.count_task_run(flow_run_id)
    server.append(FakeServer({"COMPLETED": 1}, {"COMPLETED": 1}, {"COMPLETED": 2}))
    in_process.let_temporary_server_catch_up(flow_run_id)
    assert server[-1].asked == 3


def test_without_a_count_the_counts_must_stand_still(
    server: list[FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(in_process, "SETTLED_SECONDS", 0.2)
    monkeypatch.setattr(in_process, "POLL_SECONDS", 0.01)
    server.append(FakeServer({"COMPLETED": 4}))
    started = time.monotonic()
    in_process.let_temporary_server_catch_up(uuid.uuid4())  # nothing counted for this run
    assert time.monotonic() - started >= 0.2
    assert server[-1].asked >= 2


def test_task_runs_are_counted_on_the_temporary_server_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow_run_id = uuid.uuid4()
    monkeypatch.setattr(in_process, "on_temporary_server", lambda: False)
    in_process.count_task_run(flow_run_id)
    in_process.count_task_run(None)
    assert str(flow_run_id) not in in_process._TASK_RUNS, "nothing would read it: none kept"
    monkeypatch.setattr(in_process, "on_temporary_server", lambda: True)
    in_process.count_task_run(flow_run_id)
    assert in_process._TASK_RUNS.pop(str(flow_run_id)) == 1


def test_the_settings_without_heartbeats_are_made_once_for_the_settings_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings
    from prefect.settings.context import temporary_settings

    monkeypatch.setattr(in_process, "on_temporary_server", lambda: True)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        made: list[Any] = []
        for _ in range(2):
            with in_process.no_heartbeats_on_temporary_server():
                assert get_current_settings().flows.heartbeat_frequency is None
                made.append(get_current_settings())
            assert get_current_settings().flows.heartbeat_frequency == 30
        assert made[0] is made[1], "made once, for the same settings"
        other = temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60})
        with other, in_process.no_heartbeats_on_temporary_server():
            assert get_current_settings() is not made[0], "other settings: made again"
            assert get_current_settings().flows.heartbeat_frequency is None
    monkeypatch.setattr(in_process, "on_temporary_server", lambda: False)
    kept = temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30})
    with kept, in_process.no_heartbeats_on_temporary_server():
        assert get_current_settings().flows.heartbeat_frequency == 30, "a server keeps them"
