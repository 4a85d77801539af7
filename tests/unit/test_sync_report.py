"""What `onboard sync` shows, without Prefect's server: the funnel drawn (an SVG that parses,
as a `data:` image, and Unicode bars), Versori's words without URLs, the table's order, the
artifacts' keys; and the client reading an environment's activations past 1 MiB (one unpaged
array) while every other answer stays capped."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import httpx
import pytest

from flows.reporting.funnel_picture import blocks, funnel_image, funnel_svg, funnel_table
from flows.reporting.sync_summary import artifact_key, change_rows, scrub, summarise_sync
from onboarding.connections.activation import Activated
from onboarding.errors import APIError
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Funnel, Status
from onboarding.sync.versori_sync import ProfileSync, SyncChange, SyncReport
from onboarding.versori.client import VersoriClient

ORG, ENV, SYSTEM = (
    "01M8F12B95S4BX0QFB3TPDWZ0P",
    "01M8F12B95S4BX0QFB3TPDWZ1E",
    "01M8F12B95S4BX0QFB3TPDWZ0W",
)
FUNNEL = Funnel(
    linked=1000,
    delivered=990,
    opened=700,
    started=650,
    connected=600,
    declined=10,
    failed=3,
    activated=450,
    broken=25,
    disconnected=7,
)


def profile(name: str = "Acme CRM!") -> ConnectorProfile:
    return ConnectorProfile.model_validate(
        {
            "name": name,
            "api": "platform-v2",
            "organisation_id": ORG,
            "system_id": SYSTEM,
            "credential_id": "01M8F12B95S4BX0QFB3TPDWZ0X",
            "client_id": "c",
            "authorize_url": "https://provider.example.com/authorize",
            "connection_template_id": "01M8F12B95S4BX0QFB3TPDWZ0V",
            "environment_id": ENV,
        }
    )


def test_the_svg_parses_and_draws_a_bar_per_stage_and_status() -> None:
    svg = funnel_svg("A & B <Crm>", FUNNEL)
    root = ET.fromstring(svg)
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert texts[0] == "A & B <Crm>", "the title escaped, read back as written"
    for label in (*Funnel.STAGES, "broken", "disconnected", "declined", "failed"):
        assert label in texts
    assert "450 · 45%" in texts and "1,000 · 100%" in texts
    widths = [float(r.get("width", 0)) for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert 360.0 in widths, "linked: the whole bar"
    assert 162.0 in widths, "activated: 45 % of 360"


def test_an_empty_funnel_draws_no_bar_and_no_division_by_zero() -> None:
    empty = Funnel(0, 0, 0, 0, 0, 0, 0)
    root = ET.fromstring(funnel_svg("x", empty))
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") != "#f1f5f9"]
    assert all(float(r.get("width", 0)) == 0 for r in bars[1:]), "the background only"


def test_the_image_is_a_data_uri_of_the_svg_with_the_funnel_as_its_alt_text() -> None:
    image = funnel_image("acme [crm]", FUNNEL)
    match = re.fullmatch(r"!\[([^\[\]]*)\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", image)
    assert match is not None, image[:120]
    assert match.group(1).startswith("acme (crm): linked 1000 → delivered 990 (99%)")
    assert base64.b64decode(match.group(2)).decode() == funnel_svg("acme [crm]", FUNNEL)


@pytest.mark.parametrize(
    ("share", "bar"),
    [(0.0, "·"), (1.0, "█" * 24), (0.5, "█" * 12), (0.0001, "▏"), (1 / 48, "▌"), (2.0, "█" * 24)],
)
def test_unicode_bars_go_to_an_eighth_of_a_block(share: float, bar: str) -> None:
    assert blocks(share) == bar


def test_the_table_lists_every_stage_then_the_statuses_now() -> None:
    lines = funnel_table(FUNNEL)
    assert lines[2].startswith("| linked | 1,000 | 100% | " + "█" * 24)
    assert lines[7].startswith("| activated | 450 | 45% | ")
    assert lines[8].startswith("| *broken now* | 25 | 2% | ")
    assert len(lines) == 2 + 6 + 4


def test_versoris_words_lose_their_urls_and_stay_on_one_line() -> None:
    said = "invalid_grant:\n see https://idp.example/x?code=s3cr3t and ftp://a.b/c"
    assert scrub(said) == "invalid_grant: see <url> and <url>"
    assert len(scrub("x" * 500)) == 200


def report() -> SyncReport:
    synced = ProfileSync("Acme CRM!", SYSTEM, "platform-v2", tenants=5, versori_calls=4)
    synced.changes = [
        SyncChange("t3", SYSTEM, "Acme CRM!", Status.DELIVERED, Status.CONNECTED, "c3"),
        SyncChange(
            "t2", SYSTEM, "Acme CRM!", Status.CONNECTED, Status.BROKEN, "c2", "revoked", "x"
        ),
        SyncChange("t4", SYSTEM, "Acme CRM!", Status.DELIVERED, Status.DELIVERED, None, "gone"),
    ]
    at = datetime(2025, 1, 1, tzinfo=UTC)
    return SyncReport(
        [synced],
        activations=[
            ("t3", Activated("a3", connectors=(SYSTEM,))),
            ("t1", Activated(None, refused=("unprocessable", "see https://v.example/doc"))),
        ],
        versori_calls=6,
        started_at=at,
        finished_at=at.replace(second=3),
    )


def test_the_table_puts_refusals_then_broken_first_and_shows_no_url() -> None:
    rows = change_rows(report(), [profile()])
    assert [(r["tenant"], r["change"]) for r in rows] == [
        ("t1", "connected, activation refused"),
        ("t2", "connected → broken"),
        ("t3", "delivered → connected"),
        ("t4", "delivered (kept; its connection is gone)"),
        ("t3", "connected → activated"),
    ]
    assert "://" not in json.dumps(rows)


def test_the_summary_counts_changes_activations_refusals_and_calls() -> None:
    summary = summarise_sync(report(), [profile()], {SYSTEM: FUNNEL})
    assert summary["changes"] == {"connected": 1, "broken": 1, "delivered": 1}
    assert (summary["activated"], summary["refused"]) == (1, {"unprocessable": 1})
    assert summary["refusals"] == [
        {"tenant_id": "t1", "code": "unprocessable", "message": "see <url>"}
    ]
    assert (summary["versori_calls"], summary["activation_calls"], summary["seconds"]) == (6, 2, 3)
    [row] = summary["profiles"]
    assert row["activated"] == 1 and row["from"]["broken"] == {"connected": 1}
    assert summary["funnel"]["Acme CRM!"]["activated"] == 450
    json.dumps(summary)


def test_artifact_keys_keep_prefects_rule() -> None:
    one = artifact_key("sync-summary", [profile("Acme CRM!")])
    assert one == "sync-summary-acme-crm"
    many = artifact_key("sync", [profile("x" * 150), profile("Y_y")])
    assert re.fullmatch(r"[a-z0-9-]+", many) and len(many) <= 200


def activation(n: int) -> dict[str, object]:
    return {
        "id": f"01M8F12B95S4BX0QFB{n:08d}",
        "user": {"id": f"u{n}", "externalId": f"t{n}", "displayName": "x" * 400},
        "environmentId": ENV,
        "connections": [],
    }


def client_answering(body: bytes) -> VersoriClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    return VersoriClient(api_key="k" * 32, api="platform-v2", transport=transport)


def test_an_environments_activations_are_read_past_one_mib() -> None:
    body = json.dumps([activation(n) for n in range(3000)]).encode()
    assert len(body) > 1 << 20
    with client_answering(body) as client:
        assert len(client.environment_activations(ORG, ENV)) == 3000
        with pytest.raises(APIError, match="response body too large"):
            client.user_activations(ORG, ENV, "t1")
