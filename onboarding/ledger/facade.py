"""`Ledger`: every part of the ledger over one database, for callers that use several.

A job that needs one part may take that part's type (TenantRecords, ConnectLinks,
ConnectStates, RunCoordination, ChunkSummaries, VersoriView): a Ledger is each of them, and
each can stand alone over a shared `Database`."""

from __future__ import annotations

from sqlalchemy import Engine

from onboarding.ledger.chunk_summaries import ChunkSummaries
from onboarding.ledger.connect_links import ConnectLinks
from onboarding.ledger.connect_states import ConnectStates
from onboarding.ledger.database import Database
from onboarding.ledger.run_coordination import RunCoordination
from onboarding.ledger.tenant_records import TenantRecords
from onboarding.ledger.versori_view import VersoriView


class Ledger(
    TenantRecords, ConnectLinks, ConnectStates, RunCoordination, ChunkSummaries, VersoriView
):
    """The ledger at `url` (or over an open Database). Thread-safe: one per process, passed
    down to what needs it, closed once (a context manager)."""

    def __init__(self, url: str | Database) -> None:
        super().__init__(url if isinstance(url, Database) else Database(url))

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def postgres(self) -> bool:
        return self.db.postgres

    @property
    def engine(self) -> Engine:
        return self.db.engine

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
