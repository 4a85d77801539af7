"""Unit tests for onboarding.versori.authorize_url.check_link: every defect reported, no secret
in any message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from onboarding.errors import LinkCheckError
from onboarding.versori.authorize_url import Link, check_link, mask_state
from onboarding.versori.wire import InitialiseRequest

STATE = "St4te-SECRET-0123456789abcdefXYZ"
ENDPOINT = "https://auth.example.com/oauth2/authorize"
REDIRECT = "https://app.versori.com/oauth2/callback"

Params = list[tuple[str, str]]


def make_request(**overrides: Any) -> InitialiseRequest:
    fields: dict[str, Any] = {
        "credential": {
            "id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2",
            "organisation_id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0",
        },
        "authorize_url": f"{ENDPOINT}?tenant=acme",
        "client_id": "client-123",
        "scopes": ["openid", "email"],
        "additional_params": "access_type=offline&hd=example.com",
    }
    fields.update(overrides)
    return InitialiseRequest.model_validate(fields)


def good_params() -> Params:
    return [
        ("tenant", "acme"),
        ("response_type", "code"),
        ("client_id", "client-123"),
        ("redirect_uri", REDIRECT),
        ("state", STATE),
        ("scope", "openid email offline_access"),
        ("prompt", "login"),
        ("access_type", "offline"),
        ("hd", "example.com"),
    ]


def build(params: Params | None = None, endpoint: str = ENDPOINT, suffix: str = "") -> str:
    query = urlencode(good_params() if params is None else params, quote_via=quote)
    return f"{endpoint}?{query}{suffix}"


def edit(**changes: str | None) -> Params:
    """The good parameters with some replaced (a string) or removed (None)."""
    params = []
    for key, value in good_params():
        if key not in changes:
            params.append((key, value))
        elif changes[key] is not None:
            params.append((key, changes[key]))  # type: ignore[arg-type]
    return params


def problems_of(url: str, request: InitialiseRequest | None = None, **pins: str) -> list[str]:
    with pytest.raises(LinkCheckError) as info:
        check_link(url, request or make_request(), **pins)
    error = info.value
    for text in (str(error), repr(error), *error.problems):
        assert STATE not in text
        assert url not in text
    assert error.code == "link_check_failed"
    assert not error.transient
    return error.problems


# --- a good link --------------------------------------------------------------------------


def test_good_link_passes() -> None:
    url = build()
    link = check_link(url, make_request())
    assert isinstance(link, Link)
    assert link.url == url
    assert link.state == STATE
    assert link.host == "auth.example.com"
    assert link.masked_state == "St4t…"
    assert STATE not in link.masked_state


@pytest.mark.parametrize(
    "url",
    [
        # Parameters in another order, '+' for spaces, an explicit default port.
        ENDPOINT
        + "?state="
        + STATE
        + "&hd=example.com&access_type=offline&prompt=login&scope=offline_access+email+openid"
        + "&redirect_uri=https%3A%2F%2Fapp.versori.com%2Foauth2%2Fcallback"
        + "&client_id=client-123&response_type=code&tenant=acme",
        build(endpoint="https://auth.example.com:443/oauth2/authorize"),
        build(endpoint="HTTPS://AUTH.example.com/oauth2/authorize"),
        build([*good_params(), ("nonce", "n-1")]),  # extra parameters are fine
    ],
)
def test_equivalent_good_links_pass(url: str) -> None:
    assert check_link(url, make_request()).state == STATE


@pytest.mark.parametrize(
    ("state", "masked"),
    [(STATE, "St4t…"), ("123456789", "1234…"), ("12345678", "…"), ("a", "…"), ("", ""), (None, "")],
)
def test_mask_state(state: str | None, masked: str) -> None:
    assert mask_state(state) == masked
    if state and len(state) > 1:
        assert state not in mask_state(state)


# --- every defect -------------------------------------------------------------------------

DEFECTS: list[tuple[str, Callable[[], str], str]] = [
    ("scheme", lambda: build(endpoint="http://auth.example.com/oauth2/authorize"), "differ"),
    ("host", lambda: build(endpoint="https://evil.example.com/oauth2/authorize"), "differ"),
    ("subdomain", lambda: build(endpoint="https://a.auth.example.com/oauth2/authorize"), "differ"),
    ("path", lambda: build(endpoint="https://auth.example.com/oauth2/authorise"), "differ"),
    ("slash", lambda: build(endpoint="https://auth.example.com/oauth2/authorize/"), "differ"),
    ("port", lambda: build(endpoint="https://auth.example.com:8443/oauth2/authorize"), "differ"),
    ("bad port", lambda: build(endpoint="https://auth.example.com:x/oauth2/authorize"), "differ"),
    ("fragment", lambda: build(suffix="#frag"), "#fragment"),
    (
        "repeated",
        lambda: build([*good_params(), ("scope", "openid")]),
        "repeats parameter(s) scope",
    ),
    ("own query dropped", lambda: build(edit(tenant=None)), "endpoint's own parameter tenant"),
    ("own query changed", lambda: build(edit(tenant="other")), "endpoint's own parameter tenant"),
    ("response_type token", lambda: build(edit(response_type="token")), "response_type"),
    ("response_type missing", lambda: build(edit(response_type=None)), "response_type"),
    ("client_id differs", lambda: build(edit(client_id="client-999")), "client_id"),
    ("client_id missing", lambda: build(edit(client_id=None)), "client_id"),
    ("no state", lambda: build(edit(state=None)), "has no state"),
    ("empty state", lambda: build(edit(state="")), "has no state"),
    ("redirect missing", lambda: build(edit(redirect_uri=None)), "redirect_uri is missing"),
    ("redirect relative", lambda: build(edit(redirect_uri="/oauth2/callback")), "not absolute"),
    ("redirect no host", lambda: build(edit(redirect_uri="https:///cb")), "not absolute"),
    ("redirect unparseable", lambda: build(edit(redirect_uri="https://[::1/cb")), "not absolute"),
    ("redirect http", lambda: build(edit(redirect_uri="http://app.example.com/cb")), "not https"),
    ("redirect lookalike", lambda: build(edit(redirect_uri="http://localhost.evil/cb")), "https"),
    ("scope lacks requested", lambda: build(edit(scope="openid offline_access")), "lacks email"),
    ("scope lacks offline", lambda: build(edit(scope="openid email")), "lacks offline_access"),
    ("scope missing", lambda: build(edit(scope=None)), "lacks email, offline_access, openid"),
    ("prompt missing", lambda: build(edit(prompt=None)), "prompt is not 'login'"),
    ("prompt other", lambda: build(edit(prompt="consent")), "prompt is not 'login'"),
    ("prompt extra", lambda: build(edit(prompt="login consent")), "prompt is not 'login'"),
    ("additional missing", lambda: build(edit(hd=None)), "additional parameter hd"),
    ("additional changed", lambda: build(edit(access_type="online")), "parameter access_type"),
    (
        "scope extra",
        lambda: build(edit(scope="openid email offline_access admin")),
        "scope has admin, which the profile did not ask for",
    ),
    ("response_type two", lambda: build(edit(response_type="code id_token")), "response_type"),
    (
        "response_mode",
        lambda: build([*good_params(), ("response_mode", "form_post")]),
        "carries response_mode",
    ),
    ("request", lambda: build([*good_params(), ("request", "eyJhbGciOi.x.y")]), "carries request"),
    (
        "request_uri",
        lambda: build([*good_params(), ("request_uri", "https://attacker.example/r")]),
        "carries request_uri",
    ),
]


@pytest.mark.parametrize(
    ("make_url", "expected"), [(m, e) for _, m, e in DEFECTS], ids=[d[0] for d in DEFECTS]
)
def test_each_defect_is_reported(make_url: Callable[[], str], expected: str) -> None:
    problems = problems_of(make_url())
    assert any(expected in problem for problem in problems), problems


def test_unparseable_url_is_a_link_check_error() -> None:
    url = "https://[auth.example.com/oauth2/authorize?state=" + STATE
    assert problems_of(url) == ["is not a parseable URL"]


def test_every_problem_is_listed_at_once() -> None:
    url = build(
        [("response_type", "token"), ("client_id", "nope"), ("scope", "openid")],
        endpoint="https://evil.example.com/authorize",
        suffix="#x",
    )
    problems = problems_of(url)
    assert len(problems) >= 8
    for expected in ("differ", "#fragment", "tenant", "response_type", "client_id", "no state"):
        assert any(expected in p for p in problems), (expected, problems)


def test_message_never_holds_state_or_url_even_when_state_is_the_problem() -> None:
    # The state repeated, and in a parameter name.
    url = build([*good_params(), ("state", STATE), (STATE, "x"), (STATE, "y")])
    problems = problems_of(url)
    assert any("repeats parameter(s)" in p and "state" in p for p in problems)


# --- redirect_uri -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redirect",
    [
        "http://localhost:8080/callback",
        "http://LOCALHOST/callback",
        "http://127.0.0.1/callback",
        "http://127.9.9.9:1234/callback",
        "http://[::1]:9000/callback",
        "https://app.example.com/callback",
    ],
)
def test_https_or_loopback_http_redirect_passes(redirect: str) -> None:
    assert check_link(build(edit(redirect_uri=redirect)), make_request()).state == STATE


# --- scope and offline_access -------------------------------------------------------------


def test_offline_access_not_required_when_disabled() -> None:
    request = make_request(disable_offline_access=True)
    assert check_link(build(edit(scope="openid email")), request).state == STATE
    # Still fine if the provider adds it anyway.
    assert check_link(build(), request).state == STATE
    # But the requested scopes are still required.
    assert "scope lacks email" in problems_of(build(edit(scope="openid")), request)


def test_no_requested_scopes_still_requires_offline_access() -> None:
    request = make_request(scopes=[])
    assert check_link(build(edit(scope="offline_access")), request).state == STATE
    assert "scope lacks offline_access" in problems_of(build(edit(scope=None)), request)


# --- prompt -------------------------------------------------------------------------------


def test_no_prompt_required_when_additional_params_set_approval_prompt() -> None:
    request = make_request(additional_params="approval_prompt=force")
    url = build([*edit(prompt=None, access_type=None, hd=None), ("approval_prompt", "force")])
    assert check_link(url, request).state == STATE
    # Dropping the approval_prompt itself is still a defect.
    url = build(edit(prompt=None, access_type=None, hd=None))
    assert any("approval_prompt" in p for p in problems_of(url, request))


def test_explicit_prompt_is_required_even_with_approval_prompt() -> None:
    request = make_request(prompt="consent", additional_params="approval_prompt=force")
    url = build([*edit(prompt=None, access_type=None, hd=None), ("approval_prompt", "force")])
    assert "prompt is not 'consent'" in problems_of(url, request)


@pytest.mark.parametrize("asked", ["consent+select_account", "consent select_account"])
@pytest.mark.parametrize(
    "query_value",
    [
        "consent+select_account",  # '+' as a form-encoded space
        "consent%20select_account",
        "consent%2Bselect_account",  # a literal '+'
        "select_account%20consent",  # order does not matter
    ],
)
def test_prompt_plus_and_space_are_equivalent(asked: str, query_value: str) -> None:
    url = build(edit(prompt=None)) + "&prompt=" + query_value
    assert check_link(url, make_request(prompt=asked)).state == STATE


def test_prompt_with_a_missing_value_fails() -> None:
    url = build(edit(prompt="consent"))
    problems = problems_of(url, make_request(prompt="consent select_account"))
    assert "prompt is not 'consent select_account'" in problems


def test_prompt_none_alone_passes() -> None:
    assert check_link(build(edit(prompt="none")), make_request(prompt="none")).state == STATE


@pytest.mark.parametrize("asked", ["none login", None])
def test_prompt_none_combined_with_another_value_fails(asked: str | None) -> None:
    problems = problems_of(build(edit(prompt="none login")), make_request(prompt=asked))
    assert "prompt combines 'none' with another value" in problems


# --- the endpoint's own query and additional params ----------------------------------------


def test_endpoint_without_query_and_no_additional_params() -> None:
    request = make_request(authorize_url=ENDPOINT, additional_params="")
    url = build(edit(tenant=None, access_type=None, hd=None))
    assert check_link(url, request).state == STATE


def test_additional_param_with_encoded_value() -> None:
    request = make_request(additional_params="login_hint=a%2Bb%40example.com&x=")
    url = build([*good_params(), ("login_hint", "a+b@example.com"), ("x", "")])
    assert check_link(url, request).state == STATE
    url = build([*good_params(), ("login_hint", "a b@example.com"), ("x", "")])
    assert "additional parameter login_hint is missing or changed" in problems_of(url, request)


def test_repeated_unknown_parameters_are_counted_not_named() -> None:
    url = build([*good_params(), ("scope", "x"), ("tenant", "acme"), ("zz", "1"), ("zz", "2")])
    problems = problems_of(url)
    assert "repeats parameter(s) scope, tenant, 1 other(s)" in problems
    assert not any("zz" in p for p in problems)


# --- the profile's pins, extra scopes, response-altering parameters (issue 10 #7) ------------

ATTACKER = "https://attacker.example/cb"


def test_the_hostile_url_of_the_issue_is_refused_for_each_of_its_parts() -> None:
    """redirect_uri to an attacker, an extra admin scope and response_mode=form_post."""
    url = build(
        [
            *edit(redirect_uri=ATTACKER, scope="openid email offline_access admin"),
            ("response_mode", "form_post"),
        ]
    )
    problems = problems_of(url)
    assert any("scope has admin" in p for p in problems), problems
    assert any("carries response_mode" in p for p in problems), problems
    pinned = problems_of(url, redirect_uri=REDIRECT)
    assert "redirect_uri is not the profile's redirect_uri" in pinned
    by_host = problems_of(url, redirect_host="app.versori.com")
    assert "redirect_uri's host is not the profile's redirect_host" in by_host
    for text in (*problems, *pinned, *by_host):
        assert ATTACKER not in text


def test_a_redirect_uri_that_matches_the_pins_passes() -> None:
    url = build()
    assert check_link(url, make_request(), redirect_uri=REDIRECT).state == STATE
    assert check_link(url, make_request(), redirect_host="APP.versori.com").state == STATE
    same_host = build(edit(redirect_uri="https://app.versori.com/other"))
    assert "redirect_uri is not the profile's redirect_uri" in problems_of(
        same_host, redirect_uri=REDIRECT
    )
    assert check_link(same_host, make_request(), redirect_host="app.versori.com")


def test_a_response_altering_parameter_the_profile_asked_for_passes() -> None:
    request = make_request(
        additional_params="access_type=offline&hd=example.com&response_mode=query"
    )
    url = build([*good_params(), ("response_mode", "query")])
    assert check_link(url, request).state == STATE
    # ...but only with the value asked for.
    url = build([*good_params(), ("response_mode", "form_post")])
    assert any("response_mode is missing or changed" in p for p in problems_of(url, request))


def test_an_extra_scope_that_holds_the_state_is_counted_not_named() -> None:
    problems = problems_of(build(edit(scope=f"openid email offline_access {STATE}")))
    assert "scope has 1 other(s), which the profile did not ask for" in problems


def test_offline_access_is_the_one_scope_beyond_the_request_allowed() -> None:
    request = make_request(scopes=["read"], disable_offline_access=True)
    assert check_link(build(edit(scope="read offline_access")), request).state == STATE
    assert "scope has write, which the profile did not ask for" in problems_of(
        build(edit(scope="read write")), request
    )


def _profile(**pins: str | list[str]) -> dict[str, Any]:
    return {
        "name": "p",
        "organisation_id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0",
        "connector_id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C1",
        "credential_id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2",
        "client_id": "client-123",
        "authorize_url": ENDPOINT,
        **pins,
    }


def test_the_profile_may_pin_the_redirect_uri_or_its_host() -> None:
    from onboarding.inputs.profile import ConnectorProfile

    profile = ConnectorProfile.model_validate(
        _profile(redirect_uri=REDIRECT, redirect_host="App.Versori.com")
    )
    assert profile.redirect_uri == REDIRECT
    assert profile.redirect_host == "app.versori.com"
    assert ConnectorProfile.model_validate(_profile()).redirect_uri is None


@pytest.mark.parametrize(
    ("pins", "expected"),
    [
        ({"redirect_uri": "http://app.versori.com/cb"}, "must be an https URL"),
        ({"redirect_uri": "/oauth2/callback"}, "absolute"),
        ({"redirect_host": "https://app.versori.com"}, "host name alone"),
        ({"redirect_host": "app.versori.com:443"}, "host name alone"),
        ({"redirect_host": "app.versori.com/cb"}, "host name alone"),
        ({"redirect_uri": REDIRECT, "redirect_host": "other.example"}, "make them agree"),
    ],
)
def test_bad_redirect_pins_are_refused(pins: dict[str, str], expected: str) -> None:
    from pydantic import ValidationError

    from onboarding.inputs.profile import ConnectorProfile

    with pytest.raises(ValidationError, match=expected):
        ConnectorProfile.model_validate(_profile(**pins))


def test_onboarding_checks_the_returned_link_against_the_profile_pins(tmp_path: Path) -> None:
    """The pins reach the check: a link to an attacker's redirect_uri is never stored."""
    import httpx

    from onboarding.inputs.profile import ConnectorProfile
    from onboarding.inputs.roster import Tenant
    from onboarding.ledger import Ledger
    from onboarding.versori.client import VersoriClient
    from tests.support import campaign_of, onboard

    hostile = build(edit(redirect_uri=ATTACKER))

    def versori(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"url": hostile})

    profile = ConnectorProfile.model_validate(
        _profile(
            authorize_url=f"{ENDPOINT}?tenant=acme",
            scopes=["openid", "email"],
            additional_params="access_type=offline&hd=example.com",
            redirect_host="app.versori.com",
        )
    )
    tenant = Tenant(tenant_id="t1", name="T1", admin_email="a@x.example", fields={})
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    client = VersoriClient(
        api_key="k", base_url="https://x.example", transport=httpx.MockTransport(versori)
    )
    with client:
        outcome = onboard(campaign_of(profile, ledger, client), tenant)
        assert isinstance(outcome.cause, LinkCheckError), outcome
        assert "redirect_host" in str(outcome.cause)
        record = ledger.get("t1", profile.target_id)
        assert record is not None and not record.url
        # The same link without the pin is accepted: the pin is what refused it.
        unpinned = profile.model_copy(update={"redirect_host": None})
        assert onboard(campaign_of(unpinned, ledger, client), tenant).ok
