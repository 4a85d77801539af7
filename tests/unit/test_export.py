"""onboarding/export.py: the ledger written out as CSV or JSON Lines, one row per (tenant,
connector), and the 0600 file `onboard export --output` writes (on SQLite and PostgreSQL; see
the `ledger` fixture in conftest.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deployments.cli import app
from onboarding.export import ExportFormat, private_file, write_records
from onboarding.ledger import EXPORT_KEYS, Ledger
from tests.unit.test_ledger import CONNECTOR, HOUR, NOW, OTHER, fail, get, link

pytestmark = pytest.mark.timeout(120)

# The columns, spelled out: a column added, dropped or moved is a change of the export's format.
COLUMNS = [
    "tenant_id",
    "connector_id",
    "connector_name",
    "status",
    "url",
    "state",
    "created_at",
    "expires_at",
    "attempts",
    "error_code",
    "error_message",
    "connection_id",
    "connected_at",
    "delivered_at",
    "opened_at",
    "last_sent_at",
    "reminders",
    "activation_id",
    "activated_at",
    "checked_at",
]


def exported(ledger: Ledger, fmt: ExportFormat, connector: str | list[str] | None = None) -> str:
    stream = io.StringIO()
    n = write_records(ledger, stream, fmt, connector)
    text = stream.getvalue()
    rows = csv_rows(text) if fmt is ExportFormat.CSV else jsonl_rows(text)
    assert n == len(rows), "it returns how many rows it wrote"
    return text


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def jsonl_rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def two_connectors(ledger: Ledger) -> Ledger:
    """t1 and t2 linked under both connectors; t2 failed since under OTHER (its link kept);
    t3 only failed under CONNECTOR, never linked."""
    for tenant_id in ("t2", "t1"):
        link(ledger, tenant_id)
        link(ledger, tenant_id, connector_id=OTHER, created_at=NOW + HOUR)
    fail(ledger, "t2", connector_id=OTHER)
    fail(ledger, "t3", error_code="validation_failed", error_message='bad "x", and\nmore')
    return ledger


def test_csv_has_the_export_columns_and_one_row_per_tenant_and_connector(
    two_connectors: Ledger,
) -> None:
    text = exported(two_connectors, ExportFormat.CSV)
    assert list(EXPORT_KEYS) == COLUMNS
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = csv_rows(text)
    assert [(r["tenant_id"], r["connector_id"]) for r in rows] == [
        ("t1", CONNECTOR),
        ("t1", OTHER),
        ("t2", CONNECTOR),
        ("t2", OTHER),
        ("t3", CONNECTOR),
    ], "tenant order, a tenant's connectors together"
    first = rows[0]
    assert first == {
        "tenant_id": "t1",
        "connector_id": CONNECTOR,
        "connector_name": "zendesk-demo",  # the profile's name, as the ledger keeps it
        "status": "link_created",
        "url": "https://login.example.com/authorize?state=state-t1",
        "state": "state-t1",
        "created_at": NOW.isoformat(),
        "expires_at": (NOW + 72 * HOUR).isoformat(),
        "attempts": "1",
        "error_code": "",
        "error_message": "",
        "connection_id": "",
        "connected_at": "",
        "delivered_at": "",
        "opened_at": "",
        "last_sent_at": "",
        "reminders": "0",
        "activation_id": "",
        "activated_at": "",
        "checked_at": "",
    }


def test_csv_values_with_quotes_commas_and_line_breaks_read_back_unchanged(
    two_connectors: Ledger,
) -> None:
    text = exported(two_connectors, ExportFormat.CSV)
    rows = {(r["tenant_id"], r["connector_id"]): r for r in csv_rows(text)}
    never_linked = rows[("t3", CONNECTOR)]
    assert never_linked["error_message"] == 'bad "x", and\nmore'
    assert never_linked["status"] == "failed" and never_linked["url"] == ""
    assert never_linked["created_at"] == "", "no date: an empty cell, not 'None'"
    failed_since = rows[("t2", OTHER)]
    assert (failed_since["status"], failed_since["error_code"]) == ("failed", "server_error")
    assert failed_since["url"].endswith("state=state-t2"), "a failure keeps the earlier link"
    assert failed_since["attempts"] == "2"


def test_jsonl_is_one_object_a_line_with_typed_values_and_no_header(
    two_connectors: Ledger,
) -> None:
    text = exported(two_connectors, ExportFormat.JSONL)
    rows = jsonl_rows(text)
    assert len(rows) == 5 and text.endswith("\n")
    assert all(list(r) == COLUMNS for r in rows)
    t1 = rows[0]
    assert t1["attempts"] == 1 and t1["reminders"] == 0, "a number, not text"
    assert t1["opened_at"] is None and t1["connection_id"] is None
    assert t1["status"] == "link_created"
    assert t1["created_at"] == NOW.isoformat()
    assert datetime.fromisoformat(str(t1["expires_at"])) == NOW + 72 * HOUR
    never_linked = rows[-1]
    assert never_linked["url"] is None and never_linked["created_at"] is None
    assert never_linked["error_message"] == 'bad "x", and\nmore'


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_the_connector_filter_takes_one_id_several_or_none(
    two_connectors: Ledger, fmt: ExportFormat
) -> None:
    def pairs(connector: str | list[str] | None) -> list[tuple[object, object]]:
        text = exported(two_connectors, fmt, connector)
        rows = csv_rows(text) if fmt is ExportFormat.CSV else jsonl_rows(text)
        return [(r["tenant_id"], r["connector_id"]) for r in rows]

    assert pairs(OTHER) == [("t1", OTHER), ("t2", OTHER)]
    assert pairs([CONNECTOR]) == [("t1", CONNECTOR), ("t2", CONNECTOR), ("t3", CONNECTOR)]
    assert len(pairs([CONNECTOR, OTHER])) == len(pairs(None)) == 5
    assert pairs(["01M8F12B95S4BX0QFB3TPDWZ00"]) == []


def test_an_empty_ledger_is_a_header_in_csv_and_nothing_in_jsonl(ledger: Ledger) -> None:
    assert exported(ledger, ExportFormat.CSV) == ",".join(COLUMNS) + "\n"
    assert exported(ledger, ExportFormat.JSONL) == ""


def test_nothing_but_the_export_columns_leaves_the_ledger(two_connectors: Ledger) -> None:
    for fmt in ExportFormat:
        text = exported(two_connectors, fmt)
        assert "admin@t1.example.com" not in text and "Tenant t1" not in text
        assert "run-1" not in text
        # The profile's name is a column now (connector_name), and nowhere else.
        rows = csv_rows(text) if fmt is ExportFormat.CSV else jsonl_rows(text)
        assert text.count("zendesk-demo") == len(rows)
        assert {r["connector_name"] for r in rows} == {"zendesk-demo"}


@pytest.fixture
def followed_up(ledger: Ledger) -> dict[str, str]:
    """t1 delivered, reminded twice, its connect links opened (the second one first), then
    connected; t2 delivered, its link issued but never opened. Every secret value written for
    them that the export must not hold: the links' tokens, their hashes, their CSRF values, the
    states' hashes."""
    secrets: list[str] = []
    for tenant_id in ("t1", "t2"):
        link(ledger, tenant_id)
        ledger.mark_delivered(tenant_id, CONNECTOR, channel="email", at=NOW + HOUR)
        secrets.append(str(get(ledger, tenant_id).state_hash))
    ledger.mark_reminded("t1", CONNECTOR, channel="email", at=NOW + 2 * HOUR)
    ledger.mark_reminded("t1", CONNECTOR, channel="email", at=NOW + 3 * HOUR)
    tokens = [
        ledger.issue_connect_link(tenant_id, CONNECTOR, "profile.yaml", NOW + 99 * HOUR, now=NOW)
        for tenant_id in ("t1", "t1", "t2")
    ]
    links = [ledger.find_connect_link(token) for token in tokens]
    for connect_link, at in ((links[1], NOW + 4 * HOUR), (links[0], NOW + 5 * HOUR)):
        assert connect_link is not None
        ledger.note_link_opened(connect_link, at=at)
        ledger.note_link_opened(connect_link, at=at + HOUR)
    ledger.mark_connected("t1", CONNECTOR, connection_id="conn-t1", at=NOW + 6 * HOUR)
    for token, connect_link in zip(tokens, links, strict=True):
        assert connect_link is not None
        secrets += [token, connect_link.token_hash, connect_link.csrf]
    return {f"secret-{n}": value for n, value in enumerate(secrets)}


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_a_connected_tenants_connection_and_its_follow_up_are_exported(
    followed_up: dict[str, str], ledger: Ledger, fmt: ExportFormat
) -> None:
    text = exported(ledger, fmt)
    rows = csv_rows(text) if fmt is ExportFormat.CSV else jsonl_rows(text)
    t1, t2 = ({k: str(v) if v is not None else "" for k, v in row.items()} for row in rows)
    assert {k: t1[k] for k in COLUMNS[-9:-3]} == {
        "connection_id": "conn-t1",
        "connected_at": (NOW + 6 * HOUR).isoformat(),
        "delivered_at": (NOW + HOUR).isoformat(),
        "opened_at": (NOW + 4 * HOUR).isoformat(),  # the first open of either link
        "last_sent_at": (NOW + 3 * HOUR).isoformat(),
        "reminders": "2",
    }
    assert t1["status"] == "connected"
    assert {k: t2[k] for k in COLUMNS[-9:-3]} == {
        "connection_id": "",
        "connected_at": "",
        "delivered_at": (NOW + HOUR).isoformat(),
        "opened_at": "",  # its link was never opened
        "last_sent_at": (NOW + HOUR).isoformat(),
        "reminders": "0",
    }
    for name, secret in followed_up.items():
        assert secret not in text, f"{name} ({len(secret)} characters) is in the export"
    only_other = exported(ledger, fmt, OTHER)
    assert only_other == ("" if fmt is ExportFormat.JSONL else ",".join(COLUMNS) + "\n")


