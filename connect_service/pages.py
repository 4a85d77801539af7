"""The service's pages: small, plain HTML, every value escaped, and the headers every answer
carries (no referrer, no cache, a strict CSP, no framing).

A page shows no token, state, code or email address: the link page's form posts to its own
URL (`action=""`), and the way back after a declined consent goes through /retry, which
redirects to the link from a cookie. Only a redirect (the provider's authorize URL, the
link itself) carries a secret.

Every page says who is asking (onboarding/inputs/brand.py): the product's logo or name, its support
contact, its privacy and terms links. The brand is the one given, else the one the service
set for the request being answered (`use_brand`: ONBOARD_BRAND_*, then the link's profile's
own), else an unnamed one. Its accent colour is in the page's one style block, allowed by its
hash; its logo's origin is the CSP's only img-src.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from urllib.parse import urlsplit

from connect_service.logs import current_request_id
from onboarding.inputs.brand import UNNAMED, Brand

# The brand of the request being answered (ConnectService sets it; run_in_threadpool gives
# each request a copy of the context, so one request's never reaches another's).
_BRAND: contextvars.ContextVar[Brand | None] = contextvars.ContextVar("brand", default=None)


def use_brand(brand: Brand | None) -> contextvars.Token[Brand | None]:
    """Set the brand of the pages made from here on in this request's context."""
    return _BRAND.set(brand)


def forget_brand(token: contextvars.Token[Brand | None]) -> None:
    _BRAND.reset(token)


def current_brand(brand: Brand | None = None) -> Brand:
    """`brand`, else the request's (use_brand), else an unnamed one (the app passes the
    service's brand to every page it makes outside a request's `use_brand`)."""
    return brand or _BRAND.get() or _unnamed()


@functools.cache
def _unnamed() -> Brand:
    """The unnamed brand (a constant): made once, not for every answer without a page."""
    return Brand.of()


def _style(color: str) -> str:
    return (
        "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f5f6f8;"
        "color:#1d2330;margin:0;padding:0 1rem}"
        "header,main,footer{max-width:28rem;margin:0 auto}"
        "header{padding:8vh 0 .8rem}header img{display:block;max-width:100%;height:auto}"
        ".brand{font-weight:700;font-size:1.1rem;margin:0}"
        "main{background:#fff;border-radius:10px;padding:2rem;"
        "box-shadow:0 1px 4px rgba(0,0,0,.12)}"
        "h1{font-size:1.35rem;margin:0 0 .8rem}p,li{line-height:1.45}p{margin:.6rem 0}"
        "ul{margin:.2rem 0 .6rem;padding-left:1.4rem}"
        f"main a{{color:{color}}}"
        f"button{{font-size:1rem;padding:.7rem 1.4rem;border:0;border-radius:6px;"
        f"background:{color};color:#fff;cursor:pointer;margin-top:.8rem}}"
        "footer{color:#5d6576;font-size:.9rem;padding:1rem 0 2rem}footer a{color:#1d2330}"
    )


@functools.lru_cache(maxsize=64)
def _style_of(color: str) -> tuple[str, str]:
    """The page's one style block for an accent colour, and its CSP hash."""
    style = _style(color)
    return style, base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()


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


def security_headers(
    form_targets: tuple[str, ...] = (), beacon: bool = False, brand: Brand | None = None
) -> dict[str, str]:
    """What every answer of the service carries. `form_targets`: origins a form on the page
    may end up at (the provider's, after the button's redirect: browsers hold a form's
    redirects to form-action too). `beacon`: the page runs its beacon script (its hash
    allowed, and fetches to this origin only). `brand`: the page's (see current_brand): its
    style block's hash, and its logo's origin as the only img-src (none without a logo).
    A new dict each time (callers add to it), copied from one made once per kind."""
    return dict(_security_headers(tuple(form_targets), beacon, current_brand(brand)))


