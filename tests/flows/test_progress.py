"""flows/reporting/progress.py: `Progress` (the progress artifact at most once a second, a log
line every 10% or 15 s, 100 at the end), by a clock of the test's, then in a flow run on the
session's Prefect server; and `quiet_routine_task_logs`, which drops only the routine
"Finished in state Completed" line of a task run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect import flow, task

import flows.reporting.progress as progress_module
from flows.reporting.progress import Progress, quiet_routine_task_logs
from onboarding.errors import OnboardingError

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """Progress's clock, logger and artifact calls, as the test sets and reads them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.created: list[dict[str, Any]] = []
        self.updates: list[float] = []
        self.lines: list[str] = []
        self.artifact_id = uuid4()

    def monotonic(self) -> float:
        return self.now

    def create_progress_artifact(self, progress: float, description: str) -> UUID:
        self.created.append({"progress": progress, "description": description})
        return self.artifact_id

    def update_progress_artifact(self, artifact_id: UUID, progress: float) -> None:
        assert artifact_id == self.artifact_id
        self.updates.append(progress)

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=recorder.monotonic))
    monkeypatch.setattr(progress_module, "get_run_logger", lambda: recorder)
    for name in ("create_progress_artifact", "update_progress_artifact"):
        monkeypatch.setattr(progress_module, name, getattr(recorder, name))
    return recorder


def test_it_starts_an_artifact_at_zero_named_after_the_batch(seen: Recorder) -> None:
    Progress(40, "zendesk-demo")
    assert seen.created == [{"progress": 0.0, "description": "Tenants done for zendesk-demo"}]
    assert seen.updates == [] and seen.lines == []


def test_the_artifact_moves_at_most_once_a_second(seen: Recorder) -> None:
    progress = Progress(1000, "b")
    for _ in range(50):  # 50 tenants within the first second: no update yet
        seen.now += 0.015625
        progress.advance()
    assert seen.updates == []
    seen.now += 0.21875  # 1.0 s since the start
    progress.advance()
    assert seen.updates == [5.1]
    for _ in range(7):  # 0.875 s more: still within the second since that update
        seen.now += 0.125
        progress.advance()
    assert seen.updates == [5.1]
    seen.now += 0.125
    progress.advance()
    assert seen.updates == [5.1, 5.9]


def test_a_line_is_logged_every_ten_percent(seen: Recorder) -> None:
    progress = Progress(50, "b")
    for n in range(1, 51):
        progress.advance(failed=n % 10 == 0)
    assert seen.lines == [
        "5/50 tenants done (10%), 0 failed",
        "10/50 tenants done (20%), 1 failed",
        "15/50 tenants done (30%), 1 failed",
        "20/50 tenants done (40%), 2 failed",
        "25/50 tenants done (50%), 2 failed",
        "30/50 tenants done (60%), 3 failed",
        "35/50 tenants done (70%), 3 failed",
        "40/50 tenants done (80%), 4 failed",
        "45/50 tenants done (90%), 4 failed",
        "50/50 tenants done (100%), 5 failed",
    ]


def test_a_slow_batch_logs_a_line_every_fifteen_seconds(seen: Recorder) -> None:
    progress = Progress(10_000, "b")
    seen.now += 14.9
    progress.advance()
    assert seen.lines == []
    seen.now += 0.1
    progress.advance()
    assert seen.lines == ["2/10000 tenants done (0%), 0 failed"]
    seen.now += 14.0
    progress.advance()
    assert len(seen.lines) == 1, "15 s from the last line, not from the start"
    seen.now += 1.0
    progress.advance()
    assert len(seen.lines) == 2


def test_a_slice_advances_by_its_count_and_its_failures(seen: Recorder) -> None:
    progress = Progress(300, "b")
    progress.advance(failed=3, count=100)
    progress.advance(failed=True, count=1)
    assert (progress.done, progress.failed) == (101, 4)
    assert seen.lines == ["100/300 tenants done (33%), 3 failed"]


def test_finish_sets_the_artifact_to_100_and_more_than_total_never_passes_it(
    seen: Recorder,
) -> None:
    progress = Progress(0, "empty")  # a batch with nothing to do: no division by zero
    seen.now += 2
    progress.advance(count=3)
    assert seen.updates == [100.0]
    progress.finish()
    assert seen.updates == [100.0, 100.0]
    nothing_done = Progress(10, "b")
    nothing_done.finish()
    assert seen.updates[-1] == 100.0


