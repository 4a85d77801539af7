"""A real scale-out stack on this machine: a `prefect server` on PostgreSQL, the emulator, a
process work pool `onboarding` with the `chunks` deployment of prefect.yaml, and W workers, each
its own process with its own Prefect home, sharing one PostgreSQL ledger.

    with ScaleOutStack(tmp, workers=2) as stack:
        result = stack.run_batch(5000, chunk_size=500)
        result.exit_code, result.seconds, result.workers_by_chunk()

Which worker ran which chunk run: the worker that wins a run labels it `prefect.worker.name`
(Prefect 3.9's BaseWorker, after it set the run Pending), read back through the API; the
workers' own logs are a second witness (`claims_in_worker_logs`).

Used by tests/test_scale_out.py and by `bench/run.py --workers W`. Every process is started
with `tests.helpers.child`, so each is stopped on the way out, failures included, and both
databases are dropped.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from onboarding.emulator import DEFAULT_API_KEY  # noqa: E402
from tests.helpers import (  # noqa: E402
    base_env,
    child,
    free_port,
    prefect_server,
    wait_for_http,
)

BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("ONBOARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PG_SERVER = PG_ADMIN.rsplit("/", 1)[0]  # postgresql://user@host:port
POOL = "onboarding"
CHUNK_DEPLOYMENT = "onboard-tenants-chunk/chunks"
# Relative to the project folder, where each worker's flow runs start (the pull step of
# prefect.yaml sets the working directory to ONBOARD_PROJECT_DIR).
PROFILE = "examples/profile.yaml"
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"  # connector_id of examples/profile.yaml
# What a Prefect 3.9 worker logs for each run it tries to take (BaseWorker._submit_run), and
# when another worker set it Pending first (BaseWorker._propose_pending_state).
SUBMITTING = re.compile(r"Worker '(?P<worker>[^']+)' submitting flow run '(?P<id>[0-9a-f-]{36})'")
ABORTED = re.compile(r"Aborted submission of flow run '([0-9a-f-]{36})'")


def write_roster(path: Path, n: int, prefix: str = "b") -> None:
    """A CSV roster of `n` generated tenants for examples/profile.yaml."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i in range(n):
            w.writerow(
                [f"{prefix}{i:07d}", f"Bench {i}", f"admin{i}@bench.example.com", f"bench{i}"]
            )


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


@dataclass(frozen=True)
class ChunkRun:
    id: str
    name: str
    state: str
    worker: str | None  # the `prefect.worker.name` label the worker gave the run
    batch_id: str
    chunk: int
    started: datetime | None
    ended: datetime | None


@dataclass
class BatchResult:
    exit_code: int
    seconds: float
    output: str
    chunk_runs: list[ChunkRun] = field(default_factory=list)
    # flow run id -> worker name, from the workers' own log lines (a second witness)
    claimed_in_logs: dict[str, str] = field(default_factory=dict)

    def workers_by_chunk(self) -> dict[int, str | None]:
        return {run.chunk: run.worker for run in sorted(self.chunk_runs, key=lambda r: r.chunk)}

    def chunks_per_worker(self) -> Counter[str | None]:
        return Counter(run.worker for run in self.chunk_runs)

    def chunk_window(self) -> float | None:
        """Seconds from the first chunk run's start to the last one's end."""
        starts = [r.started for r in self.chunk_runs if r.started]
        ends = [r.ended for r in self.chunk_runs if r.ended]
        if not starts or not ends:
            return None
        return (max(ends) - min(starts)).total_seconds()

    def mean_chunk_seconds(self) -> float | None:
        """The mean time a chunk run spent Running (its flow function; process start not
        included)."""
        spans = [
            (r.ended - r.started).total_seconds() for r in self.chunk_runs if r.started and r.ended
        ]
        return sum(spans) / len(spans) if spans else None


