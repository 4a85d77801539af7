"""Scale-out for real: one roster of 2,000 tenants split into 2 chunk flow runs of the
`onboard-tenants-chunk/chunks` deployment, run by two `prefect worker start` processes on a
process work pool, against a `prefect server` (on PostgreSQL, with Redis for its messaging) and
a ledger on PostgreSQL. The batch's parent is `onboard run --fan-out deployment` in a process of
its own. Every process is stopped on the way out, failures included (bench/scale_out.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bench.scale_out import CONNECTOR, ScaleOutStack
from bench.services import redis_unavailable
from flows.batching.slices import tenants_per_task
from onboarding.ledger import Ledger, Status, batch_chunks

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]

# One chunk a worker (each runs one at a time, so neither can take both): what the test checks
# needs a chunk on each worker, not many, and each chunk run is a fresh Python process. The
# 5,000-tenant batch is bench/run.py --workers 2 --tenants 5000.
TENANTS = 2000
CHUNK_SIZE = 1000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ScaleOutStack]:
    try:
        import psycopg

        from bench.services import PG_ADMIN

        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
    except Exception as error:
        pytest.skip(f"no PostgreSQL for the scale-out stack: {error}")
    if why := redis_unavailable():
        pytest.skip(f"no Redis for the scale-out stack's Prefect server: {why}")
    with ScaleOutStack(tmp_path, workers=2, worker_limit=1, latency_ms=5) as stack:
        yield stack


def test_one_roster_fans_out_over_two_workers(stack: ScaleOutStack) -> None:
    result = stack.run_batch(TENANTS, chunk_size=CHUNK_SIZE, concurrency=16)
    assert result.exit_code == 0, result.output[-4000:]
    assert f"{TENANTS} tenant(s) in" in result.output

    runs = result.chunk_runs
    assert sorted(run.chunk for run in runs) == list(range(TENANTS // CHUNK_SIZE)), runs
    assert len({run.batch_id for run in runs}) == 1, "one batch"
    assert {run.state for run in runs} == {"COMPLETED"}, runs
    # Which worker ran each chunk: the label the worker put on the run, which its log confirms.
    assert all(run.worker for run in runs), runs
    assert {run.id: run.worker for run in runs} == {
        run.id: result.claimed_in_logs.get(run.id) for run in runs
    }
    per_worker = result.chunks_per_worker()
    assert set(per_worker) == {"worker-1", "worker-2"}, per_worker

    stats = stack.emulator_stats()
    assert stats["requests"] == TENANTS, stats  # each tenant initialised exactly once
    assert stats["by_status"] == {"200": TENANTS}, stats

    # The server keeps every task run (each chunk's slices: 8 of 125) and every tenant event,
    # and logged no dropped or failed message (PostgreSQL, Redis broker, recorder batch size 100).
    chunk_ids = [run.id for run in runs]
    slices = TENANTS // CHUNK_SIZE * -(-CHUNK_SIZE // tenants_per_task(CHUNK_SIZE))
    assert slices == 16
    assert stack.task_runs_recorded(chunk_ids, expected=slices) == slices
    deadline = time.monotonic() + 90  # events are stored a moment after the batch ends
    while (events := stack.count_events("onboarding.tenant.delivered")) < TENANTS:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert events == TENANTS
    assert stack.count_events("onboarding.tenant.delivered", walk=True) == TENANTS
    assert stack.server_dropped_messages() == 0, stack.server_log()[-4000:]

    ledger = Ledger(stack.ledger_url)
    try:
        records = list(ledger.iter_records(CONNECTOR))
        assert len(records) == TENANTS
        assert len({r.tenant_id for r in records}) == TENANTS
        assert {r.status for r in records} == {Status.DELIVERED}
        assert all(r.url for r in records)
        # Exact: the client drops idle connections before the emulator's keep-alive ends, the
        # race that once cost a retry (and a second attempt) without a second call.
        assert {r.attempts for r in records} == {1}
        with ledger.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(batch_chunks)).scalar_one() == 0
    finally:
        ledger.close()
