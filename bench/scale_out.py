"""A real scale-out stack on this machine: a `prefect server` on PostgreSQL, the emulator, a
process work pool `onboarding` with the `chunks` deployment of prefect.yaml, and W workers, each
its own process with its own Prefect home, sharing one PostgreSQL ledger.

    with ScaleOutStack(tmp, workers=2) as stack:
        result = stack.run_batch(5000, chunk_size=500)
        result.exit_code, result.seconds, result.workers_by_chunk()

Which worker ran which chunk run: the worker that wins a run labels it `prefect.worker.name`
(Prefect 3.9's BaseWorker, after it set the run Pending), read back through the API; the
workers' own logs are a second witness (`claims_in_worker_logs`).

The server follows Prefect's guide for a self-hosted server at scale: PostgreSQL; Redis (the
`prefect-redis` integration) for its messaging broker and cache, causal ordering, lease storage
and Docket, instead of the in-memory broker, which drops events under load ("Subscription queue
is full"); its API (`prefect server start --no-services`) and its background services (`prefect
server services start`) in two processes. Each stack claims a Redis database of its own
(`dedicated_redis_db` in bench/services.py), empty at the start and flushed on the way out, so
two stacks never share streams. ONBOARD_BENCH_REDIS names the Redis server (default redis://127.0.0.1:6379).
Workers and clients need no Redis setting: they reach the broker only through the server's API.

Used by tests/e2e/test_scale_out.py and by `bench/run.py --workers W`. Every process is started
with `demo.processes.child`, so each is stopped on the way out, failures included, and both
databases are dropped.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from bench.services import (  # noqa: E402
    REDIS_URL,
    dedicated_redis_db,
    fresh_postgres_database,
    pg_url,
    redis_server_settings,
)
from demo.emulator import DEFAULT_API_KEY  # noqa: E402
from demo.processes import (  # noqa: E402
    base_env,
    child,
    free_port,
    prefect_server,
    wait_for_http,
)

BIN = Path(sys.executable).parent
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
# Log lines of a Prefect 3.9 server (prefect-redis 0.3) that show a message dropped, or failed
# and left for a retry. The server logs at WARNING and above by default, so only those count.
DROPPED_OR_FAILED = re.compile(
    "|".join(
        re.escape(text)
        for text in (
            # the in-memory broker (prefect.server.utilities.messaging.memory)
            "Subscription queue is full",  # ", dropping message for topic=…"
            "will be moved to the dead letter queue",
            "Failed to write message to dead letter queue",
            "Failed in consume_loop",  # a handler raised; the message is retried
            # the Redis broker (prefect_redis.messaging)
            "sending to dead letter queue",  # "Message could not be processed after N retries"
            "Error handling message",  # a handler raised; the message stays pending, is retried
            "Error processing pending messages",
            "Failed to read from stream",
            # the task run recorder (prefect.server.services.task_run_recorder)
            "Error flushing",  # "Error flushing N events (R to retry, D dropped)"
            "Dropping event",  # "… after N failed attempts"
            "Duplicate task_run, discarding event",
            # the event persister (prefect.server.events.services.event_persister)
            "Max flush retries",  # "(N) reached, dropping M events"
            "Event queue full",  # "(n/max), dropping event id=…" or "… events that failed"
        )
    )
)


def write_roster(path: Path, n: int, prefix: str = "b") -> None:
    """A CSV roster of `n` generated tenants for examples/profile.yaml."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i in range(n):
            w.writerow(
                [f"{prefix}{i:07d}", f"Bench {i}", f"admin{i}@bench.example.com", f"bench{i}"]
            )


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
    keep it small so that one worker cannot take every chunk. The server's API and its
    background services run as two processes (`separate_services`), as the guide advises: on
    2 cores, with one worker up, that took in a flood of 20,000 events in 34 to 53 s instead of
    81 to 96 s, and had them all stored 62 to 78 s after the first instead of 87 to 99 s (4
    runs each). `redis_url=None` starts one server process on Prefect's in-memory broker
    instead (as before Redis, to compare: it stored 10,860 of those 20,000 events)."""

    def __init__(
        self,
        tmp: Path,
        workers: int,
        *,
        worker_limit: int = 1,
        latency_ms: float = 0.0,
        rate_limit: float | None = None,
        query_seconds: float = 1.0,
        redis_url: str | None = REDIS_URL,
        separate_services: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError("a scale-out stack needs at least one worker")
        self.tmp = tmp
        self.workers = workers
        self.worker_limit = worker_limit
        self.latency_ms = latency_ms
        self.rate_limit = rate_limit
        self.query_seconds = query_seconds
        self.redis_url = redis_url
        # The services need a broker and Docket that both processes reach.
        self.separate_services = separate_services and redis_url is not None
        self.redis_db: int | None = None
        # The Prefect settings the server was started with, beyond its home and database.
        self.server_settings: dict[str, str] = {}
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
        if self.redis_url is not None:
            self.redis_db = enter(dedicated_redis_db(self.redis_url))
            self.server_settings = redis_server_settings(self.redis_url, self.redis_db)
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
                env=self.server_settings,
                separate_services=self.separate_services,
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
            ONBOARD_FILES_ROOT=str(self.files_root),
        )
        return env

    @property
    def files_root(self) -> Path:
        """Where the batch's roster and profile lie: the folder above tmp (bench/run.py puts
        its roster and profile there, the test its tmp_path's files)."""
        return self.tmp.parent

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
        # Chunk runs start through a deployment, so they read local files only under
        # ONBOARD_FILES_ROOT (the folder above tmp, see env()): the profile goes there too.
        source = Path(profile) if Path(profile).is_absolute() else PROJECT / profile
        if not source.resolve().is_relative_to(self.files_root.resolve()):
            copied = self.tmp / f"profile-{self._batches}.yaml"
            copied.write_bytes(source.read_bytes())
            profile = str(copied)
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

    def server_log(self) -> str:
        """The server's log, then its separate services' log if they have one."""
        logs = [self.tmp / "prefect-server.log", self.tmp / "prefect-server-services.log"]
        return "".join(log.read_text(errors="replace") for log in logs if log.exists())

    def server_dropped_events(self) -> int:
        """Events the Prefect server dropped because a subscriber's queue was full (its log
        says "Subscription queue is full"): task-run states that never reach its database.
        Only the in-memory broker has such a queue; see `server_dropped_messages`."""
        return self.server_log().count("Subscription queue is full")

    def server_dropped_messages(self) -> int:
        """Lines of the server's log that show a message dropped, or failed and retried, by
        the broker (in-memory or Redis), the task run recorder or the event persister
        (`DROPPED_OR_FAILED`). 0 when every event the server took in was handled."""
        return sum(1 for line in self.server_log().splitlines() if DROPPED_OR_FAILED.search(line))

    def count_events(
        self, prefix: str, since: datetime | None = None, *, walk: bool = False
    ) -> int:
        """How many events whose name starts with `prefix` the server holds, of those that
        occurred from `since` (a naive datetime is taken as UTC; default: the API's, 180 days
        back) to now: the `total` of `POST /events/filter`, which the server counts in its
        database. With `walk`, every page is read instead (`next_page`, 50 events a page,
        through `GET /events/filter/next`) and the distinct event ids counted: a second
        witness, which can differ from the total if events are still arriving."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

        if since is None:
            occurred = EventOccurredFilter()
        else:
            occurred = EventOccurredFilter(
                since=since if since.tzinfo else since.replace(tzinfo=UTC)
            )
        event_filter = EventFilter(occurred=occurred, event=EventNameFilter(prefix=[prefix]))
        with SyncPrefectClient(self.api) as client:
            page = client.read_events(filter=event_filter, limit=50)
            if not walk:
                return page.total
            seen = {event.id for event in page.events}
            while page.next_page is not None:
                page = client.read_events_page(str(page.next_page))
                seen.update(event.id for event in page.events)
        return len(seen)

    def task_runs_recorded(
        self, flow_run_ids: list[str], settle: float = 10.0, expected: int | None = None
    ) -> int:
        """How many Completed task runs the server holds for these flow runs, once the count
        has stopped moving (task runs are recorded from events, after the fact): the same for
        `settle` seconds, or, once it is the `expected` count, for 2 s (read every 0.5 s)."""
        body = {
            "flow_runs": {"id": {"any_": flow_run_ids}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        }
        pause = settle if expected is None else 0.5
        last, since, deadline = -1, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline:
            count = int(httpx.post(f"{self.api}/task_runs/count", json=body, timeout=60).json())
            now = time.monotonic()
            if count != last:
                last, since = count, now
            elif now - since >= (2.0 if count == expected else settle):
                return count
            time.sleep(pause)
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