class ScaleOutStack:
    """See the module docstring. `worker_limit` is each worker's `--limit` (flow runs at once):
    keep it small so that one worker cannot take every chunk."""

    def __init__(
        self,
        tmp: Path,
        workers: int,
        *,
        worker_limit: int = 1,
        latency_ms: float = 0.0,
        rate_limit: float | None = None,
        query_seconds: float = 1.0,
    ) -> None:
        if workers < 1:
            raise ValueError("a scale-out stack needs at least one worker")
        self.tmp = tmp
        self.workers = workers
        self.worker_limit = worker_limit
        self.latency_ms = latency_ms
        self.rate_limit = rate_limit
        self.query_seconds = query_seconds
        self._stack = ExitStack()
        self.api = ""
        self.emulator_url = ""
        self.ledger_url = ""
        self.worker_logs: list[Path] = []
        self._worker_procs: list[subprocess.Popen[bytes]] = []
        self.timings: dict[str, float] = {}
        self._batches = 0

    # -- set-up --------------------------------------------------------------------------

    def __enter__(self) -> ScaleOutStack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _timed(self, step: str, started: float) -> None:
        self.timings[step] = round(time.monotonic() - started, 1)

    def _start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        enter = self._stack.enter_context
        t = time.monotonic()
        prefect_db = enter(fresh_postgres_database("onboard_scale_prefect"))
        ledger_db = enter(fresh_postgres_database("onboard_scale_ledger"))
        self.ledger_url = pg_url(ledger_db, "psycopg")
        port = free_port()
        command = [
            str(BIN / "onboard"),
            "emulator",
            "--port",
            str(port),
            "--latency-ms",
            str(self.latency_ms),
        ]
        if self.rate_limit:
            command += ["--rate-limit", str(self.rate_limit)]
        # The emulator starts while the server does; it is waited for after.
        emulator = enter(child(command, base_env(self.tmp), self.tmp / "emulator.log"))
        self.emulator_url = f"http://127.0.0.1:{port}"
        self.api = enter(
            prefect_server(
                self.tmp,
                database_url=pg_url(prefect_db, "asyncpg"),
                log=self.tmp / "prefect-server.log",
            )
        )
        wait_for_http(f"{self.emulator_url}/healthz", proc=emulator)
        self._timed("server_and_emulator", t)

        t = time.monotonic()
        self._prefect("work-pool", "create", POOL, "--type", "process")
        # The deployment is registered while the workers start: they only need the pool.
        deploy_log = self.tmp / "deploy.log"
        deploy = enter(
            child(
                [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "chunks"],
                self.env("cli-home"),
                deploy_log,
            )
        )
        for i in range(1, self.workers + 1):
            name = f"worker-{i}"
            log = self.tmp / f"{name}.log"
            env = self.env(f"{name}-home")
            env["PREFECT_WORKER_QUERY_SECONDS"] = f"{self.query_seconds:g}"
            worker = enter(
                child(
                    [
                        str(BIN / "prefect"),
                        "worker",
                        "start",
                        "--pool",
                        POOL,
                        "--name",
                        name,
                        "--limit",
                        str(self.worker_limit),
                    ],
                    env,
                    log,
                )
            )
            self.worker_logs.append(log)
            self._worker_procs.append(worker)
        if deploy.wait(timeout=300) != 0:
            raise RuntimeError(
                f"prefect deploy exited {deploy.returncode}:\n{deploy_log.read_text()}"
            )
        self._wait_for_workers()
        self._timed("pool_deploy_and_workers", t)

    def env(self, home: str) -> dict[str, str]:
        """What a flow run of this stack needs, with a Prefect home of its own under tmp."""
        env = base_env(self.tmp)
        env.update(
            PREFECT_HOME=str(self.tmp / home),
            PREFECT_API_URL=self.api,
            VERSORI_BASE_URL=self.emulator_url,
            # The deployment's job variables name a Secret block; the key itself wins over it.
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=self.ledger_url,
            ONBOARD_PROJECT_DIR=str(PROJECT),
        )
        return env

    def _prefect(self, *args: str) -> None:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            env=self.env("cli-home"),
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )

    def _wait_for_workers(self, timeout: float = 120) -> None:
        """Until every worker has said hello to the pool (its first poll), so a batch does not
        start with one worker up and the other still importing Prefect."""
        wanted = {f"worker-{i}" for i in range(1, self.workers + 1)}
        deadline = time.monotonic() + timeout
        online: set[str] = set()
        while time.monotonic() < deadline:
            for proc, log in zip(self._worker_procs, self.worker_logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{log.stem} exited {proc.returncode}:\n{log.read_text(errors='replace')}"
                    )
            response = httpx.post(f"{self.api}/work_pools/{POOL}/workers/filter", json={})
            if response.status_code == 200:
                online = {w["name"] for w in response.json()}
                if wanted <= online:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"workers {sorted(wanted - online)} did not reach the pool in time")

    # -- running -------------------------------------------------------------------------

    def run_batch(
        self,
        roster: Path | int,
        *,
        chunk_size: int,
        concurrency: int = 16,
        profile: str = PROFILE,
        timeout: float = 1800,
        extra: tuple[str, ...] = (),
    ) -> BatchResult:
        """`onboard run … --fan-out deployment` as its own process (it takes no worker slot).
        `roster` is a CSV path, or a number of tenants to generate. Returns when it exits."""
        self._batches += 1
        if isinstance(roster, int):
            path = self.tmp / f"roster-{self._batches}.csv"
            write_roster(path, roster)
            roster = path
        before = {run["id"] for run in self._chunk_flow_runs()}
        command = [
            str(BIN / "onboard"),
            "run",
            "--roster",
            str(roster.resolve()),  # the workers run from another folder
            "--profile",
            profile,
            "--chunk-size",
            str(chunk_size),
            "--fan-out",
            "deployment",
            "--concurrency",
            str(concurrency),
            *extra,
        ]
        log = self.tmp / f"batch-{self._batches}.log"
        started = time.monotonic()
        with child(command, self.env(f"batch-{self._batches}-home"), log) as proc:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = -1  # child() kills it on the way out
        seconds = time.monotonic() - started
        runs = [run for run in self._chunk_flow_runs() if run["id"] not in before]
        return BatchResult(
            exit_code=code,
            seconds=seconds,
            output=log.read_text(errors="replace"),
            chunk_runs=[_chunk_run(run) for run in runs],
            claimed_in_logs=self.claims_in_worker_logs(),
        )

    def _chunk_flow_runs(self) -> list[dict[str, Any]]:
        deployment = httpx.get(f"{self.api}/deployments/name/{CHUNK_DEPLOYMENT}", timeout=30)
        deployment.raise_for_status()
        runs: list[dict[str, Any]] = []
        while True:
            page = httpx.post(
                f"{self.api}/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [deployment.json()["id"]]}},
                    "limit": 200,
                    "offset": len(runs),
                    "sort": "EXPECTED_START_TIME_ASC",
                },
                timeout=30,
            )
            page.raise_for_status()
            runs += page.json()
            if len(page.json()) < 200:
                return runs

    def claims_in_worker_logs(self) -> dict[str, str]:
        """flow run id -> the worker whose log says it took that run. Two workers can both log
        "submitting" for one run: the loser of the race to set it Pending then logs "Aborted
        submission", so those runs are not its. Should two workers still claim one run, both
        names are given, joined by "+"."""
        claims: dict[str, set[str]] = {}
        for log in self.worker_logs:
            text = log.read_text(errors="replace")
            aborted = set(ABORTED.findall(text))
            for match in SUBMITTING.finditer(text):
                if match["id"] not in aborted:
                    claims.setdefault(match["id"], set()).add(match["worker"])
        return {run: "+".join(sorted(workers)) for run, workers in claims.items()}

    def server_dropped_events(self) -> int:
        """Events the Prefect server dropped because a subscriber's queue was full (its log
        says "Subscription queue is full"): task-run states that never reach its database."""
        log = self.tmp / "prefect-server.log"
        return log.read_text(errors="replace").count("Subscription queue is full")

    def task_runs_recorded(self, flow_run_ids: list[str], settle: float = 10.0) -> int:
        """How many Completed task runs the server holds for these flow runs, once the count
        has stopped moving (task runs are recorded from events, after the fact)."""
        body = {
            "flow_runs": {"id": {"any_": flow_run_ids}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        }
        last, deadline = -1, time.monotonic() + 120
        while time.monotonic() < deadline:
            count = int(httpx.post(f"{self.api}/task_runs/count", json=body, timeout=60).json())
            if count == last:
                return count
            last = count
            time.sleep(settle)
        return last

    def emulator_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.emulator_url}/_emulator/stats").json()
        return stats

    def reset_emulator(self) -> None:
        httpx.post(f"{self.emulator_url}/_emulator/reset").raise_for_status()


def _chunk_run(run: dict[str, Any]) -> ChunkRun:
    state = run.get("state") or {}
    params = run.get("parameters") or {}
    return ChunkRun(
        id=str(run["id"]),
        name=str(run["name"]),
        state=str(state.get("type", "UNKNOWN")),
        worker=(run.get("labels") or {}).get("prefect.worker.name"),
        batch_id=str(params.get("batch_id", "")),
        chunk=int(params.get("chunk", -1)),
        started=_when(run.get("start_time")),
        ended=_when(run.get("end_time")),
    )


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