@functools.lru_cache(maxsize=256)
def _security_headers(form_targets: tuple[str, ...], beacon: bool, shown: Brand) -> dict[str, str]:
    form_action = " ".join(("'self'", *form_targets))
    script = f"script-src 'sha256-{_BEACON_HASH}'; connect-src 'self'; " if beacon else ""
    image = f"img-src {shown.logo_origin}; " if shown.logo_origin else ""
    return {
        # The provider's authorize URL carries a state: no page may leak its URL onwards.
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{_style_of(shown.color)[1]}'; {image}"
            f"{script}form-action {form_action}; "
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
    """One answer: an HTML page (status, title, paragraphs, an optional list and notes after
    them, an optional button) or, with `location`, a 303 redirect. `form_targets` widen the
    CSP's form-action; `brand` is who the page says is asking (None: current_brand())."""

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
    brand: Brand | None = None
    # A list after the paragraphs (the access asked for), with the line that introduces it,
    # and paragraphs after it.
    items: tuple[str, ...] = ()
    items_label: str = ""
    notes: tuple[str, ...] = ()
    # Something went wrong (the footer says whom to contact if it keeps happening); default:
    # a status of 400 or more.
    trouble: bool | None = None

    def html(self) -> str:
        brand = current_brand(self.brand)
        style = _style_of(brand.color)[0]
        body = "".join(f"<p>{escape(p)}</p>" for p in self.paragraphs)
        if self.items:
            body += f"<p>{escape(self.items_label)}</p>" if self.items_label else ""
            body += "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in self.items) + "</ul>"
        body += "".join(f"<p>{escape(p)}</p>" for p in self.notes)
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
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            '<meta name="robots" content="noindex,nofollow">'
            f"<title>{escape(self.title)}</title><style>{style}</style></head>"
            f"<body><header>{_banner(brand)}</header>"
            f"<main><h1>{escape(self.title)}</h1>{body}</main>"
            f"<footer>{self._footer(brand)}</footer></body></html>"
        )

    def _footer(self, brand: Brand) -> str:
        trouble = self.status >= 400 if self.trouble is None else self.trouble
        who = escape(brand.name)
        if brand.support_href and brand.support:
            contact = f'{who} at <a href="{escape(brand.support_href)}">{escape(brand.support)}</a>'
        else:
            contact = who
        lines = [
            f"If this keeps happening, contact {contact}."
            if trouble
            else f"Questions? Contact {contact}."
        ]
        policies = [
            f'<a href="{escape(url)}">{who} {what}</a>'
            for url, what in ((brand.privacy_url, "privacy policy"), (brand.terms_url, "terms"))
            if url
        ]
        if policies:
            lines.append(" · ".join(policies))
        if self.status >= 400 and (request_id := current_request_id()):
            # What a support email quotes to find this request's log lines (logs.py).
            lines.append(f"Reference: {escape(request_id)}")
        return "".join(f"<p>{line}</p>" for line in lines)


def _banner(brand: Brand) -> str:
    """The logo (its alt text the product's name), else the name."""
    if brand.logo_url:
        return (
            f'<img src="{escape(brand.logo_url)}" alt="{escape(brand.name)}" '
            f'width="{brand.logo_width}" height="{brand.logo_height}">'
        )
    return f'<p class="brand">{escape(brand.name)}</p>'


def _who(brand: Brand) -> str:
    """The product's name at the start of a sentence."""
    name = brand.name
    return name[:1].upper() + name[1:] if name == UNNAMED else name


def link_page(
    tenant: str,
    connector: str,
    csrf: str,
    provider_origin: str,
    *,
    access: Sequence[str] = (),
    brand: Brand | None = None,
) -> Page:
    """`connector`: its display name; `access`: what is asked, in plain words or scopes."""
    shown = current_brand(brand)
    why = (f"{shown.name} asks for this {shown.reason}.",) if shown.reason else ()
    return Page(
        200,
        f"{_who(shown)} would like to connect to your {connector}",
        (f"This connection is for {tenant}.", *why),
        items=tuple(access),
        items_label=f"Access asked for in {connector}:",
        notes=(
            f"You will sign in to {connector} and approve access; you can revoke it there at "
            "any time.",
        ),
        button=f"Continue to {connector}",
        hidden={"csrf": csrf},
        form_targets=(provider_origin,),
        beacon=True,
        kind="link",
        brand=shown,
    )


# One page for an unknown token and a revoked one: nothing tells an outsider which it was.
def invalid_link(brand: Brand | None = None) -> Page:
    shown = current_brand(brand)
    return Page(
        404,
        "This link is not valid",
        (
            "Check that you opened the whole link from your email.",
            f"If it still does not work, ask {shown.name} for a new one.",
        ),
        kind="invalid",
        brand=shown,
    )


