"""onboarding/batch/outcomes.py: what became of a tenant in a run (its row, or rows, in the run's
table) and how a campaign's parts make one outcome; nothing secret in either."""

from __future__ import annotations

import json

import pytest

from onboarding.batch.outcomes import (
    NOT_STARTED,
    OutcomeStatus,
    TenantOutcome,
    combined,
    failed_outcome,
    succeeded,
)
from onboarding.errors import BadRequestError, ServerError
from onboarding.ledger import Status
from onboarding.versori.authorize_url import Link

LINK = Link(
    url="https://acme.zendesk.com/oauth/authorizations/new?state=Zk3v9Q-secret-state",
    state="Zk3v9Q-secret-state",
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
        (["connected", "reminded", "delivered"], "reminded"),
        (["would_initialise", "connected"], "would_initialise"),
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


def test_the_first_failed_connector_speaks_for_the_tenant_and_keeps_its_cause() -> None:
    cause = ServerError(503, "unavailable", "down")
    first = TenantOutcome(
        "t1",
        "failed",
        error_code="unavailable",
        error_message="down",
        connector="HubSpot",
        cause=cause,
    )
    second = part("failed", "Slack", "validation_failed")
    outcome = combined("t1", [part("delivered", "Zendesk"), first, second])
    assert (outcome.error_code, outcome.error_message) == ("unavailable", "HubSpot: down")
    assert outcome.cause is cause and not outcome.ok


def test_one_connectors_outcome_is_the_tenants_own_without_a_connector_name() -> None:
    alone = TenantOutcome("t1", "delivered", link_host="x.example.com", connector="HubSpot")
    outcome = combined("t1", [alone])
    assert outcome.connector == "" and outcome.parts == ()
    assert outcome.rows() == [
        {
            "tenant_id": "t1",
            "connector": "",
            "status": "delivered",
            "link_host": "x.example.com",
            "masked_state": "",
            "error_code": "",
            "error_message": "",
        }
    ]


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        ("failed", False),
        ("pending", False),
        ("delivered", True),
        ("skipped", True),
        ("connected", True),
        (NOT_STARTED, True),
    ],
)
def test_ok_is_anything_but_failed_or_pending(status: str, ok: bool) -> None:
    assert TenantOutcome("t1", status).ok is ok


def test_a_success_shows_the_links_host_and_a_masked_state_never_the_link() -> None:
    outcome = succeeded("t1", Status.DELIVERED, LINK)
    assert (outcome.status, outcome.link_host) == ("delivered", "acme.zendesk.com")
    assert outcome.masked_state == "Zk3v…"
    assert LINK.state not in repr(outcome.rows()) and LINK.url not in repr(outcome)


def test_a_known_error_keeps_its_code_and_message_an_unknown_one_only_its_type() -> None:
    known = failed_outcome("t1", BadRequestError(400, "validation_failed", "scopes: unknown"))
    assert (known.status, known.error_code) == ("failed", "validation_failed")
    assert "scopes: unknown" in known.error_message
    secret = RuntimeError("postgresql://user:pa55word@db/ledger")
    unknown = failed_outcome("t1", secret)
    assert (unknown.error_code, unknown.error_message) == ("internal_error", "RuntimeError")
    assert unknown.cause is secret, "kept in this process for the task run to raise"


def test_the_cause_is_no_part_of_an_outcomes_identity() -> None:
    one = failed_outcome("t1", ServerError(503, "unavailable", "down"))
    other = failed_outcome("t1", ServerError(503, "unavailable", "down"))
    assert one == other and "cause" not in repr(one)


def test_every_ledger_status_is_an_outcome_status_of_the_same_name_and_value() -> None:
    for status in Status:
        assert OutcomeStatus(status.value) == status.value
        assert OutcomeStatus[status.name].value == status.value
    assert OutcomeStatus("delivered") == Status.DELIVERED.value
    plain: str = "delivered"
    assert plain == OutcomeStatus.DELIVERED


def test_a_status_given_as_a_string_becomes_an_outcome_status_an_unknown_one_is_refused() -> None:
    assert TenantOutcome("t1", "would_remind").status is OutcomeStatus.WOULD_REMIND
    assert TenantOutcome("t1", Status.CONNECTED).status is OutcomeStatus.CONNECTED
    with pytest.raises(ValueError, match="sent"):
        TenantOutcome("t1", "sent")


def test_an_outcomes_status_shows_and_serializes_as_its_plain_string() -> None:
    outcome = TenantOutcome("t1", "skipped", error_message="already delivered")
    assert f"{outcome.status}" == str(outcome.status) == "skipped"
    assert json.dumps(outcome.status) == '"skipped"'
    assert json.dumps({outcome.status: 1}) == '{"skipped": 1}'
    (row,) = outcome.rows()
    assert type(row["status"]) is str and json.loads(json.dumps(row))["status"] == "skipped"
