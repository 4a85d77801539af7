"""How close a paced `onboard run` comes to an API's rate limit without being told 429.

    uv run python bench/pacing.py                     # temporary Prefect server (the default)
    uv run python bench/pacing.py --mode server       # PostgreSQL + Redis server, 2 workers
    uv run python bench/pacing.py --mode both --tenants 3000 --rate-limit 50

Starts the emulator as its own process, as strict as the strictest real API (`--rate-limit
50 --rate-limit-window sliding`: at most 50 accepted requests in any trailing second, beyond
that 429 + Retry-After), with 20 ms of latency, and onboards N generated tenants with a
profile paced at that limit (`rate_limit_per_second: 50`, `max_concurrency: 16`):

  temporary  a plain `onboard run --roster R --profile P` on Prefect's temporary server,
             store delivery, a SQLite ledger in a fresh temporary folder;
  server     the same roster on a `prefect server` on PostgreSQL with the Redis broker
             (bench/scale_out.py's stack), `--fan-out deployment` in two chunks (N/2 tenants
             each) run by two workers: two processes share the profile's rate.

For each mode it reports, from the emulator's GET /_emulator/stats: the calls it accepted per
second between its first and last request (Prefect's start-up left out) and that rate's share
of the limit; the requests answered 429; and, from the ledger, the tenants linked. The last
line of a mode reads

    pacing temporary: share=0.97 429s=0 (0.00%) linked=3000/3000

The targets are a share of at least 0.95, at most 1 % of requests answered 429, and every
tenant linked; `--strict` exits 1 when a mode misses one. The run's processes use the
product's own retry settings (no ONBOARD_RETRY_BACKOFF_SECONDS of the tests). The temporary
mode needs nothing but this project; the server mode needs the PostgreSQL and Redis of
bench/services.py (ONBOARD_BENCH_PG, ONBOARD_BENCH_REDIS).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from demo.emulator_config import DEFAULT_API_KEY, RATE_LIMIT_WINDOWS  # noqa: E402

# The process helpers bench/run.py and bench/scale_out.py use too (moving them out of tests/ is
# for all three at once).
from demo.processes import child as process  # noqa: E402
from demo.processes import free_port, wait_for_http  # noqa: E402

BIN = Path(sys.executable).parent
EXAMPLE_PROFILE = PROJECT / "examples" / "profile.yaml"
MODES = ("temporary", "server", "both")
TARGET_SHARE = 0.95
TARGET_429_PERCENT = 1.0


# -- processes -----------------------------------------------------------------------------


def clean_env(home: Path) -> dict[str, str]:
    """This environment without any VERSORI_, ONBOARD_ or PREFECT_ setting, and a Prefect home
    of its own (so a temporary server starts on a fresh database)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VERSORI_", "ONBOARD_", "PREFECT_"))
    }
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def emulator_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--latency-ms",
        f"{args.latency_ms:g}",
        "--rate-limit",
        f"{args.rate_limit:g}",
        "--rate-limit-window",
        args.window,
    ]


# -- inputs --------------------------------------------------------------------------------


def write_roster(path: Path, n: int, prefix: str = "pace") -> None:
    """N generated tenants for examples/profile.yaml (each its own subdomain, so its own
    authorize URL: the emulator counts each tenant's initialisations apart)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for i in range(n):
            w.writerow([f"{prefix}{i:07d}", f"Pace {i}", f"admin{i}@pace.example.com", f"pace{i}"])


def paced_profile(work: Path, rate: float, max_concurrency: int) -> Path:
    """The example profile under a name of its own (its Prefect rate limit is named after it),
    paced at the emulator's limit."""
    text = EXAMPLE_PROFILE.read_text().replace("name: zendesk-demo", "name: pacing-bench")
    text += f"\nrate_limit_per_second: {rate:g}\nmax_concurrency: {max_concurrency}\n"
    path = work / "profile.yaml"
    path.write_text(text)
    return path


def connector_of(profile: Path) -> str:
    from onboarding.inputs.profile import load_profile

    return str(load_profile(profile).connector_id)


def linked_in(ledger_url: str, connector_id: str) -> tuple[int, dict[str, int]]:
    """Tenants with a link in the ledger (live, or already connected), and every status."""
    from onboarding.ledger import LIVE_STATUSES, Ledger, Status

    ledger = Ledger(ledger_url)
    try:
        counts = ledger.counts_by_status(connector_id)
    finally:
        ledger.close()
    linked = {str(s) for s in (*LIVE_STATUSES, Status.CONNECTED)}
    return sum(n for status, n in counts.items() if status in linked), counts


