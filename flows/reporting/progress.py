"""Progress of a batch: its progress artifact and progress log lines, and the quieting of
Prefect's task run logs (the INFO line per task run, the traceback of our own failures)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from onboarding.errors import OnboardingError


class _DropRoutineTaskRunLogs(logging.Filter):
    """Drops the one INFO line per successful task run; retries and failures still log, a
    failure of our own (an OnboardingError, its tenants already logged one line each with
    their reason) without Prefect's traceback: a line, not thirty.

    Only the task runs of the flow run that entered the block (`flow_run_id`, which Prefect's
    task run logger puts on each record): the logger is the process's, and another flow run in
    this process (a test's, a served deployment's) keeps its lines."""

    def __init__(self, flow_run_id: str | None) -> None:
        super().__init__()
        self.flow_run_id = flow_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        ours = self.flow_run_id is None or str(getattr(record, "flow_run_id", "")) == (
            self.flow_run_id
        )
        if not ours:
            return True
        if record.levelno == logging.INFO and str(record.msg).startswith(
            "Finished in state Completed"
        ):
            return False
        if record.exc_info and isinstance(record.exc_info[1], OnboardingError):
            record.exc_info = None
            record.exc_text = None
        return True


@contextmanager
def quiet_routine_task_logs() -> Iterator[None]:
    """In a batch of thousands, that line costs CPU per tenant and buries the progress lines;
    the UI shows each task run's state without it."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    logger = logging.getLogger("prefect.task_runs")
    routine = _DropRoutineTaskRunLogs(str(flow_run.id) if flow_run is not None else None)
    logger.addFilter(routine)
    try:
        yield
    finally:
        logger.removeFilter(routine)


class Progress:
    """A progress artifact and a log line that move as tenants finish, without flooding the API:
    at most one artifact update a second and one log line every 10% or 15 seconds."""

    def __init__(self, total: int, key_hint: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.failed = 0
        self._logger = get_run_logger()
        self._artifact_id: UUID = create_progress_artifact(  # type: ignore[assignment]  # sync
            progress=0.0, description=f"Tenants done for {key_hint}"
        )
        self._last_update = self._last_log = time.monotonic()
        self._last_logged_pct = 0.0

    def advance(self, failed: int = 0, count: int = 1) -> None:
        """`count` more tenants done, `failed` of them failed (a bool counts as 0 or 1)."""
        self.done += count
        self.failed += int(failed)
        now = time.monotonic()
        pct = 100.0 * self.done / self.total
        if now - self._last_update >= 1.0:
            update_progress_artifact(self._artifact_id, progress=min(pct, 100.0))
            self._last_update = now
        if pct - self._last_logged_pct >= 10 or now - self._last_log >= 15:
            self._logger.info(
                "%d/%d tenants done (%.0f%%), %d failed", self.done, self.total, pct, self.failed
            )
            self._last_log, self._last_logged_pct = now, pct

    def finish(self) -> None:
        update_progress_artifact(self._artifact_id, progress=100.0)
