"""The deployments for real: a `prefect server` process, `onboard serve`, the emulator; runs
started through the Prefect REST API; `prefect deploy --all` onto a process work pool. Every
process is stopped on the way out, failures included."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from demo.processes import PROJECT, base_env, child, wait_for_http
from onboarding.ledger import Ledger, Status

pytestmark = pytest.mark.e2e

CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deployments")
    api = prefect_api  # the session's server (tests/conftest.py)
    with EmulatorServer() as emulator:
        env = base_env(tmp)
        env.update(
            PREFECT_API_URL=api,
            VERSORI_BASE_URL=emulator.base_url,
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=f"sqlite:///{tmp / 'ledger.db'}",
        )
        # `onboard serve` asks the server for runs to start every second instead of every 10
        # (Prefect's default): a run created through the API starts up to 9 s sooner.
        served_env = dict(env, PREFECT_RUNNER_POLL_FREQUENCY="1")
        with child([str(BIN / "onboard"), "serve"], served_env, tmp / "serve.log") as served:
            wait_for_http(
                f"{api}/deployments/name/record-connection/callback", 90, proc=served, found=True
            )
            yield {"api": api, "env": env, "tmp": tmp, "db": env["ONBOARD_DB_URL"]}


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST as a backend should: retry 503 (Prefect's "retry me", e.g. its SQLite was busy)
    with backoff. Safe for create_flow_run because the body carries an idempotency key."""
    for delay in (0.2, 0.5, 1, 2, 4, 0):
        response = httpx.post(url, json=body, timeout=30)
        if response.status_code != 503 or not delay:
            return response
        time.sleep(delay)
    raise AssertionError("unreachable")


def deployment_id(api: str, name: str) -> str:
    response = httpx.get(f"{api}/deployments/name/{name}")
    response.raise_for_status()
    return str(response.json()["id"])


