"""How many admins' clicks one `onboard connect-server` sustains, and what it adds to each.

    uv run python bench/connect.py                          # 1, 2 and 4 workers, PostgreSQL
    uv run python bench/connect.py --workers 2 --clicks 600 --concurrency 32

Starts the emulator as its own process with 50 ms of latency on every Versori call (initialise
and CreateConnection; its consent page answers at once, as a provider's would not matter here),
a ledger in a fresh schema of the PostgreSQL at ONBOARD_BENCH_PG (default the tests'), N
tenants each with a delivered link and a durable connect link, and `onboard connect-server
--workers W`. Then `--concurrency` threads click the links through, as a browser does: the link
page (GET), its button (POST: initialise, 50 ms), the consent page and its Allow, and the
callback (CreateConnection, 50 ms). Per configuration it reports

    clicks/s          clicks completed per second of the whole stretch
    service ms        the time of the service's three answers in a click (p50 / p99)
    emulator ms       the emulator's own time for the two calls a click makes, measured in
                      the same run from this process at the same concurrency (p50 / p99)
    added ms          service minus emulator (p50 / p99), and service / emulator

The client is Python threads on the same 2-core machine as the server and the emulator: the
figures are a floor for the service, not a ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from demo.connect_click import CSRF_PATTERN, write_connect_profile  # noqa: E402
from demo.emulator_config import DEFAULT_API_KEY  # noqa: E402
from demo.processes import child, free_port, wait_for_http  # noqa: E402
from onboarding.clock import utcnow  # noqa: E402
from onboarding.connections.durable_links import connect_url, issue_connect_link  # noqa: E402
from onboarding.inputs.profile import ConnectorProfile, load_profile  # noqa: E402
from onboarding.ledger import Ledger, Status  # noqa: E402

BIN = Path(sys.executable).parent
PG = os.environ.get("ONBOARD_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass
class Result:
    workers: int
    clicks: int
    connected: int
    seconds: float
    service_ms: list[float]
    emulator_ms: list[float]

    def line(self) -> str:
        s, e = pct(self.service_ms), pct(self.emulator_ms)
        added = (s[0] - e[0], s[1] - e[1])
        return (
            f"connect workers={self.workers}: {self.clicks / self.seconds:.1f} clicks/s "
            f"({self.connected}/{self.clicks} connected in {self.seconds:.1f} s); "
            f"service p50 {s[0]:.0f} ms p99 {s[1]:.0f} ms; emulator p50 {e[0]:.0f} ms "
            f"p99 {e[1]:.0f} ms; added p50 {added[0]:.0f} ms p99 {added[1]:.0f} ms "
            f"(x{s[0] / e[0]:.2f} / x{s[1] / e[1]:.2f})"
        )


def pct(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


def schema_url(schema: str) -> str:
    url = make_url(PG).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def seed(ledger: Ledger, profile: ConnectorProfile, path: Path, base: str, n: int) -> list[str]:
    now = utcnow()
    links = []
    for i in range(n):
        tenant = f"b{i:05d}"
        ledger.record_link(
            tenant_id=tenant,
            connector_id=profile.target_id,
            profile=profile.name,
            tenant_name=f"Bench {i}",
            admin_email=f"{tenant}@example.com",
            url=f"https://seed.example/?state=seed-{tenant}",
            state=f"seed-{tenant}",
            created_at=now,
            expires_at=now + timedelta(hours=72),
            tenant_fields={},
        )
        ledger.mark_delivered(tenant, profile.target_id, channel="email")
        links.append(connect_url(base, issue_connect_link(ledger, tenant, profile, path)))
    return links


_local = threading.local()


def _http() -> httpx.Client:
    """This thread's client, kept from click to click: making one costs ~30 ms of CPU (its TLS
    context), which on this machine's 2 cores would be the client's, not the service's, time."""
    http: httpx.Client | None = getattr(_local, "http", None)
    if http is None:
        http = _local.http = httpx.Client(timeout=30)
    http.cookies.clear()
    return http


