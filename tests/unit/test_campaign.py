"""onboarding/batch/campaign.py: one tenant's step over a campaign of two connectors (Zendesk on the
Connect API v1, Slack on the Platform API v2), without Prefect: `onboard_tenant` issues every
link the tenant needs and sends one email with all of them; `remind_tenant` sends one reminder
for what it has not connected. Versori and the SMTP sender are fakes; the ledger is a real
SQLite file. Outcomes: tests/unit/test_outcomes.py; the email itself: tests/unit/test_mail.py;
campaigns through the flow: tests/flows/test_campaign.py."""

from __future__ import annotations

import email.policy
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from demo.emulator_config import EmulatedConnector
from demo.versori_rules import build_url
from onboarding.batch.campaign import Campaign, onboard_tenant, remind_tenant
from onboarding.batch.connector_run import ConnectorRun
from onboarding.batch.delivery import Delivery
from onboarding.batch.outcomes import StatusChange, TenantOutcome
from onboarding.batch.retry_policy import RetryLater, Tries
from onboarding.clock import utcnow
from onboarding.errors import BadRequestError, ServerError, TransientMailError
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger, Record, Status
from onboarding.mail import MailTemplates
from onboarding.settings.brand import BrandValues
from onboarding.versori.wire import InitialiseRequest, parse_additional_params

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ZENDESK = load_profile(EXAMPLES / "profile.yaml")  # connect-v1, authorize URL per subdomain
SLACK = load_profile(EXAMPLES / "profile-slack.yaml")  # platform-v2, team={tenant_id}
FROM = "Onboarding <onboarding@saas.example.com>"
TENANT = Tenant(
    tenant_id="t1", name="Acme", admin_email="admin@t1.example.com", fields={"subdomain": "t1"}
)
NOT_LAST = Tries(last_attempt=False)  # a transient failure is tried again
LAST = Tries(last_attempt=True)


class FakeVersori:
    """One connector's Versori: `plan` scripts each tenant's calls (errors, then links as the
    emulator makes them); `then`, if set, runs after each successful call."""

    def __init__(self, profile: ConnectorProfile, plan: dict[str, list[Exception]]) -> None:
        self.profile = profile
        self.plan = {tenant: list(errors) for tenant, errors in plan.items()}
        self.calls: Counter[str] = Counter()
        self.then: Callable[[str], None] | None = None
        self._lock = threading.Lock()

    def initialise(
        self, organisation_id: str, connector_id: str, request: InitialiseRequest
    ) -> str:
        assert connector_id == self.profile.target_id
        pairs = parse_additional_params(request.additional_params or "")
        host = urlsplit(request.authorize_url).hostname or ""
        tenant_id = dict(pairs).get("team") or host.split(".")[0]
        with self._lock:
            self.calls[tenant_id] += 1
            errors = self.plan.get(tenant_id)
            error = errors.pop(0) if errors else None
            n = self.calls[tenant_id]
        if error is not None:
            raise error
        connector = EmulatedConnector(
            organisation_id,
            connector_id,
            self.profile.credential_id,
            organisation_id,
            self.profile.client_id,
        )
        body = request.model_dump(by_alias=True)
        state = f"{self.profile.name}-{tenant_id}-state-{n}"
        url = build_url(request.authorize_url, connector, body, pairs, state)
        if self.then is not None:
            self.then(tenant_id)
        return url


class FakeMailer:
    """The SMTP sender: keeps what it is given; `fail` holds errors for the next sends."""

    email_from = FROM

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.fail: list[Exception] = []

    def send(self, message: EmailMessage) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.sent.append(message)


