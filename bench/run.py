"""Throughput and memory of the onboard-tenants flow against a plain httpx loop, in one run.

    uv run python bench/run.py --tenants 2000 --latency-ms 50 --concurrency 16

Starts the emulator as its own process (so it does not compete with the measured process for
the GIL), onboards N generated tenants through the real flow with a SQLite ledger, and, in the
same run and against the same emulator, times a plain thread-pool httpx loop at the same
concurrency. The machine is shared and noisy: compare the two numbers, not either alone.
The last line is `ratio=<flow tenants/s ÷ plain tenants/s>`.

    uv run python bench/run.py --workers 2 --tenants 5000 --latency-ms 50

With `--workers W`, the flow phase runs on a scale-out stack instead (bench/scale_out.py): a
`prefect server` and the ledger on fresh PostgreSQL databases, a process work pool with W
workers, and `onboard run --fan-out deployment` splitting the roster into chunk flow runs.
Its tenants/s is over the whole `onboard run` command, start-up included.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from bench.scale_out import ScaleOutStack, write_roster  # noqa: E402
from bench.services import (  # noqa: E402
    REDIS_URL,
    dedicated_redis_db,
    fresh_postgres_database,
    pg_url,
    redis_server_settings,
)
from demo.emulator import DEFAULT_API_KEY, RATE_LIMIT_WINDOWS  # noqa: E402
from demo.processes import free_port, prefect_server, wait_for_http  # noqa: E402
from onboarding.inputs.profile import load_profile  # noqa: E402

PROFILE = PROJECT / "examples" / "profile.yaml"


class PeakRSS:
    """Samples this process's resident memory; ru_maxrss alone cannot say which phase peaked."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def plain_loop(base_url: str, n: int, concurrency: int) -> tuple[float, int]:
    """The floor: the same requests from a thread pool sharing one httpx.Client, nothing else."""
    profile = load_profile(PROFILE)
    path = f"/o/{profile.organisation_id}/connectors/{profile.connector_id}/oauth2/initialise"
    bodies = [
        profile.render(
            {"subdomain": f"bench{i}", "admin_email": f"admin{i}@bench.example.com"}
        ).to_wire()
        for i in range(n)
    ]
    with httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=30,
    ) as client:

        def call(body: dict[str, object]) -> int:
            return client.post(path, json=body).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            statuses = list(pool.map(call, bodies))
        elapsed = time.perf_counter() - started
    return elapsed, sum(1 for s in statuses if s == 200)


def flow_run(
    roster: Path, profile: Path, concurrency: int, **options: Any
) -> tuple[float, dict[str, object]]:
    from flows.onboard_tenants import onboard_tenants
    from flows.running.in_process import run_here

    started = time.perf_counter()
    # As `onboard run` runs it (flows/running/in_process.py: no heartbeats on the temporary server).
    state = run_here(
        onboard_tenants,
        roster=str(roster),
        profile=str(profile),
        concurrency=concurrency,
        **{k: v for k, v in options.items() if v is not None},
    )
    elapsed = time.perf_counter() - started
    result = state.result(raise_on_failure=False)
    return elapsed, result if isinstance(result, dict) else {"error": repr(result)}


def bench_profile(work: Path, rate_limit: float | None) -> Path:
    """The example profile, paced at the emulator's limit when there is one."""
    text = PROFILE.read_text()
    if rate_limit:
        text += f"\nrate_limit_per_second: {rate_limit:g}\n"
    path = work / "profile.yaml"
    path.write_text(text)
    return path


