"""How many SQL statements the connect service runs per click, request by request.

    uv run python bench/connect_sql.py                     # this checkout, PostgreSQL
    uv run python bench/connect_sql.py --clicks 50
    cd ../other-checkout && uv run python /path/to/bench/connect_sql.py --project .

In-process (the service's app under Starlette's TestClient, the emulator on a thread, a ledger
in a fresh schema of the PostgreSQL at ONBOARD_BENCH_PG): each tenant's click is the link page
(GET), the page's beacon when the page has one (POST /c/<token>/seen), the button (POST), the
provider's consent, and the callback. A SQLAlchemy listener counts the statements each request
sends to the ledger (BEGIN/COMMIT are not statements); apart, the pool's pings (a `SELECT 1`
round trip before a connection is used, which no statement event sees). The ledger is opened
as `onboard connect-server` opens it (its pings only for a connection idle a while, where the
checkout has that setting). `--project` measures another checkout of this project with this
same script, so two versions are counted the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

PG = os.environ.get("ONBOARD_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.project.resolve()))

    import httpx
    from sqlalchemy import create_engine, event, text
    from sqlalchemy.engine import make_url

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from starlette.testclient import TestClient

    from bench.connect import seed
    from connect_service.app import create_app
    from connect_service.service import ConnectService
    from demo.connect_click import write_connect_profile
    from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
    from onboarding.inputs.profile import load_profile
    from onboarding.ledger import Ledger
    from onboarding.versori.client import VersoriClient

    def served_ledger(url: str) -> Ledger:
        """The ledger as the server opens it (connect_service/app.py's app_from_env)."""
        try:
            from connect_service.app import LEDGER_PING_IDLE_SECONDS
            from onboarding.ledger import Database
        except ImportError:  # a checkout from before: a ping at every checkout
            return Ledger(url)
        return Ledger(Database(url, ping_idle=LEDGER_PING_IDLE_SECONDS))

    admin = create_engine(PG)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG).update_query_dict({"options": f"-csearch_path={schema}"})
    ledger = served_ledger(url.render_as_string(hide_password=False))
    counts: Counter[str] = Counter()
    pings: Counter[str] = Counter()
    phase = ["setup"]

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def count(*_: Any) -> None:
        counts[phase[0]] += 1

    dialect = ledger.engine.dialect
    real_ping = dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        pings[phase[0]] += 1
        return bool(real_ping(dbapi_connection))

    dialect.do_ping = ping  # type: ignore[method-assign]

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / schema
    tmp.mkdir(parents=True)
    try:
        with EmulatorServer(EmulatorConfig()) as emulator:
            path = write_connect_profile(
                tmp / "p.yaml", emulator.base_url, "http://127.0.0.1:8800/callback"
            )
            profile = load_profile(path)

            def client_for(api: str) -> VersoriClient:
                return VersoriClient(
                    api=api,  # type: ignore[arg-type]
                    api_key=DEFAULT_API_KEY,
                    base_url=emulator.base_url,
                )

            clients: dict[str, VersoriClient] = {}
            service = ConnectService(
                ledger,
                client_for=lambda api: clients.setdefault(api, client_for(api)),
                secure_cookies=False,
            )
            # bench/connect.py's tenants (a delivered batch link, then a durable one each).
            links = seed(ledger, profile, path, "http://127.0.0.1:8800", args.clicks)
            tokens = [link.rsplit("/", 1)[1] for link in links]
            for token in tokens:
                app = TestClient(create_app(service), follow_redirects=False)
                phase[0] = "link page (GET)"
                page = app.get(f"/c/{token}")
                csrf = _CSRF.search(page.text)
                assert csrf, page.text
                if "<script>" in page.text:
                    phase[0] = "beacon (POST /seen)"
                    app.post(f"/c/{token}/seen", data={"csrf": csrf.group(1)})
                phase[0] = "button (POST)"
                pressed = app.post(f"/c/{token}", data={"csrf": csrf.group(1)})
                assert pressed.status_code == 303, pressed.text
                authorize = httpx.URL(pressed.headers["location"])
                phase[0] = "consent"
                back = httpx.post(
                    authorize.copy_with(query=None),
                    data={
                        "state": authorize.params["state"],
                        "client_id": authorize.params["client_id"],
                        "decision": "allow",
                    },
                )
                phase[0] = "callback"
                done = app.get(f"/callback?{httpx.URL(back.headers['location']).query.decode()}")
                assert done.status_code in (200, 303), done.text
            for client in clients.values():
                client.close()
    finally:
        ledger.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    clicks = args.clicks
    print(f"{args.project.resolve()}: {clicks} clicks, SQL statements (and pool pings) per click")
    total = total_pings = 0.0
    for name in ("link page (GET)", "beacon (POST /seen)", "button (POST)", "callback"):
        if name in counts:
            per, per_ping = counts[name] / clicks, pings[name] / clicks
            total += per
            total_pings += per_ping
            print(f"  {name:<22} {per:5.1f}   ({per_ping:.1f} pings)")
    print(f"  {'a click in all':<22} {total:5.1f}   ({total_pings:.1f} pings)")


if __name__ == "__main__":
    main()