# -- measures ------------------------------------------------------------------------------


@dataclass
class Measure:
    mode: str
    tenants: int
    rate_limit: float
    stats: dict[str, Any]
    run_seconds: float
    exit_code: int
    linked: int
    ledger: dict[str, int]
    log: Path

    @property
    def requests(self) -> int:
        return int(self.stats["requests"])

    @property
    def limited(self) -> int:
        return int(self.stats["rate_limited"])

    @property
    def accepted(self) -> int:
        """Requests the rate limit let through (whatever they were answered next)."""
        return self.requests - self.limited

    @property
    def window(self) -> float:
        """Seconds from the emulator's first request to its last."""
        first, last = self.stats.get("first_request_at"), self.stats.get("last_request_at")
        return float(last - first) if first is not None and last is not None else 0.0

    @property
    def achieved(self) -> float:
        return self.accepted / self.window if self.window > 0 else 0.0

    @property
    def share(self) -> float:
        return self.achieved / self.rate_limit

    @property
    def limited_percent(self) -> float:
        return 100 * self.limited / max(self.requests, 1)

    def targets_missed(self) -> list[str]:
        missed = []
        if self.share < TARGET_SHARE:
            missed.append(f"share {self.share:.3f} < {TARGET_SHARE}")
        if self.limited_percent > TARGET_429_PERCENT:
            missed.append(f"429s {self.limited_percent:.2f}% > {TARGET_429_PERCENT:g}%")
        if self.linked < self.tenants:
            missed.append(f"linked {self.linked} < {self.tenants}")
        return missed

    def summary(self) -> str:
        return (
            f"pacing {self.mode}: share={self.share:.2f} 429s={self.limited} "
            f"({self.limited_percent:.2f}%) linked={self.linked}/{self.tenants}"
        )

    def report(self) -> None:
        initialised = self.stats.get("initialised", {})
        twice = sum(1 for n in initialised.values() if n > 1)
        by_status = dict(sorted(self.stats["by_status"].items()))
        print(
            f"  onboard run      : exit {self.exit_code} in {self.run_seconds:.1f} s "
            f"({self.tenants / self.run_seconds:.1f} tenants/s, Prefect start-up included; "
            f"log {self.log})"
        )
        print(
            f"  emulator         : {self.requests} requests {by_status}; "
            f"{self.limited} answered 429 ({self.limited_percent:.2f}%)"
        )
        print(
            f"  calls            : {self.accepted} accepted in {self.window:.1f} s from the "
            f"first request to the last = {self.achieved:.1f}/s, {self.share:.3f} of "
            f"{self.rate_limit:g}/s ({self.requests / max(self.window, 1e-9):.1f} requests/s)"
        )
        print(
            f"  tenants          : {self.linked}/{self.tenants} linked in the ledger "
            f"{dict(sorted(self.ledger.items()))}; {len(initialised)} given a URL, "
            f"{twice} of them more than once"
        )
        missed = self.targets_missed()
        print(f"  targets          : {'met' if not missed else 'missed: ' + '; '.join(missed)}")
        print(self.summary(), flush=True)