def expired_link(brand: Brand | None = None) -> Page:
    shown = current_brand(brand)
    return Page(
        410,
        "This link has expired",
        (
            f"Ask {shown.name} for a new one; the newest email you got from {shown.name} may "
            "hold a fresh link.",
        ),
        kind="expired",
        brand=shown,
    )


def already_connected(tenant: str, connector: str, brand: Brand | None = None) -> Page:
    return Page(
        200,
        f"{tenant} is already connected to {connector}",
        ("There is nothing more to do.",),
        kind="already_connected",
        brand=current_brand(brand),
    )


def too_many_tries(minutes: int, brand: Brand | None = None) -> Page:
    return Page(
        429,
        "Too many tries with this link",
        (f"Please wait about {minutes} minute(s), then open the link again.",),
        kind="rate_limited",
        brand=current_brand(brand),
    )


def try_again_later(brand: Brand | None = None) -> Page:
    return Page(
        503,
        "Something went wrong. Please try again later",
        ("We could not reach the service that starts the connection.",),
        kind="unavailable",
        brand=current_brand(brand),
    )


def forbidden_form(brand: Brand | None = None) -> Page:
    return Page(
        403,
        "This request could not be checked",
        ("Open the link from your email again, then press its button.",),
        kind="csrf",
        brand=current_brand(brand),
    )


def connected(tenant: str, connector: str, brand: Brand | None = None) -> Page:
    shown = current_brand(brand)
    return Page(
        200,
        f"{tenant} is connected to {connector}",
        (
            f"All done: {shown.name} is connected to your {connector}. You can close this window.",
            f"You can revoke its access in {connector} at any time.",
        ),
        kind="connected",
        brand=shown,
    )


def declined(connector: str, can_retry: bool, brand: Brand | None = None) -> Page:
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
        brand=current_brand(brand),
        trouble=True,
    )


def callback_refused(kind: str, brand: Brand | None = None) -> Page:
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
    return Page(status, title, (line,), kind=f"callback_{kind}", brand=current_brand(brand))


def connection_failed(can_retry: bool, brand: Brand | None = None) -> Page:
    return Page(
        502,
        "The connection could not be completed. Please try again later",
        ("The service that completes connections did not accept it this time.",),
        button="Try again" if can_retry else "",
        form_method="get",
        form_action="/retry",
        kind="create_failed",
        brand=current_brand(brand),
    )


def not_found(brand: Brand | None = None) -> Page:
    return Page(404, "Page not found", ("There is nothing here.",), kind="not_found", brand=brand)


def internal_error(brand: Brand | None = None) -> Page:
    return Page(
        500,
        "Something went wrong. Please try again later",
        ("The problem was recorded.",),
        kind="internal_error",
        brand=brand,
    )


def link_withdrawn(brand: Brand | None = None) -> Page:
    shown = current_brand(brand)
    return Page(
        410,
        "This link was withdrawn",
        (
            f"{_who(shown)} withdrew it, so nothing was connected.",
            f"If you still need to connect, ask {shown.name} for a new link.",
        ),
        kind="withdrawn",
        brand=shown,
    )


def wrong_browser(brand: Brand | None = None) -> Page:
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
        brand=current_brand(brand),
    )


def connecting_now(brand: Brand | None = None) -> Page:
    return Page(
        409,
        "Your connection is being completed",
        (
            "A connection for this link is being completed right now.",
            "Reload this page in a minute to see how it ended.",
        ),
        kind="connecting",
        brand=current_brand(brand),
    )


def not_confirmed(brand: Brand | None = None) -> Page:
    return Page(
        503,
        "We could not confirm your connection yet",
        (
            "The service that completes connections did not answer in time, and we could not "
            "check whether it made yours.",
            "There is no need to sign in again: reload this page in a few minutes.",
        ),
        kind="not_confirmed",
        brand=current_brand(brand),
    )


def no_content() -> Page:
    return Page(204, kind="no_content")


def redirect(location: str, cookies: tuple[str, ...] = (), kind: str = "redirect") -> Page:
    return Page(303, location=location, cookies=cookies, kind=kind)
