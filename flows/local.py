"""Running a flow in this process, as `onboard run`, `remind`, `mark-connected` and the
benchmark do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from prefect import Flow
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.events import on_temporary_server


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
    """Run `flow` in this process and return its final state (never raises for a failed run)."""
    with no_heartbeats_on_temporary_server():
        return cast(State[Any], flow(**parameters, return_state=True))