def emulator_stats(base_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{base_url}/_emulator/stats", timeout=30).json()
    return stats


# -- the two modes -------------------------------------------------------------------------


def run_temporary(args: argparse.Namespace, work: Path) -> Measure:
    """`onboard run` on Prefect's temporary server, against an emulator of its own."""
    work.mkdir(parents=True)
    roster = work / "roster.csv"
    write_roster(roster, args.tenants)
    profile = paced_profile(work, args.rate_limit, args.max_concurrency)
    ledger_url = f"sqlite:///{work / 'ledger.db'}"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    emulator_cmd = [str(BIN / "onboard"), "emulator", "--port", str(port), *emulator_flags(args)]
    with process(emulator_cmd, clean_env(work / "emulator-home"), work / "emulator.log") as emu:
        wait_for_http(f"{base_url}/healthz", proc=emu)
        env = clean_env(work / "prefect-home")
        env.update(
            VERSORI_BASE_URL=base_url,
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=ledger_url,
            # As `onboard run` sets it itself unless set: 20 s is too few on a busy machine.
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        )
        command = [
            str(BIN / "onboard"),
            "run",
            "--roster",
            str(roster),
            "--profile",
            str(profile),
            "--deliver",
            "store",
        ]
        log = work / "onboard-run.log"
        started = time.monotonic()
        with process(command, env, log) as run:
            try:
                code = run.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                code = -1
        seconds = time.monotonic() - started
        stats = emulator_stats(base_url)
    linked, ledger = linked_in(ledger_url, connector_of(profile))
    return Measure(
        "temporary", args.tenants, args.rate_limit, stats, seconds, code, linked, ledger, log
    )


def run_server(args: argparse.Namespace, work: Path) -> Measure:
    """`onboard run --fan-out deployment` in two chunks on a PostgreSQL + Redis stack."""
    from bench.scale_out import ScaleOutStack

    work.mkdir(parents=True)
    roster = work / "roster.csv"
    write_roster(roster, args.tenants)
    profile = paced_profile(work, args.rate_limit, args.max_concurrency)
    chunk_size = math.ceil(args.tenants / 2)
    # The stack starts an emulator of its own with --latency-ms and --rate-limit only; the
    # stack's processes are sent to this one instead, whose every flag is this benchmark's.
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    emulator_cmd = [str(BIN / "onboard"), "emulator", "--port", str(port), *emulator_flags(args)]

    class PacingStack(ScaleOutStack):
        """bench/scale_out.py's stack, its workers and batches sent to this benchmark's
        emulator, with the product's own retry backoff (the stack's base_env shortens it for
        the tests)."""

        def env(self, home: str) -> dict[str, str]:
            env = super().env(home)
            env["VERSORI_BASE_URL"] = base_url
            env.pop("ONBOARD_RETRY_BACKOFF_SECONDS", None)
            return env

    with process(emulator_cmd, clean_env(work / "emulator-home"), work / "emulator.log") as emu:
        wait_for_http(f"{base_url}/healthz", proc=emu)
        started = time.monotonic()
        with PacingStack(work / "stack", workers=2, worker_limit=1) as stack:
            print(
                f"  stack            : up in {time.monotonic() - started:.0f} s "
                + " ".join(f"{step}={s:g}s" for step, s in stack.timings.items())
                + f" (logs in {stack.tmp})",
                flush=True,
            )
            result = stack.run_batch(
                roster,
                chunk_size=chunk_size,
                concurrency=args.max_concurrency,
                profile=str(profile),
                timeout=args.timeout,
            )
            stats = emulator_stats(base_url)
            if result.exit_code != 0:
                print(result.output[-3000:])
            workers = ", ".join(
                f"chunk {chunk}: {worker}" for chunk, worker in result.workers_by_chunk().items()
            )
            window, mean = result.chunk_window(), result.mean_chunk_seconds()
            overlap = (
                f"; first start to last end {window:.1f} s, each ran {mean:.1f} s"
                if window and mean
                else ""
            )
            print(f"  chunk runs       : {workers}{overlap}", flush=True)
            linked, ledger = linked_in(stack.ledger_url, connector_of(profile))
    return Measure(
        "server",
        args.tenants,
        args.rate_limit,
        stats,
        result.seconds,
        result.exit_code,
        linked,
        ledger,
        work / "stack" / "batch-1.log",  # run_batch's log of its first batch
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="temporary")
    parser.add_argument("--tenants", type=int, default=3000)
    parser.add_argument(
        "--rate-limit", type=float, default=50.0, help="calls/s (emulator and profile)"
    )
    parser.add_argument("--window", choices=RATE_LIMIT_WINDOWS, default="sliding")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument(
        "--max-concurrency", type=int, default=16, help="the profile's max_concurrency"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one run")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a mode misses a target")
    args = parser.parse_args()
    if args.tenants < 2 or args.rate_limit <= 0:
        parser.error("--tenants must be at least 2 and --rate-limit positive")

    work = Path(tempfile.mkdtemp(prefix="onboard-pacing-"))
    modes = ["temporary", "server"] if args.mode == "both" else [args.mode]
    measures = []
    for mode in modes:
        print(
            f"pacing {mode}: {args.tenants} tenants, emulator at {args.rate_limit:g}/s "
            f"({args.window} window) with {args.latency_ms:g} ms latency, profile "
            f"rate_limit_per_second {args.rate_limit:g}, max_concurrency {args.max_concurrency}",
            flush=True,
        )
        run = run_temporary if mode == "temporary" else run_server
        measure = run(args, work / mode)
        measure.report()
        measures.append(measure)
    if len(measures) > 1:
        for measure in measures:
            print(measure.summary())
    missed = any(m.targets_missed() for m in measures)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
