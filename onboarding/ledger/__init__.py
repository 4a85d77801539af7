"""The ledger: one onboarding record per (tenant_id, connector_id), in SQLite or PostgreSQL.

It makes every run idempotent (a re-run skips tenants with a live link and retries the rest)
and answers "which tenant owns this state?" for the app's OAuth callback. Every write is one
statement in its own transaction, so a crash never leaves a half-written row.

Read in this order: `schema` (the tables and statuses), `records` (what a read hands back),
`engine` (opening the database), `queries` (the reads), `store` (`Ledger`: the writes;
`link_sql`, the statements of its most frequent one),
`group_commit` (concurrent link writes committed together); `connect_links` (durable connect
links and the OAuth callback's writes, for onboard connect-server); `connect_states` (each
state the service minted or claimed, bound to its browser, and what became of it).
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
    Status,
    batch_chunks,
    records,
    state_digest,
    superseded_links,
)
from onboarding.ledger.store import Ledger

__all__ = [
    "DONE_STATUSES",
    "EXPORT_KEYS",
    "LIVE_STATUSES",
    "SENDING_CHANNELS",
    "ConnectLink",
    "ConnectOutcome",
    "ConnectResult",
    "ConnectState",
    "Funnel",
    "Ledger",
    "LinkOpens",
    "Record",
    "StateOutcome",
    "Status",
    "SupersededLink",
    "batch_chunks",
    "funnel_lines",
    "records",
    "state_digest",
    "superseded_links",
]
