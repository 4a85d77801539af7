"""The ledger: one onboarding record per (tenant_id, connector_id), in SQLite or PostgreSQL.

It makes every run idempotent (a re-run skips tenants with a live link and retries the rest)
and answers "which tenant owns this state?" for the app's OAuth callback. Every write is one
statement in its own transaction, so a crash never leaves a half-written row. Its modules,
in reading order, are mapped in docs/architecture.md.
"""

from onboarding.ledger.connect_links import ConnectLink, Funnel, LinkOpens, funnel_lines
from onboarding.ledger.connect_states import ConnectState, StateOutcome
from onboarding.ledger.records import (
    EXPORT_KEYS,
    ConnectOutcome,
    ConnectResult,
    Record,
    SupersededLink,
)
from onboarding.ledger.schema import (
    DONE_STATUSES,
    LIVE_STATUSES,
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
from onboarding.ledger.store import Ledger

__all__ = [
    "DONE_STATUSES",
    "EXPORT_KEYS",
    "LIVE_STATUSES",
    "SENDING_CHANNELS",
    "WAITING_STATUSES",
    "ConnectLink",
    "ConnectOutcome",
    "ConnectResult",
    "ConnectState",
    "Funnel",
    "Ledger",
    "LinkOpens",
    "Record",
    "RunProgress",
    "StateOutcome",
    "Status",
    "SupersededLink",
    "batch_chunks",
    "funnel_lines",
    "records",
    "run_progress",
    "state_digest",
    "superseded_links",
]
