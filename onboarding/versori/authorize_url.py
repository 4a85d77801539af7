"""Checks on the authorize URL Versori returns, before it is stored or sent to anyone.

From OIDC Core 3.1.2.1 and RFC 6749 3.1, 4.1.1, 10.12. A URL that fails is never stored as good.
Problems are described without quoting the URL or the state: the URL is a secret link.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

from onboarding.constants import RESERVED_QUERY_KEYS
from onboarding.errors import LinkCheckError
from onboarding.net import is_loopback
from onboarding.versori.wire import InitialiseRequest


@dataclass(frozen=True)
class Link:
    url: str
    state: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def masked_state(self) -> str:
        return mask_state(self.state)


def mask_state(state: str | None) -> str:
    """Enough of a state to tell two apart in a table, never enough to use it."""
    if not state:
        return ""
    return state[:4] + "…" if len(state) > 8 else "…"


def _prompt_values(prompt: str) -> set[str]:
    return {p for p in prompt.replace("+", " ").split(" ") if p}


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(parts: SplitResult) -> tuple[str, str, int | None, str] | None:
    """Scheme, host, port (default filled in) and path; None if the port is not a port."""
    try:
        port = parts.port
    except ValueError:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme)
    return parts.scheme, parts.hostname or "", port, parts.path


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None


# Parameters that change where or how the provider answers (OAuth 2.0 Multiple Response Types,
# JAR RFC 9101, OIDC Core 6, Dynamic Registration, web_message): a URL that carries one the
# profile did not ask for (its authorize_url or additional_params) is refused.
RESPONSE_ALTERING_KEYS = frozenset(
    {
        "response_mode",
        "request",
        "request_uri",
        "registration",
        "claims",
        "redirect_url",
        "web_message_uri",
        "web_message_target",
    }
)

_MAX_NAMED_SCOPE = 64


def check_link(
    url: str,
    request: InitialiseRequest,
    *,
    redirect_uri: str | None = None,
    redirect_host: str | None = None,
) -> Link:
    """Return the checked link, or raise LinkCheckError listing every problem found.

    `redirect_uri` / `redirect_host` (the profile's pins, optional): the URL's redirect_uri must
    equal the one, and its host must be the other. A request that set `redirect_url` (Platform
    API v2) pins redirect_uri to it the same way."""
    got = _split(url)
    if got is None:
        raise LinkCheckError(["is not a parseable URL"])
    want = request.authorize_parts()
    additional = request.additional_pairs()
    pairs = parse_qsl(got.query, keep_blank_values=True)
    params = dict(pairs)
    problems = [
        *_endpoint_problems(got, want, pairs, additional),
        *_core_problems(params, request),
        *_redirect_problems(params, request, redirect_uri, redirect_host),
        *_scope_problems(params, request),
        *_prompt_problems(params, request, additional),
        *(
            f"additional parameter {key} is missing or changed"
            for key, value in additional
            if params.get(key) != value
        ),
    ]
    if problems:
        raise LinkCheckError(problems)
    return Link(url=url, state=params["state"])


def _endpoint_problems(
    got: SplitResult, want: SplitResult, pairs: list[tuple[str, str]], additional: list[Any]
) -> list[str]:
    """The URL goes to the profile's endpoint, keeping its own query, with nothing repeated
    and nothing that changes how the provider answers unless the profile asked for it."""
    problems = []
    got_endpoint = _endpoint(got)
    if got_endpoint is None or got_endpoint != _endpoint(want):
        problems.append("scheme, host, port or path differ from the profile's authorize_url")
    if got.fragment:
        problems.append("has a #fragment")
    if got.username is not None or got.password is not None:
        problems.append("carries user info before the host")
    counts = Counter(k for k, _ in pairs)
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        # Name only parameters we know: any other name is a piece of the URL, maybe the state.
        known = RESERVED_QUERY_KEYS | {k for k, _ in [*parse_qsl(want.query), *additional]}
        named = [k for k in repeated if k in known]
        if len(named) < len(repeated):
            named.append(f"{len(repeated) - len(named)} other(s)")
        problems.append(f"repeats parameter(s) {', '.join(named)}")
    params = dict(pairs)
    own = parse_qsl(want.query, keep_blank_values=True)
    problems += [
        f"dropped or changed the endpoint's own parameter {key}"
        for key, value in own
        if params.get(key) != value
    ]
    asked = {k for k, _ in [*own, *additional]}
    problems += [
        f"carries {key}, which changes how the provider answers; not asked for"
        for key in sorted(RESPONSE_ALTERING_KEYS & params.keys() - asked)
    ]
    return problems


def _core_problems(params: dict[str, str], request: InitialiseRequest) -> list[str]:
    problems = []
    if params.get("response_type") != "code":
        problems.append("response_type is not 'code'")
    if params.get("client_id") != request.client_id:
        problems.append("client_id is missing or differs from the request's")
    if not params.get("state"):
        problems.append("has no state")
    return problems


def _redirect_problems(
    params: dict[str, str],
    request: InitialiseRequest,
    redirect_uri: str | None,
    redirect_host: str | None,
) -> list[str]:
    """An absolute https redirect_uri (http only to loopback), no fragment, and the pins."""
    problems = []
    redirect = _split(params.get("redirect_uri", ""))
    if redirect is None or not redirect.scheme or not redirect.hostname:
        problems.append("redirect_uri is missing or not absolute")
    elif redirect.scheme not in ("https", "http") or (
        redirect.scheme == "http" and not is_loopback(redirect.hostname)
    ):
        problems.append("redirect_uri is not https")
    elif redirect.fragment:
        problems.append("redirect_uri has a #fragment (RFC 6749 3.1.2)")
    if redirect_uri is not None and params.get("redirect_uri") != redirect_uri:
        problems.append("redirect_uri is not the profile's redirect_uri")
    if request.redirect_url is not None and params.get("redirect_uri") != request.redirect_url:
        problems.append("redirect_uri is not the redirect_url the request asked for")
    got_host = (redirect.hostname or "") if redirect is not None else ""
    if redirect_host is not None and got_host.rstrip(".") != redirect_host.lower().rstrip("."):
        problems.append("redirect_uri's host is not the profile's redirect_host")
    return problems


def _scope_problems(params: dict[str, str], request: InitialiseRequest) -> list[str]:
    """Every scope asked for (and offline_access unless disabled); nothing more."""
    problems = []
    scopes = set(params.get("scope", "").split())
    wanted = set(request.scopes)
    if not request.disable_offline_access:
        wanted.add("offline_access")
    missing = sorted(wanted - scopes)
    if missing:
        problems.append(f"scope lacks {', '.join(missing)}")
    extra = sorted(scopes - wanted - {"offline_access"})
    if extra:
        # A scope is named when it is short and not a piece of the state; else only counted.
        state = params.get("state") or ""
        named = [
            s for s in extra if len(s) <= _MAX_NAMED_SCOPE and s.isprintable() and s not in state
        ]
        if len(named) < len(extra):
            named.append(f"{len(extra) - len(named)} other(s)")
        problems.append(f"scope has {', '.join(named)}, which the profile did not ask for")
    return problems


def _prompt_problems(
    params: dict[str, str], request: InitialiseRequest, additional: list[Any]
) -> list[str]:
    """The prompt asked for (`login` by default, unless the profile uses approval_prompt);
    `none` never with another value."""
    problems = []
    got = _prompt_values(params.get("prompt", ""))
    expected = request.prompt or None
    if expected is None and "approval_prompt" not in {k for k, _ in additional}:
        expected = "login"
    if expected is not None and got != _prompt_values(expected):
        problems.append(f"prompt is not {expected!r}")
    if "none" in got and len(got) > 1:
        problems.append("prompt combines 'none' with another value")
    return problems
