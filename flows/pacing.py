"""Pacing a batch's Versori calls at its profile's `rate_limit_per_second`: in this process
on Prefect's temporary server, through a Prefect global concurrency limit on a server."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from prefect import get_run_logger

from flows.events import on_temporary_server
from onboarding.client import parse_retry_after
from onboarding.errors import InputError
from onboarding.pacing import Pacer, Spacing
from onboarding.profile import ConnectorProfile

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient


def rate_limit_name(profile: ConnectorProfile) -> str:
    return f"onboarding-rate-{profile.slug}"


def make_pacer(profile: ConnectorProfile) -> Pacer:
    """A pacer at the profile's `rate_limit_per_second`, if it sets one.

    Against a Prefect server, slots come from a Prefect global concurrency limit with slot
    decay, so the rate holds across every process and machine running the profile; the limit
    is created, or corrected, first (a missing one would not be enforced at all). Against
    Prefect's temporary server (no PREFECT_API_URL), no other process can share the limit: the
    pacer spaces calls in this process, which costs no API round trips."""
    rate = profile.rate_limit_per_second
    if rate is None:
        return Pacer()
    logger = get_run_logger()
    if on_temporary_server():
        logger.info(
            "Pacing at %g calls/s in this process (Prefect's temporary server: no other "
            "process shares it)",
            rate,
        )
        return Pacer(acquire=Spacing(rate))
    from prefect.client.orchestration import get_client

    name = rate_limit_name(profile)
    # Half a second's worth a block: the next block then has half a second to arrive, which a
    # busy server needs (with rate/5, 0.2 s, a 50/s run reached 92% of the rate, not 95%).
    block = max(1, math.ceil(rate / 2))
    # Capacity of one second's worth of calls (at least a block): slots free up continuously
    # at `rate` per second, and a burst never exceeds what the API accepts in a second.
    capacity = max(block, math.floor(rate))
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, capacity, slot_decay_per_second=rate)
        limit = client.read_global_concurrency_limit_by_name(name)
        if not limit.active:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=True))
    logger.info(
        "Pacing at %g calls/s across all runs of %s (global concurrency limit %r)",
        rate,
        profile.name,
        name,
    )
    return Pacer(acquire=SlotDispenser(name, rate, block))


log = logging.getLogger(__name__)

# Waits between tries of a failed slot request (transport error or 5xx): about 7.5 s in all.
SLOT_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)


class SlotDispenser:
    """Takes slots from the global limit `block` at a time and hands them out one by one, at
    most `rate` a second from this process.

    Why not `prefect.concurrency.sync.rate_limit(name, strict=True)` per call: measured here
    inside task runs, each of its calls took 1.8 s on average (it hops through Prefect's shared
    event loop, busy with every task run's events), so a 50/s profile ran at 5/s. This sends
    the same request to the same limit (`POST /v2/concurrency_limits/increment`, mode
    `rate_limit`) with the synchronous client, and honours the server's 423 + Retry-After the
    same way. A block of rate/2 slots needs about two requests a second; the next block is
    fetched in the background while the current one is spent, and the local spacing keeps a
    block from reaching the API as a burst. A fetch that fails on a transport error or a 5xx
    is retried (SLOT_RETRY_DELAYS); one that still fails fails only the callers waiting for
    that block, and the next caller fetches again."""

    def __init__(self, name: str, rate: float, block: int) -> None:
        self.name, self.block = name, block
        self._spacing = Spacing(rate)
        self._lock = threading.Lock()
        self._available = 0
        self._fetched = threading.Event()
        self._fetching = False
        self._error: BaseException | None = None

    def __call__(self) -> None:
        # One thread at a time refills; the others queue here.
        with self._lock:
            if self._available == 0:
                if not self._fetching:
                    self._prefetch()
                self._fetched.wait()
                self._fetching = False
                error, self._error = self._error, None
                if error is not None:
                    raise error
                self._available = self.block
                self._prefetch()  # the next block is on its way while this one is spent
            self._available -= 1
        self._spacing()

    def _prefetch(self) -> None:
        def fetch() -> None:
            try:
                self._take_block()
            except BaseException as err:  # handed to the caller that waits for this block
                self._error = err
            finally:
                self._fetched.set()

        self._fetched.clear()
        self._fetching = True
        threading.Thread(target=fetch, name=f"slots-{self.name}", daemon=True).start()

    def _take_block(self) -> None:
        """One block of slots. A transport error or a 5xx from the API is retried (a new
        client each time, after SLOT_RETRY_DELAYS), so one blip costs no caller its slot."""
        from httpx import HTTPStatusError, TransportError
        from prefect.client.orchestration import get_client

        delays = iter(SLOT_RETRY_DELAYS)
        while True:
            try:
                with get_client(sync_client=True) as client:
                    self._increment(client)
                return
            except (TransportError, ConnectionError, TimeoutError) as err:
                failure: BaseException = err
            except HTTPStatusError as err:
                if err.response.status_code < 500:
                    raise
                failure = err
            delay = next(delays, None)
            if delay is None:
                raise failure
            log.warning(
                "Slots of %s: the concurrency API failed (%s); retrying in %g s",
                self.name,
                type(failure).__name__,
                delay,
            )
            time.sleep(delay)

    def _increment(self, client: SyncPrefectClient) -> None:
        from httpx import HTTPStatusError

        while True:
            try:
                response = client.increment_concurrency_slots(
                    names=[self.name], slots=self.block, mode="rate_limit"
                )
            except HTTPStatusError as err:
                if err.response.status_code != 423:
                    raise
                # Clamped, as a Versori 429 is: an odd header never stalls pacing for long.
                wait = parse_retry_after(err.response.headers.get("Retry-After"))
                time.sleep(1.0 if wait is None else wait)
                continue
            if not response.json():  # strict: a limit that vanished is an error
                raise InputError(
                    f"the global concurrency limit {self.name!r} does not exist any more; "
                    "it is created at the start of each run"
                )
            return