# --- the file ----------------------------------------------------------------------------------


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)  # files would otherwise be 0644
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("usual_umask")
def test_private_file_creates_a_file_only_its_owner_may_read(tmp_path: Path) -> None:
    path = tmp_path / "links.csv"
    with private_file(path) as f:
        f.write("a\r\nb\n")
    assert mode(path) == 0o600
    assert path.read_bytes() == b"a\r\nb\n", "line ends written as given (csv's own)"


def test_private_file_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with private_file(tmp_path / "links.jsonl") as f:
            f.write("{}\n")
    finally:
        os.umask(old)
    assert mode(tmp_path / "links.jsonl") == 0o600


@pytest.mark.usefixtures("usual_umask")
def test_private_file_truncates_an_existing_file_and_makes_it_0600(tmp_path: Path) -> None:
    path = tmp_path / "links.csv"
    path.write_text("an older, longer export\n" * 10)
    path.chmod(0o644)
    with private_file(path) as f:
        f.write("new\n")
    assert path.read_text() == "new\n"
    assert mode(path) == 0o600


def test_private_file_writes_utf8(tmp_path: Path) -> None:
    with private_file(tmp_path / "x.csv") as f:
        f.write("Zürich\n")
    assert (tmp_path / "x.csv").read_bytes() == "Zürich\n".encode()


