"""Who is asking (onboarding/inputs/brand.py): the settings and their errors, and what the emails
and the connect pages show of them."""

from __future__ import annotations

import base64
import email.policy
import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import pytest

from connect_service import pages
from onboarding.errors import InputError
from onboarding.inputs.brand import UNNAMED, Brand, brand_from_settings, default_name
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.mail import MailLink, MailTemplates, build_message
from onboarding.settings import load_settings
from onboarding.settings.brand import BrandValues, contrast_with_white
from tests.unit.test_profile import BASE

NOW = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
STATE = "Zk3v9Q-secret-state-0123456789abcdef"
LINK = f"https://login.example.com/oauth2/authorize?client_id=abc&state={STATE}"
TENANT = Tenant(tenant_id="t-001", name="Globex Corp", admin_email="admin@globex.example.com")
FULL = BrandValues(
    name="Acme Analytics",
    logo_url="https://cdn.acme.example/logo.png",
    color="#6B21A8",
    support="help@acme.example",
    privacy_url="https://acme.example/privacy",
    terms_url="https://acme.example/terms",
    reason="so that your tickets sync to Acme Analytics",
)
ENV = {
    "ONBOARD_BRAND_NAME": "Acme Analytics",
    "ONBOARD_BRAND_LOGO_URL": "https://cdn.acme.example/logo.png",
    "ONBOARD_BRAND_COLOR": "#6B21A8",
    "ONBOARD_BRAND_SUPPORT": "https://help.acme.example/contact",
    "ONBOARD_BRAND_PRIVACY_URL": "https://acme.example/privacy",
    "ONBOARD_BRAND_TERMS_URL": "https://acme.example/terms",
    "ONBOARD_BRAND_REASON": "so that your tickets sync to Acme Analytics.",
}


@pytest.fixture(autouse=True)
def no_brand_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this shell has set, each test starts with no brand and no sender."""
    for name in [
        *ENV,
        "ONBOARD_BRAND_FILE",
        "ONBOARD_BRAND_LOGO_WIDTH",
        "ONBOARD_BRAND_LOGO_HEIGHT",
    ]:
        monkeypatch.delenv(name, raising=False)
    for name in ("ONBOARD_EMAIL_FROM", "ONBOARD_CONNECT_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def brand_from_env() -> Brand:
    """The brand as the connect service reads it when it starts."""
    settings = load_settings()
    return brand_from_settings(settings.brand, settings.sender)


def errors_of(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError) as info:
        brand_from_env()
    return str(info.value)


# --- the settings -------------------------------------------------------------------------------


def test_every_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    brand = brand_from_env()
    assert brand == Brand(
        name="Acme Analytics",
        logo_url="https://cdn.acme.example/logo.png",
        color="#6b21a8",
        support="https://help.acme.example/contact",
        privacy_url="https://acme.example/privacy",
        terms_url="https://acme.example/terms",
        reason="so that your tickets sync to Acme Analytics",
        named=True,
    )
    assert brand.logo_origin == "https://cdn.acme.example"
    assert brand.support_href == "https://help.acme.example/contact" and not brand.support_is_email


def test_support_may_be_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_BRAND_SUPPORT", "mailto:Help@Acme.example")
    brand = brand_from_env()
    assert brand.support_is_email and brand.support_href == "mailto:Help@acme.example"


def test_a_logo_over_plain_http_only_from_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_BRAND_LOGO_URL", "http://127.0.0.1:8123/logo.png")
    assert brand_from_env().logo_origin == "http://127.0.0.1:8123"
    text = errors_of(monkeypatch, ONBOARD_BRAND_LOGO_URL="http://cdn.acme.example/logo.png")
    assert "ONBOARD_BRAND_LOGO_URL: is plain http" in text and "use https" in text


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("ONBOARD_BRAND_COLOR", "#ffcc00", "contrast of 1.51:1 with white text"),
        ("ONBOARD_BRAND_COLOR", "#7a8699", "under the 4.5:1"),
        ("ONBOARD_BRAND_COLOR", "blue", "#rrggbb"),
        ("ONBOARD_BRAND_SUPPORT", "call us", "email address"),
        ("ONBOARD_BRAND_PRIVACY_URL", "acme.example/privacy", "https URL"),
        ("ONBOARD_BRAND_TERMS_URL", "https://user:pw@acme.example/terms", "user info"),
        ("ONBOARD_BRAND_LOGO_URL", "javascript:alert(1)", "https URL"),
        ("ONBOARD_BRAND_NAME", "Acme\nBcc: x@evil.example", "one line"),
        ("ONBOARD_BRAND_REASON", "x" * 301, "longer than 300"),
        ("ONBOARD_BRAND_LOGO_WIDTH", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_value_names_its_variable_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    text = errors_of(monkeypatch, **{variable: value})
    assert f"environment: {variable}: " in text and says in text


def test_contrast_is_wcags() -> None:
    assert contrast_with_white("#000000") == pytest.approx(21)
    assert contrast_with_white("#ffffff") == pytest.approx(1)
    assert contrast_with_white("#767676") == pytest.approx(4.54, abs=0.01)  # the AA grey


def test_a_file_holds_the_brand_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "brand.yaml"
    path.write_text(
        "other: kept for whatever else reads this file\n"
        "brand:\n"
        "  name: Acme From File\n"
        "  support: help@acme.example\n"
        "  reason: so that your tickets sync\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("ONBOARD_BRAND_FILE", str(path))
    monkeypatch.setenv("ONBOARD_BRAND_NAME", "Acme Analytics")
    brand = brand_from_env()
    assert (brand.name, brand.support, brand.reason) == (
        "Acme Analytics",
        "help@acme.example",
        "so that your tickets sync",
    )


def test_a_files_bad_values_name_the_file_line_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "brand.yaml"
    path.write_text('brand:\n  name: Acme\n  color: "#ffff00"\n  colour: x\n', encoding="utf-8")
    text = errors_of(monkeypatch, ONBOARD_BRAND_FILE=str(path))
    assert f"{path}:3: brand.color: #ffff00 has a contrast of" in text
    assert f"{path}:4: brand.colour: unknown key `colour`; did you mean `color`?" in text
    path.write_text("name: Acme\n", encoding="utf-8")
    assert "needs a `brand:` mapping" in errors_of(monkeypatch, ONBOARD_BRAND_FILE=str(path))
    missing = errors_of(monkeypatch, ONBOARD_BRAND_FILE=str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in missing and "ONBOARD_BRAND_FILE" in missing


def test_the_connect_service_and_a_run_stop_on_a_bad_brand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`onboard connect-server` checks the connect settings (and the brand with them) before its
    workers start, a run its email templates' brand: either way an InputError (exit 2) naming
    the variable."""
    monkeypatch.setenv("ONBOARD_BRAND_COLOR", "#eeeeee")
    settings = load_settings()
    with pytest.raises(InputError, match="ONBOARD_BRAND_COLOR"):
        _ = settings.connect
    with pytest.raises(InputError, match="ONBOARD_BRAND_COLOR"):
        MailTemplates(brand=settings.brand.values())


