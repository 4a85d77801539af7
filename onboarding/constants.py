"""Every tunable of the Versori client and the onboarding tasks, in one place."""

from __future__ import annotations

PRODUCTION_BASE_URL = "https://platform.versori.com/api/connect/v1"
STAGING_BASE_URL = "https://platform-staging.versori.com/api/connect/v1"

CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0
# An upper bound on one whole initialise call, read timeouts included: a server that trickles
# bytes could otherwise hold a worker for many read timeouts in a row.
CALL_DEADLINE_SECONDS = 60.0

# Retries live in the Prefect task (tasks/initialise.py), never in the client, so attempts do not
# multiply. These are the task's numbers.
TASK_RETRIES = 3
TASK_RETRY_BACKOFF_SECONDS = 1.0
TASK_RETRY_JITTER_FACTOR = 0.5
# A server asking us to wait longer than this is treated as "not now": the tenant fails for this
# run and the next run picks it up.
MAX_RETRY_AFTER_SECONDS = 120.0

DEFAULT_CONCURRENCY = 16
DEFAULT_LINK_TTL_HOURS = 72.0

# Parameters the initialise call sets itself; additionalParams may not carry them.
RESERVED_QUERY_KEYS = frozenset(
    {"redirect_uri", "state", "prompt", "scope", "response_type", "client_id"}
)

# Above this many tenants a roster runs as chunks, each a child flow run of its own.
CHUNK_SIZE = 1000
# The deployment (flow/deployment) that runs chunks when they fan out to a work pool.
CHUNK_DEPLOYMENT = "onboard-tenants-chunk/chunks"
