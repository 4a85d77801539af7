"""`onboard sync` at scale: how long it takes and how many Versori calls it makes.

    uv run python bench/sync.py --tenants 10000 --latency-ms 50

Seeds a SQLite ledger with N tenants, each delivered a link to examples/profile-connect.yaml's
system (one bulk INSERT), and the emulator, started as its own process with L ms on every
Versori call, with what Versori holds for them (made in that process before it serves, no
HTTP): of every 20 tenants, 12 connected and activated on the profile's environment (60 %),
4 connected but not activated (20 %), 1 activated whose credential then broke (5 %), and 3
with nothing (15 %: no end user). Then runs `onboard sync` twice in this process, as a person
would (its flow run on Prefect's temporary server, warmed up first on a one-tenant ledger):

    first   the ledger knows nothing yet: every connection is recorded, the 20 % activated
    second  steady state: nothing changes

and prints for each the wall time of the command and of the sync inside it, what changed,
and Versori's calls by endpoint, as the emulator counted them (GET /_emulator/calls).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from demo.emulator import DEFAULT_API_KEY  # noqa: E402
from demo.processes import free_port, wait_for_http  # noqa: E402
from onboarding.clock import utcnow  # noqa: E402
from onboarding.inputs.profile import ConnectorProfile, load_profile  # noqa: E402

PROFILE = PROJECT / "examples" / "profile-connect.yaml"
# Of every 20 tenants, by position: what Versori holds for it.
MIX = ["activated"] * 12 + ["connected"] * 4 + ["broken"] + ["nothing"] * 3


def tenant_id(i: int) -> str:
    return f"bench-{i:06d}"


def held_by_versori(i: int) -> str:
    return MIX[i % len(MIX)]


def seed_ledger(url: str, profile: ConnectorProfile, n: int, prefix: str = "") -> float:
    """N tenants delivered a link, in one transaction; its seconds."""
    from sqlalchemy import insert

    from onboarding.ledger import Ledger, Status, records, state_digest

    started = time.perf_counter()
    now = utcnow()
    rows = []
    for i in range(n):
        tenant = prefix + tenant_id(i)
        state = f"bench-state-{tenant}"
        rows.append(
            {
                "tenant_id": tenant,
                "connector_id": profile.target_id,
                "profile": profile.name,
                "tenant_name": f"Tenant {i}",
                "admin_email": f"admin@{tenant}.example.com",
                "status": Status.DELIVERED.value,
                "url": f"https://provider.example.com/authorize?state={state}",
                "state": state,
                "state_hash": state_digest(state),
                "created_at": now,
                "expires_at": now + timedelta(hours=72),
                "delivered_at": now,
                "delivery_channel": "store",
                "attempts": 1,
                "updated_at": now,
                "tenant_fields": {},
            }
        )
    with Ledger(url) as ledger, ledger.engine.begin() as conn:
        conn.execute(insert(records), rows)
    return time.perf_counter() - started


def seed_versori(app: Any, profile: ConnectorProfile, n: int) -> dict[str, int]:
    """What Versori holds for the N tenants (see MIX), written into the emulator's runtime."""
    from ulid import ULID

    from demo.emulator_oauth import make_connection

    oauth, platform = app.state.oauth, app.state.platform
    org, system = profile.organisation_id, profile.target_id
    template, environment = str(profile.connection_template_id), str(profile.environment_id)
    held: dict[str, int] = {}
    now = utcnow().isoformat()
    for i in range(n):
        kind = held_by_versori(i)
        held[kind] = held.get(kind, 0) + 1
        if kind == "nothing":
            continue
        tenant = tenant_id(i)
        record = make_connection(oauth, True, org, system, template, tenant, f"{tenant} (bench)")
        if kind == "connected":
            continue
        platform.add(
            {
                "id": str(ULID()),
                "organisationId": org,
                "environmentId": environment,
                "userId": record["endUserId"],
                "links": [{"connectionTemplateId": template, "connectionId": record["id"]}],
                "dynamicVariables": {},
                "createdAt": now,
                "updatedAt": now,
            }
        )
        if kind == "broken":
            credential = record["credentials"][0]["credential"]
            credential["errors"] = ["invalid_grant: the refresh token was revoked"]
    return held