class Setup:
    """A campaign of both connectors over one ledger, email delivery, and what it talks to."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.zendesk = FakeVersori(ZENDESK, {})
        self.slack = FakeVersori(SLACK, {})
        self.mailer = FakeMailer()
        self.changes: list[StatusChange] = []

    def campaign(self, **options: object) -> Campaign:
        runs = [
            ConnectorRun(
                profile=profile,
                client=client,  # type: ignore[arg-type]
                ledger=self.ledger,
                deliver=Delivery.EMAIL,
                on_status=self.changes.append,
            )
            for profile, client in ((ZENDESK, self.zendesk), (SLACK, self.slack))
        ]
        return Campaign(
            runs,
            Delivery.EMAIL,
            mailer=self.mailer,  # type: ignore[arg-type]
            templates=MailTemplates(brand=BrandValues()),
            **options,  # type: ignore[arg-type]
        )

    def record(self, profile: ConnectorProfile, tenant_id: str = "t1") -> Record:
        record = self.ledger.get(tenant_id, profile.target_id)
        assert record is not None
        return record

    def text_of(self, message: EmailMessage) -> str:
        parsed = message_from_bytes(message.as_bytes(), policy=email.policy.default)
        body = parsed.get_body(("plain",))
        assert body is not None
        return str(body.get_content())


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        yield Setup(ledger)
    finally:
        ledger.close()


def by_connector(outcome: TenantOutcome) -> dict[str, tuple[str, str]]:
    return {p.connector: (p.status, p.error_code) for p in outcome.parts}


def state_in(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["state"]


# --- onboard_tenant ----------------------------------------------------------------------------


def test_one_email_carries_both_links_and_each_connector_records_its_delivery(
    setup: Setup,
) -> None:
    outcome = onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    assert outcome.status == "delivered"
    assert by_connector(outcome) == {
        "zendesk-demo": ("delivered", ""),
        "slack-demo": ("delivered", ""),
    }
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 1}, {"t1": 1})
    (message,) = setup.mailer.sent
    assert message["To"] == "admin@t1.example.com"
    text = setup.text_of(message)
    zendesk, slack = setup.record(ZENDESK), setup.record(SLACK)
    for record in (zendesk, slack):
        assert record.url and record.url in text
        assert record.status is Status.DELIVERED and record.delivery_channel == "email"
        assert record.message_id == message["Message-ID"], "both rows name the one message"
    assert text.index(zendesk.url or "") < text.index(slack.url or ""), "in the campaign's order"
    assert zendesk.url and zendesk.url.startswith("https://t1.zendesk.com/")
    assert slack.url and "team=t1" in slack.url
    assert [(c.profile, c.status) for c in setup.changes] == [
        ("zendesk-demo", "link_created"),
        ("slack-demo", "link_created"),
        ("zendesk-demo", "delivered"),
        ("slack-demo", "delivered"),
    ]


def test_with_a_connect_base_url_the_email_carries_durable_links_not_authorize_urls(
    setup: Setup,
) -> None:
    base = "https://connect.example.com"
    outcome = onboard_tenant(setup.campaign(connect_base_url=base), TENANT, NOT_LAST)
    assert outcome.status == "delivered"
    (message,) = setup.mailer.sent
    text = setup.text_of(message)
    tokens = re.findall(re.escape(base) + r"/c/([A-Za-z0-9_-]+)", text)
    assert len(tokens) == 2 and len(set(tokens)) == 2, "one durable link per connector"
    for profile, token in zip((ZENDESK, SLACK), tokens, strict=True):
        record = setup.record(profile)
        assert record.url and record.url not in text, "the authorize URL stays in the ledger"
        link = setup.ledger.find_connect_link(token)
        assert link is not None and link.connector_id == profile.target_id


def test_a_connector_failing_for_good_still_mails_the_others_link(setup: Setup) -> None:
    setup.zendesk.plan["t1"] = [BadRequestError(400, "validation_failed", "scopes: unknown")]
    campaign = setup.campaign()
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)  # a 400 is final: no RetryLater
    assert outcome.status == "failed" and outcome.error_code == "validation_failed"
    assert outcome.error_message.startswith("zendesk-demo: ")
    assert by_connector(outcome) == {
        "zendesk-demo": ("failed", "validation_failed"),
        "slack-demo": ("delivered", ""),
    }
    (message,) = setup.mailer.sent
    text = setup.text_of(message)
    assert (setup.record(SLACK).url or "-") in text and "zendesk.com" not in text
    failed = setup.record(ZENDESK)
    assert (failed.status, failed.error_code, failed.url) == (
        Status.FAILED,
        "validation_failed",
        None,
    )
    assert ("zendesk-demo", "failed", "validation_failed") in [
        (c.profile, c.status, c.error_code) for c in setup.changes
    ]
    assert campaign.held == {}, "nothing kept once the tenant is decided"


def test_a_transient_failure_raises_retry_later_and_the_retry_calls_only_that_connector(
    setup: Setup,
) -> None:
    down = ServerError(503, "unavailable", "try later")
    setup.zendesk.plan["t1"] = [down]
    campaign = setup.campaign()
    with pytest.raises(RetryLater) as later:
        onboard_tenant(campaign, TENANT, NOT_LAST)
    assert later.value.cause is down
    assert setup.mailer.sent == [], "nothing is mailed before every connector is settled"
    assert setup.record(SLACK).status is Status.LINK_CREATED
    assert setup.record(ZENDESK).error_code == "unavailable"
    assert not [c for c in setup.changes if c.status == "failed"], "a retry is not a failure"

    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert outcome.status == "delivered"
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 2}, {"t1": 1})
    (message,) = setup.mailer.sent
    text = setup.text_of(message)
    assert "slack-demo-t1-state-1" in text, "Slack's first link, not a second one"
    assert "zendesk-demo-t1-state-2" in text
    assert setup.record(ZENDESK).status is Status.DELIVERED
    assert campaign.held == {}


def test_with_links_stored_a_retry_calls_only_the_failed_connector_too(setup: Setup) -> None:
    """No email: a stored link is not looked for again (reuse is for email), so only what the
    campaign holds between attempts keeps Slack from a second call."""
    setup.zendesk.plan["t1"] = [ServerError(503, "unavailable", "try later")]
    campaign = setup.campaign()
    campaign.deliver = Delivery.STORE
    for run in campaign.connectors:
        run.deliver = Delivery.STORE
    with pytest.raises(RetryLater):
        onboard_tenant(campaign, TENANT, NOT_LAST)
    assert setup.record(SLACK).status is Status.DELIVERED, "stored: delivered at once"
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert outcome.status == "delivered" and setup.mailer.sent == []
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 2}, {"t1": 1})
    assert state_in(setup.record(SLACK).url or "") == "slack-demo-t1-state-1"


def test_on_the_last_attempt_a_transient_failure_is_final_and_the_other_link_goes(
    setup: Setup,
) -> None:
    setup.zendesk.plan["t1"] = [ServerError(503, "unavailable", "try later")]
    outcome = onboard_tenant(setup.campaign(), TENANT, LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("failed", "unavailable"),
        "slack-demo": ("delivered", ""),
    }
    assert len(setup.mailer.sent) == 1


def test_a_tenant_connected_to_one_connector_meanwhile_gets_only_the_others_link(
    setup: Setup,
) -> None:
    def connect_zendesk(tenant_id: str) -> None:  # the callback lands while Slack is called
        assert setup.ledger.mark_connected(
            tenant_id, ZENDESK.target_id, connection_id="conn-1", at=utcnow()
        )

    setup.slack.then = connect_zendesk
    outcome = onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("connected", ""),
        "slack-demo": ("delivered", ""),
    }
    (message,) = setup.mailer.sent
    text = setup.text_of(message)
    assert "zendesk" not in text.lower() and (setup.record(SLACK).url or "-") in text
    assert setup.record(ZENDESK).status is Status.CONNECTED
    assert setup.record(SLACK).message_id == message["Message-ID"], "the message sent is marked"


def test_a_tenant_connected_everywhere_meanwhile_is_not_mailed(setup: Setup) -> None:
    campaign = setup.campaign()

    def connect_both(change: StatusChange) -> None:  # once Slack's link is recorded too
        if change.connector_id == SLACK.target_id and change.status == "link_created":
            for profile in (ZENDESK, SLACK):
                assert setup.ledger.mark_connected(
                    change.tenant_id, profile.target_id, connection_id=None, at=utcnow()
                )

    campaign.connectors[1].on_status = connect_both
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert outcome.status == "connected"
    assert by_connector(outcome) == {
        "zendesk-demo": ("connected", ""),
        "slack-demo": ("connected", ""),
    }
    assert setup.mailer.sent == []


def test_a_connector_the_tenant_needs_nothing_from_is_neither_called_nor_mailed(
    setup: Setup,
) -> None:
    onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    setup.ledger.mark_connected("t1", ZENDESK.target_id, connection_id=None, at=utcnow())
    campaign = setup.campaign()
    # Slack's link was delivered with time left, Zendesk connected: nothing needed.
    assert campaign.settled(["t1"]) == {"t1"}
    setup.ledger.record_failure(
        tenant_id="t1",
        connector_id=SLACK.target_id,
        profile=SLACK.name,
        tenant_name="Acme",
        admin_email="admin@t1.example.com",
        error_code="unavailable",
        error_message="503",
    )
    campaign = setup.campaign()
    assert campaign.settled(["t1"]) == set(), "Slack's link failed since: needed again"
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("skipped", ""),
        "slack-demo": ("delivered", ""),
    }
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 1}, {"t1": 1}), (
        "Slack's stored link, delivered before, is reused: no second call"
    )
    assert len(setup.mailer.sent) == 2 and "zendesk" not in setup.text_of(setup.mailer.sent[1])


def test_a_mail_failure_to_retry_keeps_both_links_and_the_message_id(setup: Setup) -> None:
    setup.mailer.fail = [TransientMailError("421 try later", smtp_code=421)]
    campaign = setup.campaign()
    with pytest.raises(RetryLater):
        onboard_tenant(campaign, TENANT, NOT_LAST)
    for profile in (ZENDESK, SLACK):
        assert setup.record(profile).error_code == "smtp_transient"
    first_id = setup.record(ZENDESK).message_id
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert outcome.status == "delivered"
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 1}, {"t1": 1})
    (message,) = setup.mailer.sent
    assert message["Message-ID"] == first_id, "the same message: a duplicate is recognisable"


def test_a_mail_failure_on_the_last_attempt_fails_every_connector_of_the_message(
    setup: Setup,
) -> None:
    setup.mailer.fail = [TransientMailError("421 try later", smtp_code=421)]
    outcome = onboard_tenant(setup.campaign(), TENANT, LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("failed", "smtp_transient"),
        "slack-demo": ("failed", "smtp_transient"),
    }
    for profile in (ZENDESK, SLACK):
        record = setup.record(profile)
        assert record.status is Status.FAILED and record.url, "the link stays for the next run"


def test_a_stopped_connector_leaves_the_tenant_untried_there_and_mails_the_other(
    setup: Setup,
) -> None:
    campaign = setup.campaign()
    campaign.connectors[0].stop.halt("Zendesk's key was revoked")
    assert campaign.stop_reason == "", "the campaign stops only when every connector has"
    outcome = onboard_tenant(campaign, TENANT, NOT_LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("failed", "not_attempted"),
        "slack-demo": ("delivered", ""),
    }
    assert setup.zendesk.calls == {} and setup.record(ZENDESK).attempts == 0
    campaign.connectors[1].stop.halt("Slack's too")
    assert campaign.stop_reason == "Zendesk's key was revoked; Slack's too"


# --- remind_tenant -----------------------------------------------------------------------------


def reminding(setup: Setup, max_reminders: int = 3) -> Campaign:
    campaign = setup.campaign(
        remind_before=utcnow() + timedelta(hours=1), max_reminders=max_reminders
    )
    campaign.settled(["t1"])
    return campaign


def test_one_reminder_covers_only_the_connectors_not_yet_connected(setup: Setup) -> None:
    onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    setup.ledger.mark_connected("t1", ZENDESK.target_id, connection_id=None, at=utcnow())
    outcome = remind_tenant(reminding(setup), TENANT, NOT_LAST)
    assert outcome.status == "reminded"
    assert by_connector(outcome) == {
        "zendesk-demo": ("connected", ""),
        "slack-demo": ("reminded", ""),
    }
    assert len(setup.mailer.sent) == 2
    reminder = setup.mailer.sent[1]
    text = setup.text_of(reminder)
    slack = setup.record(SLACK)
    assert slack.url and slack.url in text and "zendesk" not in text.lower()
    assert (slack.status, slack.reminders) == (Status.REMINDED, 1)
    assert reminder["Message-ID"] != setup.mailer.sent[0]["Message-ID"]
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 1}, {"t1": 1}), "links reused"


def test_each_reminder_is_a_new_message_threaded_under_the_first(setup: Setup) -> None:
    onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    for _ in range(2):
        assert remind_tenant(reminding(setup), TENANT, NOT_LAST).status == "reminded"
    first, *reminders = setup.mailer.sent
    names = f"{ZENDESK.display_name} and {SLACK.display_name}"
    # No brand set: the From line's display name asks.
    subject = f"Reminder: Onboarding would like to connect to your {names} for Acme"
    assert [m["Subject"] for m in reminders] == [subject] * 2
    ids = [m["Message-ID"] for m in setup.mailer.sent]
    assert len(set(ids)) == 3, "the second reminder is not the first one again"
    assert {m["References"] for m in reminders} == {first["Message-ID"]}
    assert setup.record(ZENDESK).reminders == setup.record(SLACK).reminders == 2


def test_a_tenant_reminded_max_reminders_times_is_not_reminded_again(setup: Setup) -> None:
    onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    assert remind_tenant(reminding(setup, max_reminders=1), TENANT, NOT_LAST).status == "reminded"
    campaign = reminding(setup, max_reminders=1)
    outcome = remind_tenant(campaign, TENANT, NOT_LAST)
    assert outcome.status == "skipped"
    assert len(setup.mailer.sent) == 2, "the first email and one reminder"


def test_a_tenant_never_emailed_gets_no_reminder(setup: Setup) -> None:
    outcome = remind_tenant(reminding(setup), TENANT, NOT_LAST)
    assert outcome.status == "skipped"
    assert setup.mailer.sent == [] and setup.zendesk.calls == {}


def test_a_reminder_says_which_links_were_opened_or_declined_and_not_finished(
    setup: Setup,
) -> None:
    base = "https://connect.example.com"
    onboard_tenant(setup.campaign(connect_base_url=base), TENANT, NOT_LAST)
    first = setup.text_of(setup.mailer.sent[0])
    zendesk_token, slack_token = re.findall(re.escape(base) + r"/c/([A-Za-z0-9_-]+)", first)
    link = setup.ledger.find_connect_link(slack_token)
    assert link is not None
    opened_at = utcnow() - timedelta(days=2)
    setup.ledger.note_link_opened(link, at=opened_at)
    setup.ledger.note_link_opened(link)  # opened twice: the first time is the one named
    zendesk_state = setup.record(ZENDESK).state or ""
    assert setup.ledger.record_declined(zendesk_state, "access_denied") is not None
    assert "opened" not in first and "declined" not in first

    campaign = reminding(setup)
    campaign.connect_base_url = base
    assert remind_tenant(campaign, TENANT, NOT_LAST).status == "reminded"
    text = setup.text_of(setup.mailer.sent[-1])
    assert f"{SLACK.display_name} (opened on {opened_at:%Y-%m-%d}, not finished)" in text
    assert f"{ZENDESK.display_name} (declined last time)" in text
    assert zendesk_token not in text, "a reminder carries a new durable link"


def test_a_link_past_its_time_is_issued_again_before_the_reminder(setup: Setup) -> None:
    onboard_tenant(setup.campaign(), TENANT, NOT_LAST)
    old = setup.record(SLACK).url or ""
    campaign = reminding(setup)
    later = utcnow() + timedelta(hours=SLACK.link_ttl_hours + 1)
    campaign.connectors[1].clock = lambda: later  # Slack's link has run out by now
    outcome = remind_tenant(campaign, TENANT, NOT_LAST)
    assert by_connector(outcome) == {
        "zendesk-demo": ("reminded", ""),
        "slack-demo": ("reminded", ""),
    }
    assert (setup.zendesk.calls, setup.slack.calls) == ({"t1": 1}, {"t1": 2})
    text = setup.text_of(setup.mailer.sent[-1])
    fresh = setup.record(SLACK).url or ""
    assert state_in(fresh) == "slack-demo-t1-state-2" and fresh in text and old not in text
    assert (setup.record(ZENDESK).url or "-") in text
