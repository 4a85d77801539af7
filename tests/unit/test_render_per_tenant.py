"""A profile renders a tenant's request by validating only the two fields a tenant fills
(InitialiseRequest.for_tenant); the result must be what validating the whole model gives: the
same request, or the same ValidationError, whatever the tenant's values (Hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from onboarding.inputs.profile import ConnectorProfile
from onboarding.versori.authorize_url import check_link
from onboarding.versori.wire import InitialiseRequest

ULIDS = ["01M8F12B95S4BX0QFB3TPDWZ0P", "01M8F12B95S4BX0QFB3TPDWZ0Q", "01M8F12B95S4BX0QFB3TPDWZ0R"]


def profile(**changes: Any) -> ConnectorProfile:
    fields: dict[str, Any] = {
        "name": "acme",
        "organisation_id": ULIDS[0],
        "connector_id": ULIDS[1],
        "credential_id": ULIDS[2],
        "client_id": "client",
        "authorize_url": "https://{subdomain}.example.com/oauth/authorize",
        "scopes": ["read"],
        "additional_params": {"login_hint": "{admin_email}"},
    }
    return ConnectorProfile.model_validate(fields | changes)


def whole(p: ConnectorProfile, values: dict[str, str]) -> InitialiseRequest:
    """The request as the constructor validates it, every field."""
    rendered = p.render(values)  # for the two filled fields' text only
    return InitialiseRequest.model_validate(
        {**rendered.model_dump(), "authorize_url": rendered.authorize_url}
    )


def outcome(make: Any) -> object:
    try:
        return make()
    except ValidationError as err:
        return [(e["loc"], e["msg"]) for e in err.errors()]


text = st.text(max_size=30)


@settings(max_examples=300, deadline=None)
@given(subdomain=text, email=text, params=st.sampled_from(["{admin_email}", "{subdomain}"]))
def test_rendering_a_tenant_is_validating_the_whole_request(
    subdomain: str, email: str, params: str
) -> None:
    for additional in ({"login_hint": params}, f"hint={params}"):
        p = profile(authorize_url="https://{subdomain}/oauth", additional_params=additional)
        values = {"subdomain": subdomain, "admin_email": email}
        fast = outcome(lambda p=p, v=values: p.render(v))
        slow = outcome(
            lambda p=p, v=values: p._request(p.authorize_url.format_map(_q(v)), _additional(p, v))
        )
        assert fast == slow


def _q(values: dict[str, str]) -> dict[str, str]:
    from urllib.parse import quote

    return {k: quote(v, safe="") for k, v in values.items()}


def _additional(p: ConnectorProfile, values: dict[str, str]) -> str:
    from urllib.parse import quote, urlencode

    if isinstance(p.additional_params, dict):
        return urlencode(
            {k: v.format_map(values) for k, v in p.additional_params.items()}, quote_via=quote
        )
    return p.additional_params.format_map(_q(values))


def test_a_good_tenant_gets_the_request_the_constructor_makes() -> None:
    p = profile()
    values = {"subdomain": "globex", "admin_email": "it@globex.example"}
    rendered = p.render(values)
    assert rendered == whole(p, values)
    assert rendered.to_wire() == whole(p, values).to_wire()
    assert rendered.authorize_parts().hostname == "globex.example.com"
    assert rendered.additional_pairs() == [("login_hint", "it@globex.example")]
    # Two tenants share nothing mutable that one could change for the other.
    other = p.render({"subdomain": "initech", "admin_email": "a@initech.example"})
    assert other.authorize_url == "https://initech.example.com/oauth/authorize"
    assert rendered.authorize_url == "https://globex.example.com/oauth/authorize"


def test_a_refused_value_is_the_constructors_validation_error() -> None:
    p = profile(authorize_url="https://{subdomain}/oauth")
    with pytest.raises(ValidationError) as caught:
        p.render({"subdomain": "", "admin_email": "it@globex.example"})
    assert [e["loc"] for e in caught.value.errors()] == [("authorize_url",)]
    assert "absolute http(s) URL with a host" in str(caught.value)


def test_a_shared_field_refused_is_reported_as_before() -> None:
    """A profile built without validation, with a field the request refuses: every render
    raises the constructor's error, naming that field."""
    p = profile().model_copy(update={"client_id": ""})
    for _ in range(2):
        with pytest.raises(ValidationError) as caught:
            p.render({"subdomain": "globex", "admin_email": "it@globex.example"})
        assert [e["loc"] for e in caught.value.errors()] == [("client_id",)]


def test_the_link_check_reads_the_kept_parts() -> None:
    p = profile()
    request = p.render({"subdomain": "globex", "admin_email": "it@globex.example"})
    url = (
        "https://globex.example.com/oauth/authorize?response_type=code&client_id=client"
        "&redirect_uri=https%3A%2F%2Fapi.versori.com%2Fcb&scope=read+offline_access"
        "&state=abc123&prompt=login&login_hint=it%40globex.example"
    )
    assert check_link(url, request).state == "abc123"
    assert check_link(url, whole(p, {"subdomain": "globex", "admin_email": "it@globex.example"}))
