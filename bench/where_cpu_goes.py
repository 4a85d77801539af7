"""Where the flow's CPU goes, per tenant: our own path, or Prefect's machinery around it.

    uv run python bench/where_cpu_goes.py --tenants 2000 --latency-ms 50 --concurrency 16

Runs the flow phase of bench/run.py under py-spy (fetched with `uvx`; it needs ptrace, which
a locked-down container may refuse) and sorts every CPU sample of the flow process by what its
stack passes through:

- `core`: onboarding.batch.campaign.onboard_tenant and below: render, HTTP call, link check, ledger.
- `prefect-task`: a task run's engine outside our function: states, run context, events.
- `prefect-other`: the rest of Prefect in that process: the flow engine, API and event clients.
- `other`: anything else (thread pools, logging, start-up).

Idle threads are not sampled, so the shares are shares of CPU time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CORE = "onboard_tenant (onboarding/batch/campaign.py"


def category(stack: str) -> str:
    if CORE in stack:
        return "core"
    if "prefect/task_engine.py" in stack:
        return "prefect-task"
    if "prefect/" in stack:
        return "prefect-other"
    return "other"


def shares(raw: Path) -> Counter[str]:
    """Samples per category from py-spy's raw (collapsed) output: `frame;frame;… count`."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[category(stack)] += int(n)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args()
    raw = Path(tempfile.mkdtemp(prefix="onboard-profile-")) / "flow.txt"
    bench = [
        sys.executable,
        str(PROJECT / "bench" / "run.py"),
        "--skip-plain",
        f"--tenants={args.tenants}",
        f"--latency-ms={args.latency_ms}",
        f"--concurrency={args.concurrency}",
    ]
    spy = ["uvx", "py-spy", "record", "--format", "raw", "--rate", str(args.rate)]
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    done = subprocess.run([*spy, "--output", str(raw), "--", *bench], cwd=PROJECT, env=env)
    counts = shares(raw) if raw.exists() else Counter()
    if done.returncode != 0 or not counts["core"]:
        print("the profiled run failed, or py-spy could not sample it (ptrace?)", file=sys.stderr)
        return 1
    total = sum(counts.values()) or 1
    print(f"CPU samples of the flow process ({total} in all, start-up and warm-up included):")
    for name in ("core", "prefect-task", "prefect-other", "other"):
        print(f"  {name:14} {100 * counts[name] / total:5.1f} %")
    print(f"raw profile: {raw}  (flame graph: uvx py-spy record --format flamegraph …)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