def test_until_a_name_is_set_the_sender_is_named() -> None:
    assert default_name("Acme Analytics <onboard@acme.example>") == "Acme Analytics"
    assert default_name("onboard@Mail.Acme.example") == "mail.acme.example"
    assert default_name(None, "https://connect.acme.example") == "connect.acme.example"
    assert default_name(None) == UNNAMED
    assert not Brand.of(BrandValues(), email_from="onboard@acme.example").named
    assert Brand.of(FULL).with_override(BrandValues(color="#0f766e")).color == "#0f766e"


def test_a_profile_may_override_the_brand_and_say_what_access_is_asked(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(
        BASE + "access_summary: Read your tickets\n"
        "brand:\n  name: Acme for Zendesk\n  logo_url: https://zendesk-cdn.acme.example/z.png\n",
        encoding="utf-8",
    )
    profile = load_profile(path)
    assert profile.access == ["Read your tickets"]
    assert profile.brand == BrandValues(
        name="Acme for Zendesk", logo_url="https://zendesk-cdn.acme.example/z.png"
    )
    path.write_text(BASE + 'brand:\n  color: "#ffee00"\n', encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_profile(path)
    assert f"{path}:13: brand.color: #ffee00 has a contrast" in str(info.value)
    path.write_text(BASE, encoding="utf-8")
    assert load_profile(path).access == ["read", "write"]  # its scopes


# --- emails ---------------------------------------------------------------------------------


def mail(
    brand: BrandValues | None = None,
    email_from: str = "Acme Onboarding <onboard@acme.example>",
    link: MailLink | None = None,
    reminder: int = 0,
) -> tuple[EmailMessage, str, str]:
    link = link or MailLink(
        "zendesk-demo",
        "01HZXCONNECTOR000000000000",
        LINK,
        STATE,
        datetime(2027, 1, 5, 12, 0, tzinfo=UTC),
        display_name="Zendesk",
        access=("read", "write"),
    )
    message = build_message(
        tenant=TENANT,
        links=[link],
        email_from=email_from,
        templates=MailTemplates(brand=brand or BrandValues()),
        now=NOW,
        reminder=reminder,
    )
    parsed = message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    return parsed, text, html


def test_the_email_says_who_asks_for_what_until_when_and_whom_to_ask() -> None:
    message, text, html = mail(FULL)
    first = "Acme Analytics would like to connect to your Zendesk for Globex Corp"
    assert message["Subject"] == first
    assert text.splitlines()[0] == first + "."
    assert f">{first}</h1>" in html and html.count("<h1") == 1
    for body in (text, html):
        assert "Acme Analytics asks for this so that your tickets sync to Acme Analytics." in body
        words = " ".join(body.split())
        assert "you will sign in to Zendesk and approve access; you can revoke it there" in words
        assert "works until" in body and "5 January 2027" in body
        assert "The Acme Analytics team" in body and "help@acme.example" in body
        assert "in about" not in body and "hours" not in body
    assert "  - read\n  - write" in text.replace("\r\n", "\n")
    assert "<li>read</li>" in html and "<li>write</li>" in html
    assert "Privacy policy: https://acme.example/privacy" in text
    assert '<a href="https://acme.example/terms"' in html
    assert '<a href="mailto:help@acme.example"' in html
    assert (
        '<img src="https://cdn.acme.example/logo.png" alt="Acme Analytics" width="160" '
        'height="40"' in html
    )
    assert '<html lang="en">' in html and 'role="main"' in html
    assert "background-color: #6b21a8" in html  # the accent, on the button


def test_the_email_shows_the_link_once_as_a_button_once_as_text_and_nowhere_else() -> None:
    message, text, html = mail(FULL)
    headers = "\n".join(f"{k}: {v}" for k, v in message.items())
    assert STATE not in headers
    assert text.count(STATE) == 1 and LINK in text.splitlines()
    escaped = LINK.replace("&", "&amp;")
    assert html.count(STATE) == 2  # the button's href and the address to copy
    assert html.count(f'href="{escaped}"') == 1 and f"<span>{escaped}</span>" in html


def test_the_access_summary_says_it_in_plain_words() -> None:
    link = MailLink(
        "zendesk-demo",
        "c1",
        LINK,
        STATE,
        NOW + timedelta(days=30),
        display_name="Zendesk",
        access=("Read your tickets and users",),
    )
    _, text, html = mail(FULL, link=link)
    assert "Access asked for in Zendesk:\n  - Read your tickets and users" in text.replace(
        "\r\n", "\n"
    )
    assert "<li>Read your tickets and users</li>" in html


def test_with_no_brand_the_email_names_the_from_domain() -> None:
    message, text, html = mail(email_from="onboard@acme.example")
    assert (
        message["Subject"] == "acme.example would like to connect to your Zendesk for Globex Corp"
    )
    assert text.startswith("acme.example would like to connect to your Zendesk")
    assert "— acme.example" in text and "The acme.example team" not in text
    assert "<img" not in html and "mailto:" not in html
    assert "Questions?" not in text  # no support contact was set


def test_a_profiles_brand_wins_for_its_connector() -> None:
    link = MailLink(
        "zendesk-demo",
        "c1",
        LINK,
        STATE,
        NOW + timedelta(days=3),
        display_name="Zendesk",
        brand=BrandValues(name="Acme for Zendesk", support="zendesk-help@acme.example"),
    )
    message, text, _ = mail(FULL, link=link, reminder=1)
    assert message["Subject"] == (
        "Reminder: Acme for Zendesk would like to connect to your Zendesk for Globex Corp"
    )
    assert "zendesk-help@acme.example" in text and "help@acme.example\n" not in text
    assert "The Acme for Zendesk team" in text


def test_custom_templates_get_the_brand(tmp_path: Path) -> None:
    (tmp_path / "subject.txt").write_text("{{ brand.name }} asks: {{ display_name }}\n")
    (tmp_path / "body.txt").write_text(
        "{{ brand.name }} ({{ brand.support }}) {{ expires_on }} {{ access | join('/') }}\n"
        "{{ link }}\n{{ expires_in_hours }} {{ connector_name }}\n"
    )
    templates = MailTemplates(tmp_path, brand=FULL)
    message = build_message(
        tenant=TENANT,
        links=[MailLink("zd", "c1", LINK, STATE, NOW + timedelta(hours=72), access=("read",))],
        email_from="x@y.example",
        templates=templates,
        now=NOW,
    )
    assert message["Subject"] == "Acme Analytics asks: zd"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.startswith("Acme Analytics (help@acme.example) 9 December 2026 read\n")
    assert "72 zd" in text  # the old variables still work


def test_a_template_using_a_brand_key_that_does_not_exist_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("{{ link }} {{ brand.nmae }}\n")
    with pytest.raises(InputError, match=r"body\.txt.*nmae"):
        MailTemplates(tmp_path, brand=FULL)


# --- pages ----------------------------------------------------------------------------------

BRAND = Brand.of(FULL)
EVERY_PAGE: dict[str, Callable[[Brand], pages.Page]] = {
    "link": lambda b: pages.link_page("Tenant 1", "Zendesk", "c", "https://z.example", brand=b),
    "invalid": pages.invalid_link,
    "expired": pages.expired_link,
    "withdrawn": pages.link_withdrawn,
    "wrong_browser": pages.wrong_browser,
    "connected": lambda b: pages.connected("Tenant 1", "Zendesk", b),
    "already_connected": lambda b: pages.already_connected("Tenant 1", "Zendesk", b),
    "declined": lambda b: pages.declined("Zendesk", True, b),
    "too_many_tries": lambda b: pages.too_many_tries(5, b),
    "unavailable": pages.try_again_later,
    "csrf": pages.forbidden_form,
    "create_failed": lambda b: pages.connection_failed(True, b),
    "connecting": pages.connecting_now,
    "not_confirmed": pages.not_confirmed,
    "callback_unknown": lambda b: pages.callback_refused("unknown", b),
    "not_found": pages.not_found,
    "internal_error": pages.internal_error,
}


def csp(page: pages.Page) -> str:
    return pages.security_headers(page.form_targets, page.beacon, page.brand)[
        "Content-Security-Policy"
    ]


@pytest.mark.parametrize("kind", sorted(EVERY_PAGE))
def test_every_page_names_the_product_and_its_support(kind: str) -> None:
    page = EVERY_PAGE[kind](BRAND)
    html = page.html()
    assert '<img src="https://cdn.acme.example/logo.png" alt="Acme Analytics"' in html
    assert '<a href="mailto:help@acme.example">help@acme.example</a>' in html
    trouble = page.status >= 400 or kind == "declined"
    said = "If this keeps happening, contact" if trouble else "Questions? Contact"
    assert f"{said} Acme Analytics at <a" in html
    assert "Acme Analytics privacy policy" in html and "Acme Analytics terms" in html
    # The one style block is the one the CSP allows; the logo's origin the only image source.
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert style is not None and "#6b21a8" in style.group(1)
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    policy = csp(page)
    assert f"style-src 'sha256-{digest}';" in policy
    assert re.findall(r"img-src [^;]*;", policy) == ["img-src https://cdn.acme.example;"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy


def test_the_link_page_says_who_asks_for_what_and_what_happens_next() -> None:
    page = pages.link_page(
        "Tenant 1", "Zendesk", "c", "https://z.example", access=["read", "write"], brand=BRAND
    )
    html = page.html()
    assert "<h1>Acme Analytics would like to connect to your Zendesk</h1>" in html
    assert "This connection is for Tenant 1." in html
    assert "Acme Analytics asks for this so that your tickets sync to Acme Analytics." in html
    assert "<li>read</li><li>write</li>" in html
    assert "You will sign in to Zendesk and approve access; you can revoke it there" in html
    assert "Questions? Contact Acme Analytics at" in html
    policy = csp(page)
    assert "script-src 'sha256-" in policy and "form-action 'self' https://z.example;" in policy


def test_refusals_say_whom_to_ask() -> None:
    assert "ask Acme Analytics for a new one" in pages.invalid_link(BRAND).html()
    assert "Acme Analytics withdrew it" in pages.link_withdrawn(BRAND).html()
    assert "If this keeps happening, contact Acme Analytics" in pages.wrong_browser(BRAND).html()
    # With no name at all, the sentence still starts with a capital.
    unnamed = Brand.of(BrandValues())
    assert "<p>The sender of your email withdrew it" in pages.link_withdrawn(unnamed).html()


def test_without_a_logo_there_is_no_img_src_and_the_name_shows() -> None:
    plain = Brand.of(BrandValues(name="Acme Analytics"))
    page = pages.invalid_link(plain)
    assert "img-src" not in csp(page) and "<img" not in page.html()
    assert '<p class="brand">Acme Analytics</p>' in page.html()
    assert "If this keeps happening, contact Acme Analytics.</p>" in page.html()


def test_a_brand_set_for_the_request_reaches_pages_made_without_one() -> None:
    token = pages.use_brand(BRAND)
    try:
        page = pages.expired_link()
    finally:
        pages.forget_brand(token)
    assert page.brand == BRAND and "Ask Acme Analytics for a new one" in page.html()
    assert "img-src https://cdn.acme.example;" in csp(page)
