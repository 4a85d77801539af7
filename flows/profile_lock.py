"""One batch at a time per profile: the runs that write a profile's ledger rows (onboard-tenants
parents and remind-tenants, from any deployment) share one Prefect global concurrency limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

from flows.events import on_temporary_server
from onboarding.profile import ConnectorProfile

# Slots the limit is created with. It is never corrected afterwards: an operator who wants two
# batches of a profile at once raises it in the UI (Concurrency, Global).
DEFAULT_SLOTS = 1
# A run holds its slot for hours; Prefect renews the lease in the background meanwhile (every
# 3/4 of it). A run that dies without letting go (SIGKILL, a lost machine) holds its slot until
# the lease runs out and the server's repossessor next runs: 60 s (the least the API accepts)
# + at most 15 s by default.
LEASE_SECONDS = 60


def ledger_limit_name(profile: ConnectorProfile) -> str:
    return f"onboarding-ledger-{profile.slug}"


@contextmanager
def one_batch_per_profile(profile: ConnectorProfile) -> Iterator[bool]:
    """Hold a slot of `onboarding-ledger-<profile>` while the batch runs, waiting for one.

    Why, now that the ledger keeps every state under concurrent writers: two batches of one
    profile that overlap would each initialise the tenants the other has not recorded yet,
    issuing two links to one admin; the second waits instead, then skips what the first did.
    Chunk runs take no slot: their parent holds it. On Prefect's temporary server no other
    process shares the limit, so nothing is taken. Yields whether it waited."""
    if on_temporary_server():
        yield False
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = ledger_limit_name(profile)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # ObjectNotFound: create it; a concurrent creator may win the race
            try:
                client.upsert_global_concurrency_limit_by_name(name, DEFAULT_SLOTS)
            except Exception:
                client.read_global_concurrency_limit_by_name(name)
    get_run_logger().info("Taking a slot of %r (one batch of %s at a time)", name, profile.name)
    asked = time.monotonic()
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS, strict=True):
        waited = time.monotonic() - asked
        if waited > 1:
            get_run_logger().info("Waited %.0f s for another batch of %s", waited, profile.name)
        yield waited > 1
