"""Run coordination: who works on a tenant now (claims under a run's lease), and a profile's
calls paced across every process on one ledger."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, func, or_, select

from onboarding.clock import utcnow
from onboarding.ledger.database import Repository
from onboarding.ledger.engine import reconnecting
from onboarding.ledger.queries import IN_LIST_MAX, in_parts
from onboarding.ledger.records import utc
from onboarding.ledger.schema import claims, paces, run_leases

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant_id, connector_id)

# A run's lease on its claims (ONBOARD_RUN_LEASE_SECONDS): renewed every quarter of it, it
# lapses that long after the last renewal, so a run killed without letting go (SIGKILL, a lost
# machine) frees its tenants then. A run stalled longer than that (its renewals failing) may
# see a tenant of its own taken over; the ledger's own guards (a write about a link lands only
# on that link) still hold.
RUN_LEASE_SECONDS = 20.0


class RunCoordination(Repository):
    """Claims and run leases (see schema.claims), and shared pacing (see reserve_calls)."""

    # Claims: who works on a tenant now (see schema.claims).

    @contextmanager
    def run_lease(self, run_id: str, seconds: float = RUN_LEASE_SECONDS) -> Iterator[None]:
        """Hold `run_id`'s lease while the block runs, renewed in the background (every
        quarter of `seconds`); on the way out, every claim of the run is let go and the lease
        dropped, so another run may take its tenants at once. Claims made without a lease are
        never valid to others."""
        self._renew_lease(run_id, seconds)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(seconds / 4):
                try:
                    self._renew_lease(run_id, seconds)
                except Exception as err:  # the next renewal tries again; the lease is long
                    log.warning("could not renew the run's ledger lease: %s", type(err).__name__)

        thread = threading.Thread(target=renew, name="ledger-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                self.end_run_lease(run_id)
            except Exception as err:  # its claims lapse with the lease anyway
                log.warning("could not let go of the run's claims: %s", type(err).__name__)

    def _renew_lease(self, run_id: str, seconds: float) -> None:
        until = utcnow() + timedelta(seconds=seconds)
        self.db.upsert(run_leases, {"run_id": run_id}, {"alive_until": until})

    @reconnecting
    def end_run_lease(self, run_id: str) -> None:
        """Let go of every claim of `run_id` and drop its lease."""
        with self.engine.begin() as conn:
            conn.execute(claims.delete().where(claims.c.run_id == run_id))
            conn.execute(run_leases.delete().where(run_leases.c.run_id == run_id))

    @reconnecting
    def claim(self, run_id: str, keys: Collection[Key], now: datetime | None = None) -> set[Key]:
        """Claim each (tenant, connector) of `keys` for `run_id`: one it holds already, one
        nobody holds, or one whose holder's lease has lapsed. Returns the keys `run_id` holds
        now; the others are another live run's. One statement decides each key, so two runs
        claiming the same tenant at once never both get it."""
        if not keys:
            return set()
        when = utc(now or utcnow())
        holder_alive = exists().where(
            run_leases.c.run_id == claims.c.run_id, run_leases.c.alive_until > when
        )
        # Three statements, not one upsert: an executemany INSERT ... ON CONFLICT DO UPDATE
        # WHERE is sent by SQLAlchemy as one multi-row INSERT, which on SQLite took over 1 of
        # 100 lapsed claims (seen in the crash-resume test). On PostgreSQL the UPDATE's row
        # locks make a second claimer re-check the row after the first commits (READ
        # COMMITTED), so it finds the holder alive and leaves it.
        rows = [
            {"tenant_id": t, "connector_id": c, "run_id": run_id, "claimed_at": when}
            for t, c in keys
        ]
        parts = list(_of_keys(keys))
        held: set[Key] = set()
        with self.engine.begin() as conn:
            for part in parts:
                conn.execute(
                    claims.update()
                    .where(part, or_(claims.c.run_id == run_id, ~holder_alive))
                    .values(run_id=run_id, claimed_at=when)
                )
            conn.execute(self.db.insert(claims).on_conflict_do_nothing(), rows)
            for part in parts:
                query = select(claims.c.tenant_id, claims.c.connector_id).where(
                    claims.c.run_id == run_id, part
                )
                held.update((t, c) for t, c in conn.execute(query))
        return held

    @reconnecting
    def release(self, run_id: str, keys: Collection[Key]) -> None:
        """Let go of `run_id`'s claims on `keys` (the tenants it has decided)."""
        with self.engine.begin() as conn:
            for part in _of_keys(keys):
                conn.execute(claims.delete().where(claims.c.run_id == run_id, part))

    # Pacing: a profile's calls spaced across every process on this ledger.

    @reconnecting
    def reserve_calls(
        self, name: str, calls: int, interval: float, hold: float = 0.0
    ) -> tuple[float, float]:
        """Reserve the next `calls` call times of pace `name`, `interval` seconds apart, after
        any time another process reserved (and, with `hold`, no sooner than `hold` seconds
        from now). Returns when the first of them is and when the reservation was made, both
        on the database's clock.

        The virtual-scheduling form of GCRA, one UPDATE: every process's reservations are
        disjoint stretches of one timeline, so calls are spaced `interval` apart however many
        processes share the pace, and a process that was idle or stalled gets no catch-up
        burst (time that went by unused is never handed out). The database's clock is the
        timeline, so machines' clocks need not agree."""
        now = self.db.now()
        start = (func.greatest if self.db.postgres else func.max)(paces.c.next_at, now + hold)
        seed = self.db.insert(paces).values(name=name, next_at=0.0).on_conflict_do_nothing()
        stmt = (
            paces.update()
            .where(paces.c.name == name)
            .values(next_at=start + calls * interval)
            .returning(paces.c.next_at, now)
        )
        with self.engine.begin() as conn:
            conn.execute(seed)
            next_at, at = conn.execute(stmt).one()
        return float(next_at) - calls * interval, float(at)


def _of_keys(keys: Collection[Key]) -> Iterator[ColumnElement[bool]]:
    """The claims of `keys`, as conditions of one connector and at most IN_LIST_MAX tenants
    each: `connector_id = ? AND tenant_id IN (...)`. A run's keys share their connector, and
    a list of tenant ids costs SQLAlchemy half what a list of (tenant, connector) pairs did
    (13 us a key to claim, the most of a slice's ledger work; bench/run.py)."""
    by_connector: dict[str, list[str]] = {}
    for tenant_id, connector_id in keys:
        by_connector.setdefault(connector_id, []).append(tenant_id)
    for connector_id, tenant_ids in by_connector.items():
        for part in in_parts(tenant_ids, IN_LIST_MAX):
            yield and_(claims.c.connector_id == connector_id, claims.c.tenant_id.in_(part))