@pytest.mark.usefixtures("usual_umask")
def test_export_writes_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`onboard export --output`, in this process: the file is 0600, an existing one too."""
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    link(ledger, "t1")
    ledger.close()
    out = tmp_path / "links.csv"
    out.write_text("old\n")
    out.chmod(0o644)  # an existing file too
    for fmt in ("csv", "jsonl"):
        result = CliRunner().invoke(app, ["export", "--format", fmt, "--output", str(out)])
        assert result.exit_code == 0, result.output
        assert "state-t1" in out.read_text() and "old" not in out.read_text()
        assert mode(out) & 0o077 == 0
        said = "".join(result.output.split())  # the console may wrap a long path
        assert "".join(f"1 record(s) written to {out}".split()) in said


def test_export_to_stdout_filters_by_connector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONBOARD_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    link(ledger, "t1")
    link(ledger, "t1", connector_id=OTHER)
    ledger.close()
    result = CliRunner().invoke(app, ["export", "--format", "csv", "--connector", OTHER])
    assert result.exit_code == 0, result.output
    rows = csv_rows(result.stdout)
    assert [(r["tenant_id"], r["connector_id"]) for r in rows] == [("t1", OTHER)]
    written = {p.name for p in tmp_path.iterdir()} - {"ledger.db", "ledger.db-wal", "ledger.db-shm"}
    assert written == set(), "no file written without --output"
