"""Tenant events from the service (`onboarding.tenant.opened`, `.declined`, `.connected`), in
the shape of a batch's (onboarding/batch/tenant_events.py), POSTed to
`{PREFECT_API_URL}/events` with httpx: no Prefect import in the core. Sent from a background
thread, off the request path: a slow or absent Prefect API never slows or fails a page.
Nothing secret in an event: ids, the status, a provider's error code."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

import httpx

from onboarding.batch.tenant_events import api_headers
from onboarding.clock import utcnow

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
BATCH_MAX = 200
QUEUE_MAX = 10_000


class EventSender:
    """Queues events and sends them in batches; without PREFECT_API_URL it drops them (the
    ledger has every status). Never raises into its caller."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = (api_url or os.environ.get("PREFECT_API_URL") or "").rstrip("/")
        self._headers = api_headers(api_key)
        self._transport = transport
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.lost = 0
        self._pending = 0  # queued or being sent

    @property
    def enabled(self) -> bool:
        return bool(self.api_url)

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.lost += 1
            return
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="connect-events", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        with httpx.Client(headers=self._headers, timeout=10, transport=self._transport) as client:
            while True:
                batch = [self._queue.get()]
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(self._queue.get(timeout=FLUSH_SECONDS / 10))
                    except queue.Empty:
                        break
                try:
                    self._send(client, batch)
                finally:
                    with self._lock:
                        self._pending -= len(batch)

    def _send(self, client: httpx.Client, batch: list[dict[str, Any]]) -> None:
        for attempt in range(3):
            try:
                client.post(f"{self.api_url}/events", json=batch).raise_for_status()
            except httpx.HTTPError as err:
                if attempt == 2:
                    self.lost += len(batch)
                    # The error's type only: its text could name the API's URL with a key.
                    log.warning(
                        "could not send %d tenant event(s): %s", len(batch), type(err).__name__
                    )
                    return
                threading.Event().wait(0.5 * 2**attempt)
            else:
                self.sent += len(batch)
                return

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until the queue is empty: for tests and a clean stop."""
        deadline = utcnow().timestamp() + timeout
        while self._pending and utcnow().timestamp() < deadline:
            threading.Event().wait(0.05)
