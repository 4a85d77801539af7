"""The service's pages: small, plain HTML, every value escaped, and the headers every answer
carries (no referrer, no cache, a strict CSP, no framing).

A page shows no token, state, code or email address: the link page's form posts to its own
URL (`action=""`), and the way back after a declined consent goes through /retry, which
redirects to the link from a cookie. Only a redirect (the provider's authorize URL, the
link itself) carries a secret.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from html import escape
from urllib.parse import urlsplit

from onboarding.connect.logs import current_request_id

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f5f6f8;"
    "color:#1d2330;margin:0}"
    "main{max-width:28rem;margin:12vh auto;background:#fff;border-radius:10px;padding:2rem;"
    "box-shadow:0 1px 4px rgba(0,0,0,.12)}"
    "h1{font-size:1.35rem;margin:0 0 .8rem}p{line-height:1.45;margin:.6rem 0}"
    "button{font-size:1rem;padding:.7rem 1.4rem;border:0;border-radius:6px;background:#2457d6;"
    "color:#fff;cursor:pointer;margin-top:.8rem}"
    ".muted{color:#5d6576;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

# The link page's only script: once the page is shown to a person (visible), it tells the
# service so, same-origin, with the form's CSRF value (POST <this page>/seen). A mail
# scanner's GET runs no script; that is how `opened` tells a person from a scanner.
_BEACON = (
    "(function(){var c=document.querySelector('input[name=csrf]');if(!c)return;"
    "var sent=false;function send(){if(sent||document.visibilityState!=='visible')return;"
    "sent=true;fetch(location.pathname+'/seen',{method:'POST',credentials:'same-origin',"
    "headers:{'Content-Type':'application/x-www-form-urlencoded'},"
    "body:'csrf='+encodeURIComponent(c.value),keepalive:true}).catch(function(){});}"
    "document.addEventListener('visibilitychange',send);send();})();"
)
_BEACON_HASH = base64.b64encode(hashlib.sha256(_BEACON.encode()).digest()).decode()


def security_headers(form_targets: tuple[str, ...] = (), beacon: bool = False) -> dict[str, str]:
    """What every answer of the service carries. `form_targets`: origins a form on the page
    may end up at (the provider's, after the button's redirect: browsers hold a form's
    redirects to form-action too). `beacon`: the page runs its beacon script (its hash
    allowed, and fetches to this origin only)."""
    form_action = " ".join(("'self'", *form_targets))
    script = f"script-src 'sha256-{_BEACON_HASH}'; connect-src 'self'; " if beacon else ""
    return {
        # The provider's authorize URL carries a state: no page may leak its URL onwards.
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; {script}"
            f"form-action {form_action}; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def origin_of(url: str) -> str:
    """scheme://host[:port] of an absolute URL, for the CSP's form-action."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


@dataclass(frozen=True)
class Page:
    """One answer: an HTML page (status, title, paragraphs, an optional button) or, with
    `location`, a 303 redirect. `form_targets` widen the CSP's form-action."""

    status: int
    title: str = ""
    paragraphs: tuple[str, ...] = ()
    button: str = ""
    form_method: str = "post"
    form_action: str = ""
    hidden: dict[str, str] = field(default_factory=dict)
    location: str = ""
    form_targets: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()
    # The link page's beacon script (see _BEACON).
    beacon: bool = False
    # What the service's log and tests call this answer (never shown).
    kind: str = ""

    def html(self) -> str:
        body = "".join(f"<p>{escape(p)}</p>" for p in self.paragraphs)
        if self.button:
            inputs = "".join(
                f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
                for k, v in self.hidden.items()
            )
            body += (
                f'<form method="{self.form_method}" action="{escape(self.form_action)}">'
                f'{inputs}<button type="submit">{escape(self.button)}</button></form>'
            )
        if self.beacon:
            body += f"<script>{_BEACON}</script>"
        if self.status >= 400 and (request_id := current_request_id()):
            # What a support email quotes to find this request's log lines (logs.py).
            body += f'<p class="muted">Reference: {escape(request_id)}</p>'
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            '<meta name="robots" content="noindex,nofollow">'
            f"<title>{escape(self.title)}</title><style>{_STYLE}</style></head>"
            f"<body><main><h1>{escape(self.title)}</h1>{body}</main></body></html>"
        )


def link_page(tenant: str, connector: str, csrf: str, provider_origin: str) -> Page:
    return Page(
        200,
        f"Connect {tenant} to {connector}",
        (
            f"Press the button to sign in to {connector} and allow {tenant}'s connection.",
            "You will be sent to the provider's sign-in page, then back here.",
        ),
        button=f"Connect {connector}",
        hidden={"csrf": csrf},
        form_targets=(provider_origin,),
        beacon=True,
        kind="link",
    )