@pytest.mark.usefixtures("prefect_harness")
def test_in_a_flow_run_the_servers_artifact_ends_at_100() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    @flow(name="test-progress", persist_result=False)
    def batch() -> None:
        progress = Progress(20, "test-progress")
        for n in range(20):
            progress.advance(failed=n == 3)
        progress.finish()

    state = batch(return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    (artifact,) = [a for a in found if a.type == "progress"]
    assert artifact.data == 100.0
    assert artifact.description == "Tenants done for test-progress"


# --- quiet_routine_task_logs -------------------------------------------------------------------


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def task_run_logs() -> Iterator[Kept]:
    logger = logging.getLogger("prefect.task_runs")
    kept = Kept()
    logger.addHandler(kept)
    # `onboard run` sets this logger to WARNING for its console (deployments/cli.py); a test
    # that ran the CLI in this process (CliRunner) left it so, and the INFO lines these tests
    # count never reached the handler (a failure now and then under xdist, by test order).
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield kept
    finally:
        logger.setLevel(level)
        logger.removeHandler(kept)


@pytest.mark.filterwarnings("ignore:Logger 'prefect.*without a flow run id")
def test_only_the_routine_info_line_is_dropped_and_only_within_the_block(
    task_run_logs: Kept,
) -> None:
    logger = logging.getLogger("prefect.task_runs")
    with quiet_routine_task_logs():
        logger.info("Finished in state Completed()")
        logger.warning("Finished in state Completed()")
        logger.info("Finished in state Failed('boom')")
        logger.info("Task run 'onboard t001' - retrying in 1 s")
        logging.getLogger("prefect.flow_runs").info("Finished in state Completed()")
    logger.info("Finished in state Completed()")
    kept = [(r.levelno, r.getMessage()) for r in task_run_logs.records]
    assert kept == [
        (logging.WARNING, "Finished in state Completed()"),
        (logging.INFO, "Finished in state Failed('boom')"),
        (logging.INFO, "Task run 'onboard t001' - retrying in 1 s"),
        (logging.INFO, "Finished in state Completed()"),  # after the block
    ]


def test_the_filter_is_removed_when_the_block_raises() -> None:
    logger = logging.getLogger("prefect.task_runs")
    before = list(logger.filters)
    with pytest.raises(RuntimeError), quiet_routine_task_logs():
        assert len(logger.filters) == len(before) + 1
        raise RuntimeError
    assert logger.filters == before


@pytest.mark.usefixtures("prefect_harness")
def test_in_a_flow_run_task_runs_log_failures_but_not_their_routine_success(
    task_run_logs: Kept,
) -> None:
    @task(name="test-quiet-ok", persist_result=False)
    def ok() -> int:
        return 1

    @task(name="test-quiet-fails", persist_result=False)
    def fails() -> int:
        raise ValueError("boom")

    @flow(name="test-quiet", persist_result=False)
    def batch() -> None:
        ok()  # outside the block: its line is logged
        with quiet_routine_task_logs():
            ok()
            ok()
            fails(return_state=True)

    assert batch(return_state=True).is_completed()
    finished = [
        r.getMessage() for r in task_run_logs.records if "Finished in state" in r.getMessage()
    ]
    assert [m.split("(")[0] for m in finished] == [
        "Finished in state Completed",
        "Finished in state Failed",
    ]


@pytest.mark.usefixtures("prefect_harness")
def test_in_a_flow_run_our_own_failure_is_one_line_and_any_other_keeps_its_traceback(
    task_run_logs: Kept,
) -> None:
    @task(name="test-quiet-ours", persist_result=False)
    def ours() -> int:
        raise OnboardingError("t001: the connector said no")

    @task(name="test-quiet-theirs", persist_result=False)
    def theirs() -> int:
        raise ValueError("boom")

    @flow(name="test-quiet-failures", persist_result=False)
    def batch() -> None:
        with quiet_routine_task_logs():
            ours(return_state=True)
            theirs(return_state=True)

    assert batch(return_state=True).is_completed()
    failed = [r for r in task_run_logs.records if r.getMessage().startswith("Task run failed with")]
    ours_line = next(r for r in failed if "OnboardingError" in r.getMessage())
    theirs_line = next(r for r in failed if "ValueError" in r.getMessage())
    assert ours_line.exc_info is None and "the connector said no" in ours_line.getMessage()
    assert theirs_line.exc_info is not None, "a bug of ours keeps its traceback"


@pytest.mark.usefixtures("prefect_harness")
def test_the_quiet_block_drops_only_its_own_flow_runs_lines(task_run_logs: Kept) -> None:
    """The logger is the process's: a routine line of another flow run in this process (a
    test's, a served deployment's) is kept while a batch is inside its quiet block."""
    logger = logging.getLogger("prefect.task_runs")

    @flow(name="test-quiet-scope", persist_result=False)
    def batch() -> None:
        with quiet_routine_task_logs():
            logger.info("Finished in state Completed()", extra={"flow_run_id": "another"})

    assert batch(return_state=True).is_completed()
    kept = [r for r in task_run_logs.records if getattr(r, "flow_run_id", "") == "another"]
    assert [r.getMessage() for r in kept] == ["Finished in state Completed()"]
