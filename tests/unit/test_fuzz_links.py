"""Property tests (Hypothesis) over what a hostile Versori, or a hostile proxy in front of it,
can send back: the Retry-After header and the authorize URL. Every generated input ends in a
value or an InputError/LinkCheckError, never another exception and never a hang, and no error
message quotes the URL or its state.

Examples run per test: see `--hypothesis-show-statistics`; 3,600 in all by default (1,500 each
for the cheap Retry-After and any-text tests, 600 for the link check, the dearest at ~5 ms each;
it ran 1,500 before, 7 s of the suite)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onboarding import constants
from onboarding.errors import InputError, LinkCheckError
from onboarding.versori.authorize_url import RESPONSE_ALTERING_KEYS, Link, check_link
from onboarding.versori.client import parse_retry_after
from onboarding.versori.wire import InitialiseRequest

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
FUZZ = settings(
    max_examples=1500,
    deadline=timedelta(seconds=1),  # a hang or a blow-up in time fails the example
    suppress_health_check=[HealthCheck.too_slow],
)

# --- Retry-After --------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats().map(lambda f: f"{f:e}"),
    st.sampled_from(["1e400", "-1e400", "nan", "inf", "0x10", "1_000", "٣", "  7  ", "+5", ".5"]),
)
dates = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
    st.builds(
        "{}, {:02d} {} {:04d} {:02d}:{:02d}:{:02d} {}".format,
        st.sampled_from(["Mon", "Fri", "Xyz", ""]),
        st.integers(0, 99),
        st.sampled_from(["Jan", "Dec", "Foo"]),
        st.integers(0, 99999),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.sampled_from(["GMT", "-0000", "+2359", "-2359", "+9999", "UTC", "EST", ""]),
    ),
)
headers = st.one_of(st.none(), st.text(max_size=80), numbers, dates)


@FUZZ
@given(headers)
def test_parse_retry_after_is_none_or_a_wait_within_the_cap(value: str | None) -> None:
    result = parse_retry_after(value, now=lambda: NOW)
    assert result is None or 0.0 <= result <= constants.MAX_RETRY_AFTER_SECONDS


# --- the link check -----------------------------------------------------------------------

ENDPOINT = "https://auth.example.com/oauth2/authorize"
REDIRECT = "https://app.versori.com/oauth2/callback"
REQUEST = InitialiseRequest.model_validate(
    {
        "credential": {
            "id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C2",
            "organisation_id": "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0",
        },
        "authorize_url": f"{ENDPOINT}?tenant=acme",
        "client_id": "client-123",
        "scopes": ["openid", "email"],
        "additional_params": "hd=example.com",
    }
)

states = st.text(alphabet="ABCDEFabcdef0123456789-_.~", min_size=12, max_size=40).map(
    lambda s: "ST8te" + s
)
anything = st.text(max_size=40)
keys = st.one_of(
    st.sampled_from(
        [
            "tenant",
            "response_type",
            "client_id",
            "redirect_uri",
            "state",
            "scope",
            "prompt",
            "hd",
            "nonce",
            *sorted(RESPONSE_ALTERING_KEYS),
        ]
    ),
    anything,
)
values = st.one_of(
    st.sampled_from(
        [
            "acme",
            "code",
            "client-123",
            REDIRECT,
            "https://attacker.example/cb",
            "http://127.0.0.1/cb",
            "https://[::1/cb",
            "openid email offline_access",
            "openid email offline_access admin",
            "login",
            "none login",
            "example.com",
            "form_post",
        ]
    ),
    anything,
)
endpoints = st.one_of(
    st.sampled_from(
        [
            ENDPOINT,
            "https://AUTH.example.com:443/oauth2/authorize",
            "https://evil.example.com/oauth2/authorize",
            "https://auth.example.com:99999/oauth2/authorize",
            "https://[auth.example.com/oauth2/authorize",
            "https://u:p@auth.example.com/oauth2/authorize",
        ]
    ),
    anything,
)


def good(state: str) -> list[tuple[str, str]]:
    return [
        ("tenant", "acme"),
        ("response_type", "code"),
        ("client_id", "client-123"),
        ("redirect_uri", REDIRECT),
        ("state", state),
        ("scope", "openid email offline_access"),
        ("prompt", "login"),
        ("hd", "example.com"),
    ]


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str]:
    """A URL near a good one (some parameters dropped, changed or added), or any text."""
    state = draw(states)
    params = [p for p in good(state) if draw(st.booleans()) or draw(st.booleans())]
    params += draw(st.lists(st.tuples(keys, values), max_size=4))
    params = draw(st.permutations(params))
    encoders: list[Callable[..., str]] = [quote, lambda s, *a, **k: s]
    encode = draw(st.sampled_from(encoders))
    query = urlencode(params, quote_via=encode)
    suffix = draw(st.sampled_from(["", "#frag", "&", "&&state", ";x"]))
    url = f"{draw(endpoints)}?{query}{suffix}"
    return draw(st.one_of(st.just(url), anything.map(lambda t: url + t), anything)), state


pins: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.just({"redirect_uri": REDIRECT}),
    st.just({"redirect_host": "app.versori.com"}),
    st.fixed_dictionaries({"redirect_host": anything}),
)


@settings(FUZZ, max_examples=600)
@given(urls(), pins)
def test_the_link_check_ends_in_a_link_or_a_link_check_error(
    generated: tuple[str, str], pin: dict[str, str]
) -> None:
    url, state = generated
    try:
        link = check_link(url, REQUEST, **pin)
    except (LinkCheckError, InputError) as err:
        assert err.problems if isinstance(err, LinkCheckError) else True
        for text in (str(err), repr(err), *getattr(err, "problems", [])):
            assert state not in text
            if len(url) >= 24:
                assert url not in text
    else:
        assert isinstance(link, Link)
        assert link.url == url and link.state


@FUZZ
@given(st.text(max_size=200))
def test_the_link_check_takes_any_text(url: str) -> None:
    with contextlib.suppress(LinkCheckError):
        check_link(url, REQUEST)