def start_emulator(
    latency_ms: float, rate_limit: float | None, window: str = "sliding"
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "deployments.cli",
        "emulator",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
    ]
    if rate_limit:
        command += ["--rate-limit", str(rate_limit), "--rate-limit-window", window]
    proc = subprocess.Popen(
        command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", proc=proc)
    return proc, base_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="emulator answers 429 beyond this many calls/s; the profile is paced at it",
    )
    parser.add_argument(
        "--rate-limit-window",
        choices=RATE_LIMIT_WINDOWS,
        default="sliding",
        help="how the emulator counts --rate-limit: sliding (at most N in any trailing second, "
        "the default), fixed (N per clock second) or bucket (a token bucket, forgives bursts)",
    )
    parser.add_argument(
        "--tenants-per-task",
        type=int,
        default=None,
        help="tenants per task run (default: the flow's automatic choice)",
    )
    parser.add_argument(
        "--tenant-events",
        choices=["all", "failures", "off"],
        default=None,
        help="which tenant status changes become Prefect events (default: the flow's, all)",
    )
    parser.add_argument(
        "--skip-plain", action="store_true", help="no plain-loop baseline (for memory runs)"
    )
    parser.add_argument(
        "--prefect-db",
        choices=["ephemeral", "postgres"],
        default=None,
        help="ephemeral: Prefect's temporary SQLite server (the default); postgres: a `prefect "
        "server start` on a fresh database of the local PostgreSQL with the Redis messaging "
        "broker, as bench/scale_out.py starts it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run the flow phase on a process work pool with this many workers (chunks fan "
        "out as deployment runs; Prefect server and ledger on PostgreSQL)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="with --workers: tenants per chunk run (default max(250, tenants / (4 x workers)))",
    )
    parser.add_argument(
        "--worker-limit",
        type=int,
        default=1,
        help="with --workers: flow runs each worker runs at once (its --limit)",
    )
    args = parser.parse_args()
    if args.workers and args.rate_limit_window != "sliding":
        # bench/scale_out.py starts its emulator with --rate-limit alone: its default window.
        parser.error("--workers runs the emulator's default window (sliding) only")
    if args.workers:
        return run_scale_out(args)
    if args.prefect_db is None:
        args.prefect_db = "ephemeral"
    with ExitStack() as stack:
        if args.prefect_db == "postgres":
            # The server of bench/scale_out.py: PostgreSQL, the Redis broker, separate services.
            server_dir = Path(tempfile.mkdtemp(prefix="onboard-bench-server-"))
            database = stack.enter_context(fresh_postgres_database())
            redis_db = stack.enter_context(dedicated_redis_db())
            os.environ["PREFECT_API_URL"] = stack.enter_context(
                prefect_server(
                    server_dir,
                    database_url=pg_url(database, "asyncpg"),
                    env=redis_server_settings(REDIS_URL, redis_db),
                    separate_services=True,
                )
            )
        return run(args)


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="onboard-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default, too few on this busy machine
    # (as in the CLI); read when Prefect is first imported, which is below.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ["ONBOARD_DB_URL"] = f"sqlite:///{work / 'ledger.db'}"
    os.environ["VERSORI_API_KEY"] = DEFAULT_API_KEY
    os.environ.pop("VERSORI_API_KEY_BLOCK", None)
    roster, warmup = work / "roster.csv", work / "warmup.csv"
    write_roster(roster, args.tenants)
    write_roster(warmup, 1, prefix="warmup")
    profile = bench_profile(work, args.rate_limit)

    plain_emulator, plain_url = start_emulator(args.latency_ms, None)
    emulator, base_url = start_emulator(args.latency_ms, args.rate_limit, args.rate_limit_window)
    try:
        os.environ["VERSORI_BASE_URL"] = base_url
        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
        # Start Prefect's temporary server and import everything before timing anything.
        flow_run(warmup, profile, 1)
        before = httpx.get(f"{base_url}/_emulator/stats").json()

        limit = args.concurrency / (args.latency_ms / 1000) if args.latency_ms else float("inf")
        print(
            f"tenants={args.tenants} latency_ms={args.latency_ms:g} "
            f"concurrency={args.concurrency} rate_limit={args.rate_limit} "
            f"({args.rate_limit_window}) prefect_db={args.prefect_db} "
            f"(latency-bound limit {limit:.0f}/s)"
        )
        plain_rate = None if args.skip_plain else measure_plain(plain_url, args)

        cpu = time.process_time()
        with PeakRSS() as flow_mem:
            flow_s, summary = flow_run(
                roster,
                profile,
                args.concurrency,
                tenants_per_task=args.tenants_per_task,
                tenant_events=args.tenant_events,
            )
        flow_cpu = (time.process_time() - cpu) * 1000 / args.tenants
        flow_rate = args.tenants / flow_s
        by_status = summary.get("by_status") if isinstance(summary, dict) else summary
        print(
            f"onboard-tenants  : {flow_rate:7.1f} tenants/s  ({by_status} in {flow_s:.1f} s)"
            f"  CPU {flow_cpu:.2f} ms/tenant  peak RSS {flow_mem.peak / 2**20:.0f} MiB"
        )
        after = httpx.get(f"{base_url}/_emulator/stats").json()
        print(f"peak_rss_mib={flow_mem.peak / 2**20:.0f}")
        print_tail(args, before, after, flow_rate, plain_rate)
    finally:
        for proc in (emulator, plain_emulator):
            proc.terminate()
            proc.wait(10)
    return 0


