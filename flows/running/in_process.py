"""Running a flow in this process, as `onboard run`, `remind`, `mark-connected` and the
benchmark do."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, cast
from uuid import UUID

from prefect import Flow
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

from flows.running.server import on_temporary_server

# How long the temporary server's record of a run's task runs must stand still, every one of
# them in a final state, before it counts as caught up; how long it may stand still with some
# not final (a run that crashed leaves them so) before we stop waiting; and the most we wait.
SETTLED_SECONDS = 0.5
STALLED_SECONDS = 3.0
CATCH_UP_MAX_SECONDS = 60.0
POLL_SECONDS = 0.1
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})

# After a Ctrl-C, how long the run has to unwind (the flow's `finally` blocks and context exits:
# the ledger lease and claims, the clients) before the process ends anyway; and its exit code.
INTERRUPT_GRACE_SECONDS = 5.0
EXIT_INTERRUPTED = 130
# Set by the first Ctrl-C of a run under `stop_on_interrupt`: code that can stop early may look.
INTERRUPTED = threading.Event()
# Called on the first Ctrl-C (see on_interrupt): the batches running stop starting tenants.
_ON_INTERRUPT: list[Callable[[], None]] = []
# Task runs submitted in this process, by flow run id (count_task_run): the temporary server has
# caught up with a run once it holds that many of its task runs, every one final.
_TASK_RUNS: dict[str, int] = {}
_TASK_RUNS_LOCK = threading.Lock()


def count_task_run(flow_run_id: object) -> None:
    """One more task run submitted for the flow run `flow_run_id` (None: not in a flow run).
    Kept on the temporary server only, where run_here reads it (and forgets it)."""
    if flow_run_id is None or not on_temporary_server():
        return
    with _TASK_RUNS_LOCK:
        _TASK_RUNS[str(flow_run_id)] = _TASK_RUNS.get(str(flow_run_id), 0) + 1


@contextmanager
def on_interrupt(stop: Callable[[], None]) -> Iterator[None]:
    """Call `stop` on the first Ctrl-C while the block runs (at once if one came already)."""
    _ON_INTERRUPT.append(stop)
    if INTERRUPTED.is_set():
        stop()
    try:
        yield
    finally:
        _ON_INTERRUPT.remove(stop)


@contextmanager
def no_heartbeats_on_temporary_server() -> Iterator[None]:
    """Flow-run heartbeats off while on Prefect's temporary server.

    Heartbeats let a server notice a flow run whose process died; the temporary server dies
    with the process, so there they tell nobody anything. They cost time: Prefect 3.9's
    heartbeat thread sleeps in one-second steps and the engine waits for it at the end of
    every flow run, so each run ended on the next whole second after it began (bench/run.py:
    a 2,000-tenant run took 8.1 s in every trial, 7.4 s without heartbeats). On a real server
    they stay on, and a run pays that 0-1 s.

    The settings without heartbeats are made once for the settings in force (a copy of
    Prefect's settings costs ~20 ms of CPU), and made again when those change."""
    if not on_temporary_server():
        yield
        return
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    with _QUIET_LOCK:
        made_from, quiet = _QUIET
        if made_from is not context.settings:
            quiet = context.settings.copy_with_update(
                updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            )
            _QUIET[:] = [context.settings, quiet]
    with SettingsContext(profile=context.profile, settings=quiet):
        yield


# The settings no_heartbeats_on_temporary_server last made: (made from, without heartbeats).
_QUIET: list[Any] = [None, None]
_QUIET_LOCK = threading.Lock()


def run_here(flow: Flow[..., Any], /, **parameters: Any) -> State[Any]:
    """Run `flow` in this process and return its final state (never raises for a failed run).
    On the temporary server, returns once that server has recorded the run's task runs
    (`let_temporary_server_catch_up`)."""
    with no_heartbeats_on_temporary_server():
        state = cast(State[Any], flow(**parameters, return_state=True))
    flow_run_id = state.state_details.flow_run_id
    if flow_run_id is not None and not INTERRUPTED.is_set() and on_temporary_server():
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
    final state and either they are as many as the run submitted (count_task_run: each task
    run's final state is its last event, so the recorder has written them all) or, when that
    number is not known, the counts have not moved for SETTLED_SECONDS: a recorder with events
    left changes them with each one it writes (a new task run, or one moving state), many times
    in that half second. That half second was 7 % of a 2,000-tenant batch (bench/run.py).
    Bounded: after STALLED_SECONDS without a change while some are not final, or
    CATCH_UP_MAX_SECONDS in all, it returns anyway."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker

    with _TASK_RUNS_LOCK:
        submitted = _TASK_RUNS.pop(str(flow_run_id), None)
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
            if settled and submitted is not None and sum(counts.values()) == submitted:
                return
            stood_still = now - changed >= (SETTLED_SECONDS if settled else STALLED_SECONDS)
            if stood_still or now - started >= CATCH_UP_MAX_SECONDS:
                return
            time.sleep(POLL_SECONDS)


class Interrupt:
    """What `stop_on_interrupt` yields: whether the run was interrupted, and the report of how
    far it got, given once (`report_once`), by whichever path gets there first."""

    def __init__(self, report: Callable[[], None]) -> None:
        self.report = report
        self.interrupted = False
        # Re-entrant: a second Ctrl-C may land while this thread is printing the report.
        self._lock = threading.RLock()
        self._reported = False

    def report_once(self) -> None:
        with self._lock:
            if self._reported:
                return
            self._reported = True
            try:
                self.report()
            except Exception as error:  # the report must never keep the process alive
                print(
                    f"(could not read how far the run got: {type(error).__name__})", file=sys.stderr
                )
            sys.stdout.flush()
            sys.stderr.flush()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now
            self._end_now()
        self.interrupted = True
        INTERRUPTED.set()
        for stop in list(_ON_INTERRUPT):
            # Stopping early is a courtesy: the grace timer below ends the process anyway.
            with contextlib.suppress(Exception):
                stop()
        threading.Thread(target=self._watch, name="interrupt-grace", daemon=True).start()
        raise KeyboardInterrupt

    def _watch(self) -> None:
        time.sleep(INTERRUPT_GRACE_SECONDS)
        self._end_now()

    def _end_now(self) -> None:
        """Report, stop the temporary server if it still runs, and end the process."""
        self.report_once()
        _stop_temporary_server()
        os._exit(EXIT_INTERRUPTED)


@contextmanager
def stop_on_interrupt(report: Callable[[], None]) -> Iterator[Interrupt]:
    """One Ctrl-C (SIGINT) stops the run in this block within INTERRUPT_GRACE_SECONDS and a bit.

    The first SIGINT raises KeyboardInterrupt in the main thread, as Python's own handler does,
    so the flow unwinds through its `finally` blocks and context exits, and the caller, catching
    it, calls `report_once()` and exits EXIT_INTERRUPTED. It also starts a timer: if the process
    still runs when the grace is over, it reports (once) and ends with os._exit(EXIT_INTERRUPTED).
    Why a timer: a terminal's Ctrl-C also stops Prefect's temporary server (same process group),
    and with it gone, the unwinding waits on things that cannot finish soon: the tenants already
    handed to the run's threads run to their end (a slice of 100 at 2 s a call: 10 s and more),
    the flow engine reports the crash to the dead API, retrying 2 to 32 s apart, and at exit
    Prefect's events worker tries to reach it for every event it holds (a run went on for over
    2.5 minutes that way).
    A second SIGINT ends the process at once, after the report. The ledger stays the truth: what
    a tenant had reached is committed, and a re-run resumes from it (tests/e2e/test_crash_resume
    kills a run outright). After an interrupt the handler stays on until the process ends."""
    interrupt = Interrupt(report)
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = signal.signal(signal.SIGINT, interrupt._handle)
    try:
        yield interrupt
    finally:
        if not interrupt.interrupted:
            signal.signal(signal.SIGINT, previous)


def _stop_temporary_server() -> None:
    """Terminate Prefect's temporary server of this process if it still runs: an os._exit
    skips the atexit hook that would stop it, and it would outlive us."""
    with contextlib.suppress(Exception):
        from prefect.server.api.server import SubprocessASGIServer

        process = SubprocessASGIServer().server_process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=2)
        except Exception:
            process.kill()
