"""The services a scale-out stack or a benchmark runs on: a fresh PostgreSQL database of its own
(dropped on the way out), a Redis database of its own (claimed, empty, flushed on the way out),
and the Prefect server settings that put a server's broker, cache, lease storage and Docket on
that Redis."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

PG_ADMIN = os.environ.get("ONBOARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PG_SERVER = PG_ADMIN.rsplit("/", 1)[0]  # postgresql://user@host:port
REDIS_URL = os.environ.get("ONBOARD_BENCH_REDIS", "redis://127.0.0.1:6379")
# Set in each Redis database a stack uses, naming its owner ("host:pid:token"); the database
# is the stack's while the key is there and the owner lives (or for a day, at most).
REDIS_CLAIM_KEY = "onboard-scale-out:owner"
REDIS_CLAIM_SECONDS = 24 * 3600


def redis_address(url: str = REDIS_URL) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def redis_unavailable(url: str = REDIS_URL) -> str | None:
    """Why the Redis at `url` cannot serve a stack (it does not answer PING), or None."""
    import redis

    host, port = redis_address(url)
    try:
        client = redis.Redis(host=host, port=port, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as error:
        return f"Redis at {host}:{port} (ONBOARD_BENCH_REDIS) does not answer: {error}"
    return None


@contextmanager
def dedicated_redis_db(url: str = REDIS_URL) -> Iterator[int]:
    """A Redis database number no other stack uses: the first of 1..N-1 (0 is left to whoever
    uses the default) whose claim key is missing, or names a process of this host that has
    ended. It is emptied when claimed, and flushed on the way out. Yields its number."""
    import redis

    host, port = redis_address(url)
    admin = redis.Redis(host=host, port=port, socket_connect_timeout=3, decode_responses=True)
    try:
        count = int(str(admin.config_get("databases").get("databases", 16)))
    finally:
        admin.close()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    for db in range(1, count):
        client = redis.Redis(
            host=host, port=port, db=db, socket_connect_timeout=3, decode_responses=True
        )
        try:
            claimed = _claim_redis_db(client, owner)
        except BaseException:
            client.close()
            raise
        if not claimed:
            client.close()
            continue
        try:
            yield db
        finally:
            try:
                if client.get(REDIS_CLAIM_KEY) == owner:
                    client.flushdb()
            finally:
                client.close()
        return
    raise RuntimeError(f"every Redis database 1..{count - 1} at {host}:{port} is claimed")


# Set the claim if it still holds what was read (nothing, or a dead owner's claim): atomic.
_SWAP_CLAIM = (
    "local cur = redis.call('GET', KEYS[1]) "
    "if (not cur and ARGV[2] == '') or cur == ARGV[2] then "
    "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3]) return 1 end return 0"
)


def _claim_redis_db(client: Any, owner: str) -> bool:
    """Claim the client's database for `owner` and empty it (but for the claim), unless
    another live stack holds it."""
    held = client.get(REDIS_CLAIM_KEY)
    if held is not None and not _claim_is_stale(str(held), socket.gethostname()):
        return False
    if not client.eval(_SWAP_CLAIM, 1, REDIS_CLAIM_KEY, owner, held or "", REDIS_CLAIM_SECONDS):
        return False
    with client.pipeline(transaction=True) as pipe:
        pipe.flushdb()
        pipe.set(REDIS_CLAIM_KEY, owner, ex=REDIS_CLAIM_SECONDS)
        pipe.execute()
    return True


def _claim_is_stale(held: str, host: str) -> bool:
    """A claim "host:pid:token" of this host whose process has ended."""
    parts = held.split(":")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextmanager
def fresh_postgres_database(prefix: str = "onboard_bench") -> Iterator[str]:
    """A new, empty database on the local PostgreSQL (ONBOARD_BENCH_PG names the server and a
    database to connect to for admin), dropped on the way out. Yields its name; see `pg_url`."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_url(name: str, driver: str) -> str:
    """The URL of database `name` on the bench server, for SQLAlchemy `driver` (asyncpg for
    the Prefect server, psycopg for the ledger)."""
    return PG_SERVER.replace("postgresql://", f"postgresql+{driver}://", 1) + f"/{name}"


def redis_server_settings(url: str, db: int) -> dict[str, str]:
    """Prefect settings (environment variables) for a server on the Redis at `url`, database
    `db`, as Prefect's guide for a self-hosted server at scale gives them; names checked against
    prefect 3.9 (prefect/settings/models/server/) and prefect-redis 0.3 (prefect_redis/)."""
    host, port = redis_address(url)
    return {
        # ServerEventsSettings.messaging_broker / messaging_cache (these are their aliases)
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        # ServerEventsSettings.causal_ordering, ServerConcurrencySettings.lease_storage
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        # prefect_redis.client.RedisMessagingSettings
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": str(db),
        # ServerDocketSettings.url: the background services' scheduling (memory:// by default).
        # Its keys start with the docket's name, so it shares the stack's database.
        "PREFECT_SERVER_DOCKET_URL": f"redis://{host}:{port}/{db}",
        # ServerWorkerChannelSettings.cleanup_queue_storage (not in the guide): the
        # cancellation-cleanup service queues messages that the API hands to workers, in the
        # server's memory by default, which a separate services process does not share.
        # prefect_redis.cleanup_queue.RedisWorkerCleanupQueueSettings connects it.
        "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_HOST": host,
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PORT": str(port),
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_DB": str(db),
        # The Redis consumers read one message per round trip unless told otherwise
        # (read_batch_size, default 1), and the task run recorder writes one task run per
        # transaction (batch_size, default 1): batch both.
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": "100",
    }