def measure_plain(plain_url: str, args: argparse.Namespace) -> float:
    cpu = time.process_time()
    with PeakRSS() as plain_mem:
        plain_s, plain_ok = plain_loop(plain_url, args.tenants, args.concurrency)
    plain_cpu = (time.process_time() - cpu) * 1000 / args.tenants
    plain_rate: float = args.tenants / plain_s
    print(
        f"plain httpx loop : {plain_rate:7.1f} tenants/s  ({plain_ok} ok in "
        f"{plain_s:.1f} s)  CPU {plain_cpu:.2f} ms/tenant  "
        f"peak RSS {plain_mem.peak / 2**20:.0f} MiB"
    )
    return plain_rate


def print_tail(
    args: argparse.Namespace,
    before: dict[str, Any],
    after: dict[str, Any],
    flow_rate: float,
    plain_rate: float | None,
) -> None:
    """The emulator's count of the flow phase's requests and 429s, then the ratios."""
    requests = after["requests"] - before["requests"]
    limited = after["by_status"].get("429", 0) - before["by_status"].get("429", 0)
    print(
        f"emulator         : {requests} requests, {limited} answered 429 "
        f"({100 * limited / max(requests, 1):.2f}%)"
    )
    if args.rate_limit:
        print(
            f"rate_share={flow_rate / args.rate_limit:.3f}  "
            f"(of {args.rate_limit:g}/s; 429s {limited})"
        )
    if plain_rate:
        print(f"ratio={flow_rate / plain_rate:.2f}")


def run_scale_out(args: argparse.Namespace) -> int:
    """The flow phase on a work pool: `onboard run --fan-out deployment` with W workers."""
    work = Path(tempfile.mkdtemp(prefix="onboard-bench-scale-"))
    roster = work / "roster.csv"
    write_roster(roster, args.tenants)
    profile = bench_profile(work, args.rate_limit)
    chunk_size = args.chunk_size or max(250, args.tenants // (4 * args.workers))
    chunks = -(-args.tenants // chunk_size)
    limit = args.concurrency / (args.latency_ms / 1000) if args.latency_ms else float("inf")
    print(
        f"tenants={args.tenants} latency_ms={args.latency_ms:g} "
        f"concurrency={args.concurrency} rate_limit={args.rate_limit} "
        f"workers={args.workers} worker_limit={args.worker_limit} chunk_size={chunk_size} "
        f"({chunks} chunks; latency-bound limit {limit:.0f}/s per chunk run)"
    )
    plain_rate = None
    if not args.skip_plain:
        plain_emulator, plain_url = start_emulator(args.latency_ms, None)
        try:
            plain_rate = measure_plain(plain_url, args)
        finally:
            plain_emulator.terminate()
            plain_emulator.wait(10)
    started = time.monotonic()
    with ScaleOutStack(
        work / "stack",
        args.workers,
        worker_limit=args.worker_limit,
        latency_ms=args.latency_ms,
        rate_limit=args.rate_limit,
    ) as stack:
        print(
            f"stack up in {time.monotonic() - started:.0f} s "
            + " ".join(f"{step}={s:g}s" for step, s in stack.timings.items())
            + f"  (logs in {stack.tmp})"
        )
        before = stack.emulator_stats()
        result = stack.run_batch(
            roster,
            chunk_size=chunk_size,
            concurrency=args.concurrency,
            profile=str(profile),
        )
        after = stack.emulator_stats()
        if result.exit_code != 0:
            print(result.output[-4000:])
            print(f"onboard run exited {result.exit_code}")
            return 1
        flow_rate = args.tenants / result.seconds
        states = Counter(run.state for run in result.chunk_runs)
        per_worker = ", ".join(
            f"{worker}: {n}" for worker, n in sorted(result.chunks_per_worker().items(), key=str)
        )
        print(
            f"onboard-tenants  : {flow_rate:7.1f} tenants/s  (exit {result.exit_code}, "
            f"{args.tenants} tenants in {result.seconds:.1f} s, `onboard run` start-up included)"
        )
        window, mean = result.chunk_window(), result.mean_chunk_seconds()
        if window and mean:
            print(
                f"chunk runs       : {dict(states)}; by worker {per_worker}; first start to "
                f"last end {window:.1f} s ({args.tenants / window:.1f} tenants/s); each ran "
                f"{mean:.1f} s on average"
            )
        recorded = stack.task_runs_recorded([run.id for run in result.chunk_runs])
        print(
            f"prefect server   : {recorded} task runs recorded Completed; "
            f"{stack.count_events('onboarding.tenant.')} tenant events held; "
            f"{stack.server_dropped_messages()} log lines of dropped or failed messages"
        )
        print_tail(args, before, after, flow_rate, plain_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