def serve_seeded_emulator(port: int, tenants: int, latency_ms: float) -> None:
    """The emulator process: seeded in memory, then served until terminated."""
    import uvicorn

    from demo.emulator import EmulatorConfig, create_app

    app = create_app(EmulatorConfig(latency_ms=latency_ms))
    started = time.perf_counter()
    held = seed_versori(app, load_profile(PROFILE), tenants)
    print(f"versori seeded in {time.perf_counter() - started:.2f} s: {held}", flush=True)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    uvicorn.Server(config).run()


def start_emulator(tenants: int, latency_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-emulator", str(port)]
    command += ["--tenants", str(tenants), "--latency-ms", str(latency_ms)]
    proc = subprocess.Popen(command, cwd=PROJECT)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", timeout=120, proc=proc)
    return proc, base_url


def onboard_sync(concurrency: int) -> tuple[float, int]:
    """`onboard sync --profile examples/profile-connect.yaml --concurrency C`, the command's
    own function, in this process (it prints its summary): its seconds and exit code."""
    import typer

    from deployments.sync_cli import sync
    from flows.inputs.options import TenantEvents

    started = time.perf_counter()
    try:
        sync([str(PROFILE)], False, concurrency, TenantEvents.AUTO)
        code = 0
    except typer.Exit as done:
        code = done.exit_code
    return time.perf_counter() - started, code


def calls(base_url: str) -> dict[str, int]:
    counted: dict[str, int] = httpx.get(f"{base_url}/_emulator/calls").json()["calls"]
    return counted


def timed_sync(label: str, base_url: str, concurrency: int) -> None:
    print(f"--- {label}: onboard sync", flush=True)
    before = calls(base_url)
    seconds, code = onboard_sync(concurrency)
    after = calls(base_url)
    made = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    print(f"{label}: {seconds:.1f} s (exit {code}); Versori calls {sum(made.values())}:")
    for endpoint, n in sorted(made.items(), key=lambda e: -e[1]):
        print(f"    {n:7d}  {endpoint}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=8, help="onboard sync --concurrency")
    parser.add_argument("--serve-emulator", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator is not None:
        serve_seeded_emulator(args.serve_emulator, args.tenants, args.latency_ms)
        return 0

    work = Path(tempfile.mkdtemp(prefix="onboard-bench-sync-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's temporary server, as on a laptop
    # As the `onboard` command sets them before Prefect is imported (deployments/cli.py).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ["VERSORI_API_KEY"] = DEFAULT_API_KEY
    os.environ.pop("VERSORI_API_KEY_BLOCK", None)
    profile = load_profile(PROFILE)
    ledger_url = f"sqlite:///{work / 'ledger.db'}"
    print(
        f"tenants={args.tenants} latency_ms={args.latency_ms:g} "
        f"concurrency={args.concurrency} ledger=sqlite"
    )
    print(f"ledger seeded in {seed_ledger(ledger_url, profile, args.tenants):.2f} s")
    emulator, base_url = start_emulator(args.tenants, args.latency_ms)
    try:
        os.environ["VERSORI_BASE_URL"] = base_url
        # Prefect's temporary server started and everything imported before timing: one sync
        # of a one-tenant ledger (a tenant Versori knows nothing of).
        warmup = f"sqlite:///{work / 'warmup.db'}"
        seed_ledger(warmup, profile, 1, prefix="warmup-")
        os.environ["ONBOARD_DB_URL"] = warmup
        seconds, code = onboard_sync(args.concurrency)
        if code != 0:
            return 1
        print(f"warm-up (Prefect's temporary server started): {seconds:.1f} s")
        os.environ["ONBOARD_DB_URL"] = ledger_url
        timed_sync("first sync ", base_url, args.concurrency)
        timed_sync("second sync", base_url, args.concurrency)
    finally:
        emulator.terminate()
        emulator.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
