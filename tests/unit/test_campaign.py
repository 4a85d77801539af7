"""A campaign's parts without Prefect: a tenant's outcome over its connectors, the email that
carries several links, and the templates' check that such an email shows every link."""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest

from onboarding.errors import InputError
from onboarding.mail import MailLink, MailTemplates, build_message, message_id_for
from onboarding.outcomes import TenantOutcome, combined
from onboarding.roster import Tenant

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
FROM = "onboarding@saas.example.com"
TENANT = Tenant(tenant_id="t1", name="Acme", admin_email="admin@acme.example.com")
HUBSPOT = MailLink(
    "HubSpot",
    "c-hubspot",
    "https://app.hubspot.example/oauth?state=s1",
    "s1",
    NOW + timedelta(hours=72),
)
SLACK = MailLink(
    "Slack", "c-slack", "https://slack.example/oauth?state=s2", "s2", NOW + timedelta(hours=24)
)


def part(status: str, connector: str, code: str = "") -> TenantOutcome:
    return TenantOutcome("t1", status, error_code=code, error_message=code, connector=connector)


@pytest.mark.parametrize(
    ("statuses", "overall"),
    [
        (["delivered", "delivered"], "delivered"),
        (["delivered", "skipped"], "delivered"),
        (["skipped", "connected"], "connected"),
        (["skipped", "skipped"], "skipped"),
        (["reminded", "connected"], "reminded"),
        (["delivered", "failed"], "failed"),
        (["failed", "skipped"], "failed"),
    ],
)
def test_a_tenant_fails_when_any_connector_failed_else_says_the_most_that_happened(
    statuses: list[str], overall: str
) -> None:
    parts = [part(s, f"c{i}", "boom" if s == "failed" else "") for i, s in enumerate(statuses)]
    outcome = combined("t1", parts)
    assert outcome.status == overall and outcome.parts == tuple(parts)
    if overall == "failed":
        failed = next(p for p in parts if p.status == "failed")
        assert outcome.error_code == "boom" and outcome.error_message.startswith(failed.connector)
    # The table has one row per connector, each naming it.
    assert [r["connector"] for r in outcome.rows()] == [p.connector for p in parts]


def test_one_email_carries_every_link_with_its_connector_and_expiry() -> None:
    message = build_message(
        tenant=TENANT, links=[HUBSPOT, SLACK], email_from=FROM, templates=MailTemplates(), now=NOW
    )
    parsed = message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Connect Acme to HubSpot and Slack"
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "1. HubSpot:" in text and "2. Slack:" in text
    assert text.index(HUBSPOT.url) < text.index("2. Slack:") < text.index(SLACK.url)
    assert "in about 72 hours" in text and "in about 24 hours" in text
    for link in (HUBSPOT, SLACK):
        assert link.url in text and link.url.replace("&", "&amp;") in html
        assert link.state not in parsed["Subject"] and link.state not in parsed["Message-ID"]


def test_the_message_id_follows_the_set_of_links() -> None:
    both = message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s2")])
    assert both == message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s2")])
    assert both != message_id_for("t1", "c-hubspot", "s1", FROM)
    assert both != message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s3")])
    assert both != message_id_for(
        "t1", "c-hubspot", "s1", FROM, reminder=1, more=[("c-slack", "s2")]
    )


def test_a_template_that_shows_one_link_is_refused_for_a_campaign(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("Connect {{ tenant.name }}: {{ link }}\n")
    templates = MailTemplates(tmp_path)  # fine for one connector
    with pytest.raises(InputError, match=r"body\.txt.*loop over `links`"):
        templates.check_campaign()
    (tmp_path / "body.txt").write_text(
        "{% for item in links %}{{ item.connector_name }}: {{ item.link }}\n{% endfor %}"
    )
    MailTemplates(tmp_path).check_campaign()


def test_a_subject_that_shows_a_campaign_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "subject.txt").write_text("Connect {{ links[-1].link }}\n")
    with pytest.raises(InputError, match=r"subject\.txt.*must not show the link"):
        MailTemplates(tmp_path).check_campaign()


def test_a_render_error_never_quotes_any_of_the_links(tmp_path: Path) -> None:
    # Passes the load-time check (sample links), fails on the real second link, naming it.
    (tmp_path / "body.txt").write_text(
        "{% for item in links %}{{ item.link }}{% endfor %}"
        '{% if "slack.example" in links[-1].link %}{{ {}[links[-1].link] }}{% endif %}\n'
    )
    templates = MailTemplates(tmp_path)
    with pytest.raises(InputError) as caught:
        build_message(
            tenant=TENANT, links=[HUBSPOT, SLACK], email_from=FROM, templates=templates, now=NOW
        )
    assert "body.txt" in str(caught.value) and "<link>" in str(caught.value)
    assert HUBSPOT.url not in str(caught.value) and SLACK.url not in str(caught.value)