def click(link: str) -> tuple[float, bool]:
    """One admin's click; the time of the service's three answers, and whether it connected."""
    http = _http()
    t0 = time.perf_counter()
    page = http.get(link)
    t1 = time.perf_counter()
    found = CSRF_PATTERN.search(page.text)
    if found is None:
        return t1 - t0, False
    t2 = time.perf_counter()
    pressed = http.post(link, data={"csrf": found.group(1)})
    t3 = time.perf_counter()
    if pressed.status_code != 303:
        return (t1 - t0) + (t3 - t2), False
    authorize = httpx.URL(pressed.headers["location"])
    http.get(authorize)
    answered = http.post(
        authorize.copy_with(query=None),
        data={
            "state": authorize.params["state"],
            "client_id": authorize.params["client_id"],
            "decision": "allow",
        },
    )
    t4 = time.perf_counter()
    back = http.get(answered.headers["location"])
    t5 = time.perf_counter()
    return (t1 - t0) + (t3 - t2) + (t5 - t4), back.status_code == 200


def emulator_own(emulator: str, profile: ConnectorProfile, n: int, concurrency: int) -> list[float]:
    """The emulator's own time for a click's two calls: an initialise and a CreateConnection
    (with a code it refuses after its latency, as much work as one it takes)."""
    request = profile.render({"admin_email": "x@example.com", "name": "x", "tenant_id": "x"})
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    org = profile.organisation_id

    def pair(_: int) -> float:
        http = _http()
        t0 = time.perf_counter()
        http.post(
            f"{emulator}/o/{org}/systems/{profile.target_id}/oauth2/initialise",
            json=request.to_wire(),
            headers=headers,
        ).raise_for_status()
        http.post(f"{emulator}/o/{org}/connections", json={"x": 1}, headers=headers)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        return [s * 1000 for s in pool.map(pair, range(n))]


def run(workers: int, clicks: int, concurrency: int, latency_ms: float, work: Path) -> Result:
    emulator_port, port = free_port(), free_port()
    emulator, base = f"http://127.0.0.1:{emulator_port}", f"http://127.0.0.1:{port}"
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = schema_url(schema)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERSORI_", "ONBOARD_"))}
    env.pop("PREFECT_API_URL", None)
    env.update(
        VERSORI_BASE_URL=emulator,
        VERSORI_API_KEY=DEFAULT_API_KEY,
        ONBOARD_DB_URL=url,
        ONBOARD_CONNECT_BASE_URL=base,
    )
    emulator_cmd = [str(BIN / "onboard"), "emulator", "--port", str(emulator_port)]
    emulator_cmd += ["--latency-ms", str(latency_ms)]
    server_cmd = [str(BIN / "onboard"), "connect-server", "--port", str(port)]
    server_cmd += ["--workers", str(workers)]
    try:
        with child(emulator_cmd, env, work / f"emulator-{workers}.log") as emu:
            wait_for_http(f"{emulator}/healthz", proc=emu)
            path = write_connect_profile(work / "bench.yaml", emulator, f"{base}/callback")
            profile = load_profile(path)
            ledger = Ledger(url)
            links = seed(ledger, profile, path, base, clicks)
            own = emulator_own(emulator, profile, clicks, concurrency)
            with child(server_cmd, env, work / f"connect-{workers}.log") as server:
                wait_for_http(f"{base}/healthz", proc=server, found=True, timeout=60)
                for link in links[:4]:  # every worker's first request (imports, pools)
                    httpx.get(link.replace("/c/", "/c/warm"))
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    done = list(pool.map(click, links))
                seconds = time.perf_counter() - started
            connected = ledger.counts_by_status(profile.target_id).get(Status.CONNECTED.value, 0)
            ledger.close()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    ok = sum(1 for _, fine in done if fine)
    assert ok == connected, f"{ok} clicks ended connected, the ledger has {connected}"
    return Result(workers, clicks, connected, seconds, [t * 1000 for t, _ in done], own)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, action="append", help="repeatable; 1, 2, 4")
    parser.add_argument("--clicks", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-connect-") as tmp:
        for workers in args.workers or [1, 2, 4]:
            result = run(workers, args.clicks, args.concurrency, args.latency_ms, Path(tmp))
            print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
