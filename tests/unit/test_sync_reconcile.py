"""Sync's decisions, one tenant at a time: what Versori's view makes of a ledger record."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from onboarding.ledger import Held, Settled, Status
from onboarding.sync.reconcile import Seen, SeenConnection, credential_problem, decide

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def held(
    status: Status, connection_id: str | None = None, activation_id: str | None = None
) -> Held:
    return Held("t1", "SYS", "zendesk", status, connection_id, None, activation_id, None)


def test_a_connection_made_elsewhere_is_recorded_with_its_id() -> None:
    settled = decide(held(Status.DELIVERED), Seen(SeenConnection("C1")))
    assert settled is not None
    assert (settled.status, settled.connection_id) == (Status.CONNECTED, "C1")


def test_an_activation_holding_the_connection_makes_it_activated() -> None:
    settled = decide(held(Status.CONNECTED, "C1"), Seen(SeenConnection("C1"), activation_id="A1"))
    assert settled is not None
    assert (settled.status, settled.activation_id) == (Status.ACTIVATED, "A1")


def test_a_broken_credential_keeps_the_connection_id_for_the_reconnect() -> None:
    seen = Seen(SeenConnection("C1", broken="token revoked"))
    settled = decide(held(Status.ACTIVATED, "C1", "A1"), seen)
    assert settled is not None
    assert (settled.status, settled.connection_id, settled.reconnect_of) == (
        Status.BROKEN,
        "C1",
        "broken",
    )
    assert settled.error_message == "token revoked"


def test_a_reconnect_in_flight_is_left_alone_while_its_credential_is_still_broken() -> None:
    seen = Seen(SeenConnection("C1", broken="token revoked"))
    assert decide(held(Status.OPENED, "C1"), seen) is None


def test_a_gone_connection_is_disconnected_and_forgotten() -> None:
    settled = decide(held(Status.CONNECTED, "C1"), Seen(None))
    assert settled is not None
    assert (settled.status, settled.connection_id, settled.reconnect_of) == (
        Status.DISCONNECTED,
        None,
        "disconnected",
    )
    assert "C1" in (settled.error_message or "")


def test_a_tenant_that_never_connected_keeps_its_status() -> None:
    for status in (Status.PENDING, Status.DELIVERED, Status.FAILED, Status.EXPIRED):
        assert decide(held(status), Seen(None)) is None


def test_a_credential_never_validated_is_not_broken_and_an_expired_one_is() -> None:
    assert credential_problem(None, None, NOW) is None
    assert credential_problem([], NOW + timedelta(days=1), NOW) is None
    assert credential_problem(["invalid_grant"], None, NOW) == (
        "credential_errors",
        "invalid_grant",
    )
    code, reason = credential_problem([], NOW - timedelta(seconds=1), NOW) or ("", "")
    assert code == "credential_expired" and "expired" in reason


def apply(was: Held, to: Settled) -> Held:
    """The record as the ledger writes `to` on it (VersoriView.settle)."""
    values = {name: getattr(to, name) for name in to.columns if name in Held.__dataclass_fields__}
    return replace(was, status=to.status, **values)


statuses = st.sampled_from(list(Status))
ids = st.sampled_from([None, "C1", "C2"])
seen_connections = st.one_of(
    st.none(),
    st.builds(SeenConnection, st.sampled_from(["C1", "C2"]), st.sampled_from([None, "revoked"])),
)


@given(
    statuses, ids, st.sampled_from([None, "A1"]), seen_connections, st.sampled_from([None, "A1"])
)
def test_sync_is_idempotent_a_second_look_changes_nothing(
    status: Status,
    connection_id: str | None,
    activation_id: str | None,
    found: SeenConnection | None,
    activation: str | None,
) -> None:
    seen = Seen(found, activation if found is not None else None)
    before = held(status, connection_id, activation_id)
    first = decide(before, seen)
    after = apply(before, first) if first is not None else before
    assert decide(after, seen) is None
    if found is not None and found.broken is None:
        assert after.status in (Status.CONNECTED, Status.ACTIVATED)
        assert after.connection_id == found.id, "recorded with Versori's id"
