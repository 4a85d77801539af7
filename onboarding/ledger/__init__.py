"""The ledger: one onboarding record per (tenant_id, connector_id), in SQLite or PostgreSQL.

It makes every run idempotent (a re-run skips tenants with a live link and retries the rest)
and answers "which tenant owns this state?" for the app's OAuth callback. One `Database` per
process is shared by its parts, each typed: TenantRecords, ConnectLinks, ConnectStates,
RunCoordination, ChunkSummaries; `Ledger` is all of them over one database. Every write is one
statement in its own transaction, so a crash never leaves a half-written row. Its modules,
in reading order, are mapped in docs/architecture.md.
"""

from onboarding.ledger.chunk_summaries import ChunkSummaries
from onboarding.ledger.connect_links import (
    ConnectLink,
    ConnectLinks,
    Funnel,
    LinkOpens,
    LinkView,
    SeenLink,
    funnel_lines,
)
from onboarding.ledger.connect_states import (
    CallbackView,
    ConnectState,
    ConnectStates,
    StateOutcome,
)
from onboarding.ledger.database import Database
from onboarding.ledger.facade import Ledger
from onboarding.ledger.records import (
    EXPORT_KEYS,
    ConnectOutcome,
    ConnectResult,
    Record,
    SupersededLink,
)
from onboarding.ledger.run_coordination import RunCoordination
from onboarding.ledger.schema import (
    DONE_STATUSES,
    HELD_STATUSES,
    LIVE_STATUSES,
    LOST_STATUSES,
    SENDING_CHANNELS,
    WAITING_STATUSES,
    RunProgress,
    Status,
    batch_chunks,
    records,
    run_progress,
    state_digest,
    superseded_links,
)
from onboarding.ledger.tenant_records import TenantRecords
from onboarding.ledger.versori_view import Held, Settled, VersoriView

__all__ = [
    "DONE_STATUSES",
    "EXPORT_KEYS",
    "HELD_STATUSES",
    "LIVE_STATUSES",
    "LOST_STATUSES",
    "SENDING_CHANNELS",
    "WAITING_STATUSES",
    "CallbackView",
    "ChunkSummaries",
    "ConnectLink",
    "ConnectLinks",
    "ConnectOutcome",
    "ConnectResult",
    "ConnectState",
    "ConnectStates",
    "Database",
    "Funnel",
    "Held",
    "Ledger",
    "LinkOpens",
    "LinkView",
    "Record",
    "RunCoordination",
    "RunProgress",
    "SeenLink",
    "Settled",
    "StateOutcome",
    "Status",
    "SupersededLink",
    "TenantRecords",
    "VersoriView",
    "batch_chunks",
    "funnel_lines",
    "records",
    "run_progress",
    "state_digest",
    "superseded_links",
]
