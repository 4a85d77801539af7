"""Every tunable of the Versori client and the onboarding tasks, in one place."""

from __future__ import annotations

PRODUCTION_BASE_URL = "https://platform.versori.com/api/connect/v1"
STAGING_BASE_URL = "https://platform-staging.versori.com/api/connect/v1"

# The two APIs a profile can name (its `api` key): the Connect API v1 (a connector's id) and the
# Platform API v2, whose twin of the initialise call sits under a system's id.
CONNECT_V1 = "connect-v1"
PLATFORM_V2 = "platform-v2"
PLATFORM_V2_BASE_URL = "https://platform.versori.com/api/v2"
PLATFORM_V2_STAGING_BASE_URL = "https://platform-staging.versori.com/api/v2"
# The base URL each API is called at when VERSORI_BASE_URL is not set.
PRODUCTION_BASE_URLS = {CONNECT_V1: PRODUCTION_BASE_URL, PLATFORM_V2: PLATFORM_V2_BASE_URL}

CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0
# An upper bound on one whole initialise call, read timeouts included: a server that trickles
# bytes could otherwise hold a worker for many read timeouts in a row.
CALL_DEADLINE_SECONDS = 60.0
# An idle pooled connection is dropped after this long. httpx's default (5 s) equals uvicorn's
# keep-alive timeout, so a connection idle for 5 s could be reused just as the server closed it
# ("Server disconnected without sending a response"): a failed attempt that never reached the
# server. Shorter than the usual server timeouts (uvicorn 5 s, nginx 75 s, AWS ALB 60 s).
KEEPALIVE_EXPIRY_SECONDS = 2.0

# Retries live in the Prefect task (tasks/slice_tasks.py), never in the client, so attempts do not
# multiply. These are the task's numbers.
TASK_RETRIES = 3
TASK_RETRY_BACKOFF_SECONDS = 1.0
TASK_RETRY_JITTER_FACTOR = 0.5
# A tenant's whole time in a run (its calls, backoffs and Retry-After waits): no new try starts
# after this many seconds, so a tenant takes at most this plus one call (CALL_DEADLINE_SECONDS).
TENANT_DEADLINE_SECONDS = 300.0
# Distinct tenants in a row that must fail with the same 401, 403 or 404 (no success between
# them) before a batch stops; one such answer alone fails only its tenant.
STOP_AFTER = 3
# The longest wait a Retry-After gets: a longer one (or a date far off) is taken as this, so a
# hostile or broken server cannot stall the batch.
MAX_RETRY_AFTER_SECONDS = 120.0

DEFAULT_CONCURRENCY = 16
DEFAULT_LINK_TTL_HOURS = 72.0

# Parameters the initialise call sets itself; additionalParams may not carry them.
RESERVED_QUERY_KEYS = frozenset(
    {"redirect_uri", "state", "prompt", "scope", "response_type", "client_id"}
)

# With fan-out to a work pool, a roster of more tenants than this runs as chunks of this many,
# each a run of the chunk deployment (flow/deployment) below.
CHUNK_SIZE = 1000
CHUNK_DEPLOYMENT = "onboard-tenants-chunk/chunks"
# How long the parent waits for its chunk runs before cancelling the rest.
CHUNK_DEADLINE_MINUTES = 24 * 60.0

# Words that make a URL query key (or a database URL's) hold a credential: its value is never
# shown, and a roster URL with one is never kept as a flow parameter on a server.
SECRET_QUERY_WORDS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "sig",
    "credential",
    "auth",
)