# One page for an unknown token and a revoked one: nothing tells an outsider which it was.
def invalid_link() -> Page:
    return Page(
        404,
        "This link is not valid",
        (
            "Check that you opened the whole link from your email.",
            "If it still does not work, ask whoever sent it for a new one.",
        ),
        kind="invalid",
    )


def expired_link() -> Page:
    return Page(
        410,
        "This link has expired",
        ("Ask whoever sent it for a new one; the newest email you got may hold a fresh link.",),
        kind="expired",
    )


def already_connected(tenant: str, connector: str) -> Page:
    return Page(
        200,
        f"{tenant} is already connected to {connector}",
        ("There is nothing more to do.",),
        kind="already_connected",
    )


def too_many_tries(minutes: int) -> Page:
    return Page(
        429,
        "Too many tries with this link",
        (f"Please wait about {minutes} minute(s), then open the link again.",),
        kind="rate_limited",
    )


def try_again_later() -> Page:
    return Page(
        503,
        "Something went wrong. Please try again later",
        ("We could not reach the service that starts the connection.",),
        kind="unavailable",
    )


def forbidden_form() -> Page:
    return Page(
        403,
        "This request could not be checked",
        ("Open the link from your email again, then press its button.",),
        kind="csrf",
    )


def connected(tenant: str, connector: str) -> Page:
    return Page(
        200,
        f"{tenant} is connected to {connector}",
        ("All done: you can close this window.",),
        kind="connected",
    )


def declined(connector: str, can_retry: bool) -> Page:
    again = (
        "If that was a mistake, you can start again."
        if can_retry
        else "If that was a mistake, open the link from your email again."
    )
    return Page(
        200,
        f"The connection to {connector} was not made",
        (f"{connector} said the access was not allowed.", again),
        button="Try again" if can_retry else "",
        form_method="get",
        form_action="/retry",
        kind="declined",
    )


def callback_refused(kind: str) -> Page:
    """A callback whose state cannot be used: nothing was recorded."""
    text = {
        "missing": (400, "This page needs a sign-in answer", "It was opened without one."),
        "unknown": (400, "This sign-in is not valid", "It does not belong to any connection."),
        "superseded": (
            410,
            "This sign-in was replaced by a newer one",
            "Open the link from your email again and press its button.",
        ),
        "expired": (
            410,
            "This sign-in has expired",
            "Open the link from your email again and press its button.",
        ),
        "used": (
            409,
            "This sign-in was already used",
            "Each sign-in completes a connection once. Open the link from your email again "
            "if you still need to connect.",
        ),
    }
    status, title, line = text[kind]
    return Page(status, title, (line,), kind=f"callback_{kind}")


def connection_failed(can_retry: bool) -> Page:
    return Page(
        502,
        "The connection could not be completed. Please try again later",
        ("The service that completes connections did not accept it this time.",),
        button="Try again" if can_retry else "",
        form_method="get",
        form_action="/retry",
        kind="create_failed",
    )


def not_found() -> Page:
    return Page(404, "Page not found", ("There is nothing here.",), kind="not_found")


def internal_error() -> Page:
    return Page(
        500,
        "Something went wrong. Please try again later",
        ("The problem was recorded.",),
        kind="internal_error",
    )


def link_withdrawn() -> Page:
    return Page(
        410,
        "This link was withdrawn",
        (
            "Whoever sent it withdrew it, so nothing was connected.",
            "If you still need to connect, ask them for a new link.",
        ),
        kind="withdrawn",
    )


def wrong_browser() -> Page:
    """A callback from a browser other than the one that pressed the link's button: nothing
    recorded, nothing created; the state stays usable by its own browser."""
    return Page(
        403,
        "Please start again from your email",
        (
            "This sign-in was started in another browser, so it cannot finish here.",
            "Open the link from your email in this browser and press its button.",
        ),
        kind="wrong_browser",
    )


def connecting_now() -> Page:
    return Page(
        409,
        "Your connection is being completed",
        (
            "A connection for this link is being completed right now.",
            "Reload this page in a minute to see how it ended.",
        ),
        kind="connecting",
    )


def not_confirmed() -> Page:
    return Page(
        503,
        "We could not confirm your connection yet",
        (
            "The service that completes connections did not answer in time, and we could not "
            "check whether it made yours.",
            "There is no need to sign in again: reload this page in a few minutes.",
        ),
        kind="not_confirmed",
    )


def no_content() -> Page:
    return Page(204, kind="no_content")


def redirect(location: str, cookies: tuple[str, ...] = (), kind: str = "redirect") -> Page:
    return Page(303, location=location, cookies=cookies, kind=kind)