def wait_terminal(api: str, flow_run_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in TERMINAL:
            return dict(run)
        time.sleep(0.5)
    raise TimeoutError(f"flow run {flow_run_id} not finished in {timeout} s")


TENANTS = [
    {
        "tenant_id": "cust-101",
        "name": "Acme",
        "admin_email": "it@acme.example.com",
        "fields": {"subdomain": "acme"},
    },
    {
        "tenant_id": "cust-102",
        "name": "Globex",
        "admin_email": "it@globex.example.com",
        "fields": {"subdomain": "globex"},
    },
]


def test_a_backend_starts_a_run_through_the_rest_api(stack: dict[str, Any]) -> None:
    api = stack["api"]
    deployment = deployment_id(api, "onboard-tenants/api")
    body = {"parameters": {"tenants": TENANTS}, "idempotency_key": "signup-cust-101-102"}
    first = post(f"{api}/deployments/{deployment}/create_flow_run", body)
    assert first.status_code == 201, first.text
    retried = post(f"{api}/deployments/{deployment}/create_flow_run", body)
    assert retried.status_code < 300, retried.text
    assert retried.json()["id"] == first.json()["id"], "a retried call starts one run"

    run = wait_terminal(api, first.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == "zendesk-demo (Zendesk Demo) for cust-101, cust-102"
    assert "profile:zendesk-demo" in run["tags"]

    deadline = time.monotonic() + 30
    names: set[str] = set()
    while time.monotonic() < deadline and len(names) < 2:  # task runs arrive as events
        task_runs = post(
            f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
        ).json()
        names = {t["name"] for t in task_runs}
        time.sleep(0.5)
    assert names == {"onboard cust-101", "onboard cust-102"}, "an API run: a task run per tenant"

    # On a real server every tenant status change is an event (tenant_events: auto).
    query = {
        "filter": {
            "event": {"prefix": ["onboarding.tenant."]},
            "related": {"id": [f"prefect.flow-run.{run['id']}"]},
        },
        "limit": 50,
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = post(f"{api}/events/filter", query).json()["events"]
        if len(events) >= 2:
            break
        time.sleep(0.5)
    assert sorted((e["resource"]["prefect.resource.id"], e["event"]) for e in events) == [
        ("onboarding.tenant.cust-101", "onboarding.tenant.delivered"),
        ("onboarding.tenant.cust-102", "onboarding.tenant.delivered"),
    ]

    artifacts = post(
        f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    ).json()
    keys = {a["key"] for a in artifacts}
    assert {"onboarding-zendesk-demo", "onboarding-summary-zendesk-demo"} <= keys
    assert any(a["type"] == "progress" for a in artifacts)
    table = next(a for a in artifacts if a["key"] == "onboarding-zendesk-demo")
    assert "cust-101" in str(table["data"]) and "state=" not in str(table["data"])

    ledger = Ledger(stack["db"])
    for tenant in ("cust-101", "cust-102"):
        record = ledger.get(tenant, CONNECTOR)
        assert record is not None and record.status is Status.DELIVERED and record.url
    ledger.close()


@pytest.mark.parametrize(
    "parameters",
    [
        {"tenants": TENANTS, "concurrency": 0},
        {"tenants": TENANTS, "deliver": "fax"},
        {"tenants": [{"tenant_id": "x"}]},
        {"tenants": TENANTS * 51},
    ],
    ids=["concurrency-0", "unknown-delivery", "tenant-missing-fields", "over-100-tenants"],
)
def test_the_schema_refuses_bad_parameters(
    stack: dict[str, Any], parameters: dict[str, Any]
) -> None:
    api = stack["api"]
    deployment = deployment_id(api, "onboard-tenants/api")
    response = post(f"{api}/deployments/{deployment}/create_flow_run", {"parameters": parameters})
    assert 400 <= response.status_code < 500, response.text


def test_served_deployments_match_prefect_yaml(stack: dict[str, Any]) -> None:
    api = stack["api"]
    scheduled = httpx.get(f"{api}/deployments/name/onboard-tenants/scheduled").json()
    (schedule,) = scheduled["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "Europe/London"
    assert scheduled["global_concurrency_limit"]["limit"] == 1
    assert scheduled["parameters"]["deliver"] == "email"
    assert schedule["active"] is False, "shipped off: it would email examples/tenants.csv"
    for name in ("onboard-tenants/manual", "remind-tenants/daily", "record-connection/callback"):
        assert httpx.get(f"{api}/deployments/name/{name}").status_code == 200
    sync = httpx.get(f"{api}/deployments/name/sync-connections/sync").json()
    (hourly,) = sync["schedules"]
    assert hourly["schedule"]["cron"] == "15 * * * *" and hourly["active"] is False
    assert sync["parameters"] == {"profile": "examples/profile-connect.yaml"}
    assert sync["global_concurrency_limit"]["limit"] == 1
    assert sync["parameter_openapi_schema"]["properties"]["concurrency"]["maximum"] == 64
    manual = httpx.get(f"{api}/deployments/name/onboard-tenants/manual").json()
    form = manual["parameter_openapi_schema"]
    assert form["properties"]["dry_run"]["type"] == "boolean"
    assert form["properties"]["deliver"]["$ref"].endswith("/Delivery")
    assert form["definitions"]["Delivery"]["enum"] == ["store", "email", "both"]
    assert "Check the inputs" in form["properties"]["dry_run"]["description"]


def test_prefect_deploy_all_onto_a_process_work_pool(stack: dict[str, Any]) -> None:
    env = dict(stack["env"])
    env["ONBOARD_PROJECT_DIR"] = str(PROJECT)
    created = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "onboarding", "--type", "process"],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    api = stack["api"]
    deployments = post(f"{api}/deployments/filter", {}).json()
    on_pool = {
        (d["name"], d["work_pool_name"]) for d in deployments if d["work_pool_name"] == "onboarding"
    }
    assert {name for name, _ in on_pool} == {
        "scheduled",
        "manual",
        "api",
        "daily",
        "chunks",
        "callback",
        "sync",
    }
    scheduled = httpx.get(f"{api}/deployments/name/onboard-tenants/scheduled").json()
    assert [s["active"] for s in scheduled["schedules"]] == [False]
    daily = httpx.get(f"{api}/deployments/name/remind-tenants/daily").json()
    assert daily["work_pool_name"] == "onboarding"
    assert daily["job_variables"]["env"]["VERSORI_API_KEY_BLOCK"] == "versori-api-key"
    assert "set_project_dir" in str(daily["pull_steps"])


# --- prefect.yaml without a server (issue 10 #11) -------------------------------------------


def _pull(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run prefect.yaml's pull steps as a worker's flow run does, from an unrelated folder.
    Each step sends events, to the session's server (`prefect_harness`): without a server,
    Prefect would start a temporary one in this process for them."""
    import asyncio

    from prefect.deployments.steps.core import run_steps

    from deployments.serve import read_config

    monkeypatch.chdir(tmp_path)
    asyncio.run(run_steps(read_config()["pull"]))
    return Path.cwd()


@pytest.mark.usefixtures("prefect_harness")
def test_the_pull_step_without_onboard_project_dir_starts_in_the_project(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ONBOARD_PROJECT_DIR", raising=False)
    assert _pull(monkeypatch, tmp_path) == PROJECT.resolve()


@pytest.mark.usefixtures("prefect_harness")
def test_the_pull_step_follows_onboard_project_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "prefect.yaml").write_text("name: x\n")
    monkeypatch.setenv("ONBOARD_PROJECT_DIR", str(checkout))
    assert _pull(monkeypatch, tmp_path) == checkout.resolve()


@pytest.mark.usefixtures("prefect_harness")
def test_a_wrong_onboard_project_dir_fails_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONBOARD_PROJECT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(Exception) as info:  # Prefect wraps a step's error in its own
        _pull(monkeypatch, tmp_path)
    text = f"{info.value} {info.value.__cause__}"
    assert "ONBOARD_PROJECT_DIR" in text and "set" in text


def test_no_deployment_emails_the_example_roster_on_a_schedule_out_of_the_box() -> None:
    from deployments.serve import deployments_from_yaml, read_config

    config = read_config()
    for spec in config["deployments"]:
        parameters = spec.get("parameters") or {}
        if parameters.get("deliver", "store") != "store" and str(
            parameters.get("roster", "")
        ).startswith("examples/"):
            active = [s for s in spec.get("schedules", []) if s.get("active", True)]
            assert not active, f"{spec['name']} would email {parameters['roster']} on a schedule"
    served = {d.name: d for d in deployments_from_yaml(config)}
    schedules = served["scheduled"].schedules
    assert schedules is not None
    assert [s.active for s in schedules] == [False]


def test_deployment_names_are_unique_in_prefect_yaml() -> None:
    from deployments.serve import read_config

    names = [spec["name"] for spec in read_config()["deployments"]]
    assert len(names) == len(set(names)), names
