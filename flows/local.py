"""Running a flow in this process, as `onboard run`, `remind`, `mark-connected` and the
benchmark do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from uuid import UUID

from prefect import Flow
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.events import on_temporary_server

# How long the temporary server's record of a run's task runs must stand still, every one of
# them in a final state, before it counts as caught up; how long it may stand still with some
# not final (a run that crashed leaves them so) before we stop waiting; and the most we wait.
SETTLED_SECONDS = 0.5
STALLED_SECONDS = 3.0
CATCH_UP_MAX_SECONDS = 60.0
POLL_SECONDS = 0.1
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


@contextmanager
def no_heartbeats_on_temporary_server() -> Iterator[None]:
    """Flow-run heartbeats off while on Prefect's temporary server.

    Heartbeats let a server notice a flow run whose process died; the temporary server dies
    with the process, so there they tell nobody anything. They cost time: Prefect 3.9's
    heartbeat thread sleeps in one-second steps and the engine waits for it at the end of
    every flow run, so each run ended on the next whole second after it began (bench/run.py:
    a 2,000-tenant run took 8.1 s in every trial, 7.4 s without heartbeats). On a real server
    they stay on, and a run pays that 0-1 s."""
    if not on_temporary_server():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def run_here(flow: Flow[..., Any], /, **parameters: Any) -> State[Any]:
    """Run `flow` in this process and return its final state (never raises for a failed run).
    On the temporary server, returns once that server has recorded the run's task runs
    (`let_temporary_server_catch_up`)."""
    with no_heartbeats_on_temporary_server():
        state = cast(State[Any], flow(**parameters, return_state=True))
    flow_run_id = state.state_details.flow_run_id
    if flow_run_id is not None and on_temporary_server():
        let_temporary_server_catch_up(flow_run_id)
    return state


def let_temporary_server_catch_up(flow_run_id: UUID) -> None:
    """Wait until Prefect's temporary server has recorded every task run of `flow_run_id` in
    its final state, before this process ends and stops that server.

    Task-run states reach a Prefect 3 server as events, and its task-run recorder writes them
    into its database one event per transaction: about 30 a second on this project's 2-core
    machine, each task run making 3 or more. A run of 25 task runs ended with 36 of its 75 state
    events recorded; stopping the server then (at this process's exit) cancelled the recorder
    in the middle of a write (an `Error flushing 1 events` traceback, ~150 lines of stderr,
    sometimes `sqlalchemy.pool` ones too) and left 8 of the 25 task runs unrecorded and 15 as
    `Running` for good in the temporary server's database (PREFECT_HOME/prefect.db, which a
    later `prefect server start` shows). The events themselves were all kept.

    Here the events this process still holds are sent first (Prefect's events worker drained),
    then the server's counts of the run's task runs by state are read until every one is in a
    final state and the counts have not moved for SETTLED_SECONDS: a recorder with events left
    changes them with each one it writes (a new task run, or one moving state), many times in
    that half second. Bounded: after STALLED_SECONDS without a change while some are not final,
    or CATCH_UP_MAX_SECONDS in all, it returns anyway."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker

    started = time.monotonic()
    EventsWorker.drain_all(timeout=CATCH_UP_MAX_SECONDS)
    query = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
    last: dict[str, int] | None = None
    changed = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.request("POST", "/ui/task_runs/count", json=query)
                response.raise_for_status()
                counts: dict[str, int] = response.json()
            except Exception:  # the server is gone (it died with an interrupted run)
                return
            now = time.monotonic()
            if counts != last:
                last, changed = counts, now
            settled = all(n == 0 for kind, n in counts.items() if kind not in FINAL_STATE_TYPES)
            still = now - changed
            if still >= (SETTLED_SECONDS if settled else STALLED_SECONDS):
                return
            if now - started >= CATCH_UP_MAX_SECONDS:
                return
            time.sleep(POLL_SECONDS)
