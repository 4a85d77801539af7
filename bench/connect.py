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
    service ms        the time of the service's three answers in a click (p50 / p95 / p99)
    emulator ms       the emulator's own time for the two calls a click makes, measured in
                      the same run from this process at the same concurrency (p50 / p95 / p99)
    added ms          service minus emulator (p50 / p95 / p99), and service / emulator
    CPU ms/click      the service's CPU time (user + system, its processes and their
                      children, read from /proc before and after the clicks) per click

The page's beacon (POST /c/<token>/seen, which its script sends once the page is shown) is
part of a click, as in a browser: its CPU counts, its time does not (the person is reading
the page meanwhile). `--no-beacon` leaves it out, as this benchmark's clicks did before.

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
    cpu_seconds: float

    def line(self) -> str:
        s, e = pct(self.service_ms), pct(self.emulator_ms)
        added = tuple(a - b for a, b in zip(s, e, strict=True))
        return (
            f"connect workers={self.workers}: {self.clicks / self.seconds:.1f} clicks/s "
            f"({self.connected}/{self.clicks} connected in {self.seconds:.1f} s); "
            f"service p50 {s[0]:.0f} ms p95 {s[1]:.0f} ms p99 {s[2]:.0f} ms; "
            f"emulator p50 {e[0]:.0f} ms p95 {e[1]:.0f} ms p99 {e[2]:.0f} ms; "
            f"added p50 {added[0]:.1f} ms p95 {added[1]:.1f} ms p99 {added[2]:.1f} ms "
            f"(x{s[0] / e[0]:.2f} / x{s[2] / e[2]:.2f}); "
            f"service CPU {1000 * self.cpu_seconds / self.clicks:.1f} ms/click"
        )


def pct(values: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99."""
    ordered = sorted(values)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * share))]

    return statistics.median(ordered), at(0.95), at(0.99)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and its descendants (uvicorn's workers),
    from /proc: what the service has spent so far."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the command's closing parenthesis: state, ppid, ..., utime (14th), stime.
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return sum(ticks.get(p, 0) for p in tree) / _TICK


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
# Whether a click sends the page's beacon, as a browser running its script does.
BEACON = True


def _http() -> httpx.Client:
    """This thread's client, kept from click to click: making one costs ~30 ms of CPU (its TLS
    context), which on this machine's 2 cores would be the client's, not the service's, time."""
    http: httpx.Client | None = getattr(_local, "http", None)
    if http is None:
        http = _local.http = httpx.Client(timeout=30)
    http.cookies.clear()
    return http


def _drop_http() -> None:
    http: httpx.Client | None = getattr(_local, "http", None)
    if http is not None:
        http.close()
        _local.http = None


def click(link: str) -> tuple[float, bool]:
    """One admin's click; the time of the service's three answers, and whether it connected."""
    http = _http()
    t0 = time.perf_counter()
    page = http.get(link)
    t1 = time.perf_counter()
    found = CSRF_PATTERN.search(page.text)
    if found is None:
        return t1 - t0, False
    if BEACON and "<script>" in page.text:  # the page's beacon, as its script sends it
        http.post(f"{link}/seen", data={"csrf": found.group(1)})
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
            # Besides the clicks measured, a whole click per worker first (4 at least), each
            # on a connection of its own: every worker's first requests (imports, the
            # Versori client, each statement compiled once) are start-up, not a click's.
            warm = max(4, 2 * workers)
            links = seed(ledger, profile, path, base, clicks + warm)
            warm_links, links = links[:warm], links[warm:]
            own = emulator_own(emulator, profile, clicks, concurrency)
            with child(server_cmd, env, work / f"connect-{workers}.log") as server:
                wait_for_http(f"{base}/healthz", proc=server, found=True, timeout=60)
                for link in warm_links:
                    assert click(link)[1], "a warm-up click did not connect"
                    _drop_http()  # the next on a new connection: another worker, perhaps
                cpu_before = cpu_seconds(server.pid)
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    done = list(pool.map(click, links))
                seconds = time.perf_counter() - started
                cpu = cpu_seconds(server.pid) - cpu_before
            held = ledger.counts_by_status(profile.target_id).get(Status.CONNECTED.value, 0)
            connected = held - warm
            ledger.close()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    ok = sum(1 for _, fine in done if fine)
    assert ok == connected, f"{ok} clicks ended connected, the ledger has {connected}"
    return Result(workers, clicks, connected, seconds, [t * 1000 for t, _ in done], own, cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, action="append", help="repeatable; 1, 2, 4")
    parser.add_argument("--clicks", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--no-beacon", action="store_true", help="clicks without the beacon")
    args = parser.parse_args()
    global BEACON
    BEACON = not args.no_beacon
    with tempfile.TemporaryDirectory(prefix="bench-connect-") as tmp:
        for workers in args.workers or [1, 2, 4]:
            result = run(workers, args.clicks, args.concurrency, args.latency_ms, Path(tmp))
            print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
