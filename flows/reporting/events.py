"""Tenant status changes as Prefect events: `onboarding.tenant.<status>` about the resource
`onboarding.tenant.<tenant_id>`, related to the flow run. What the Event Feed shows and
Automations trigger on, at any batch size. An event carries ids, the status and an error
code, never a link, a state or an email address.

Why not `prefect.events.emit_event` per tenant: measured with bench/run.py under py-spy, each
call cost ~1.2 ms of this process's CPU (the event model built and sized, then, on Prefect's
event loop, related resources looked up from the run context and one websocket message sent),
which took the flow from 0.62 to 0.40 of the plain httpx loop. Here events are plain dicts
sent in batches to the API's `POST /events` (one request a second, or per 500 events), which
the server and its Automations treat like events from the websocket."""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from typing import Any

from flows.inputs.options import TenantEvents
from flows.running.server import on_temporary_server
from onboarding.batch.outcomes import StatusChange
from onboarding.batch.tenant_events import tenant_event

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
BATCH_MAX = 500
SEND_TRIES = 5
# Leaving on an interrupt, how long to wait for the sending thread before giving up the rest.
INTERRUPTED_JOIN_SECONDS = 1.0


class TenantEventSender:
    """A StatusChange callback that queues one event per change (those `level` wants) and
    sends them in batches from a background thread. Use as a context manager: leaving it
    sends what is left. Events that cannot be sent after SEND_TRIES are counted and logged,
    never silently dropped; the ledger has every status either way."""

    def __init__(self, level: TenantEvents, flow_run_id: str | None = None) -> None:
        from prefect.runtime import flow_run

        if level is TenantEvents.AUTO:
            level = TenantEvents.FAILURES if on_temporary_server() else TenantEvents.ALL
        self.level = level
        run_id = flow_run_id or flow_run.id
        self._related: list[dict[str, str]] = []
        if run_id:
            self._related.append(
                {
                    "prefect.resource.id": f"prefect.flow-run.{run_id}",
                    "prefect.resource.role": "flow-run",
                    "prefect.resource.name": str(flow_run.name or run_id),
                }
            )
        self._lock = threading.Lock()
        self._queue: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._closed = False
        # Set when the block is left by an interrupt: no retries, no long wait for the API.
        self._hurry = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.lost = 0

    def __call__(self, change: StatusChange) -> None:
        if not self.level.wants(change.status):
            return
        event = tenant_event(change, self._related)
        with self._lock:
            self._queue.append(event)
            full = len(self._queue) >= BATCH_MAX
        if full:
            self._wake.set()

    def __enter__(self) -> TenantEventSender:
        if self.level is not TenantEvents.OFF:
            self._thread = threading.Thread(target=self._run, name="tenant-events", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        if interrupted:  # Ctrl-C, SystemExit: the API may be gone with the temporary server
            self._hurry.set()
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(INTERRUPTED_JOIN_SECONDS if interrupted else None)
            if self._thread.is_alive():  # still trying a gone API: give up what is queued
                with self._lock:
                    self.lost += len(self._queue)
                    self._queue = []
        if self.lost:
            log.warning(
                "%d tenant event(s) could not be sent to the Prefect API; the ledger has "
                "every tenant's status (`onboard status`, `onboard export`)",
                self.lost,
            )

    def _run(self) -> None:
        from prefect.client.orchestration import get_client

        # Opened with the first event to send: a client costs ~20 ms of CPU (its TLS context),
        # which a run that sends failures only, and has none, never needs.
        with ExitStack() as stack:
            client: Any = None
            while True:
                self._wake.wait(FLUSH_SECONDS)
                self._wake.clear()
                closing = self._closed
                with self._lock:
                    batch, self._queue = self._queue, []
                if batch and client is None:
                    client = stack.enter_context(get_client(sync_client=True))
                for start in range(0, len(batch), BATCH_MAX):
                    self._send(client, batch[start : start + BATCH_MAX])
                if closing:
                    return

    def _send(self, client: Any, batch: list[dict[str, Any]]) -> None:
        for attempt in range(SEND_TRIES):
            try:
                client.request("POST", "/events", json=batch)
            except Exception as err:  # the API is down or busy: wait and send the same batch
                if attempt == SEND_TRIES - 1 or self._hurry.is_set():
                    self.lost += len(batch)
                    log.warning("could not send %d tenant event(s): %s", len(batch), err)
                    return
                self._hurry.wait(min(2.0**attempt, 10.0))
            else:
                self.sent += len(batch)
                return
