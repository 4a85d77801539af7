"""onboarding.mail against a real SMTP server (aiosmtpd on 127.0.0.1, see tests/smtp_server.py)."""

from __future__ import annotations

import email.policy
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trustme

from demo.smtp import LocalSmtpServer
from onboarding.errors import InputError, is_transient
from onboarding.inputs.roster import Tenant
from onboarding.mail import (
    MailAuthError,
    MailLink,
    MailSender,
    MailTemplates,
    MailTlsError,
    PermanentMailError,
    TransientMailError,
    UnsafeMessageError,
    build_message,
    message_id_for,
)
from onboarding.settings import SmtpSettings
from onboarding.settings.brand import BrandValues
from tests.smtp_server import (
    DROP,
    PASSWORD,
    SilentServer,
    SmtpTestServer,
    closed_port,
)

pytestmark = pytest.mark.timeout(30)

STATE = "Zk3v9Q-secret-state-0123456789abcdef"
LINK = (
    "https://login.example.com/oauth2/authorize?response_type=code&client_id=abc123"
    "&redirect_uri=https%3A%2F%2Fplatform.versori.com%2Fcallback&scope=openid+offline_access"
    f"&prompt=login&state={STATE}"
)
FROM = "Acme Onboarding <onboard@acme.example.com>"
# No ONBOARD_BRAND_* set: emails name the From line's display name.
SUBJECT = "Acme Onboarding would like to connect to your HubSpot for Globex Corp"
NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
EXPIRES = NOW + timedelta(hours=72)


def tenant(**changes: Any) -> Tenant:
    values: dict[str, Any] = {
        "tenant_id": "t-001",
        "name": "Globex Corp",
        "admin_email": "admin@globex.example.com",
        "fields": {"region": "eu"},
    }
    values.update(changes)
    return Tenant(**values)


@pytest.fixture(scope="module")
def templates() -> MailTemplates:
    return MailTemplates(brand=BrandValues())  # whatever ONBOARD_BRAND_* this shell has


def message(
    templates: MailTemplates, to: str = "admin@globex.example.com", **changes: Any
) -> EmailMessage:
    args: dict[str, Any] = {
        "tenant": tenant(admin_email=to),
        "connector_name": "HubSpot",
        "connector_id": "01HZXCONNECTOR000000000000",
        "link_url": LINK,
        "state": STATE,
        "expires_at": EXPIRES,
        "email_from": FROM,
        "templates": templates,
        "now": NOW,
    }
    args.update(changes)
    link = MailLink(
        connector_name=args.pop("connector_name"),
        connector_id=args.pop("connector_id"),
        url=args.pop("link_url"),
        state=args.pop("state"),
        expires_at=args.pop("expires_at"),
    )
    return build_message(links=[link], **args)


def parsed(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def bodies(msg: EmailMessage) -> tuple[str, str]:
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    text, html = (p.get_content() for p in parts)
    assert isinstance(text, str) and isinstance(html, str)
    return text, html


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if tag == "a" and k == "href" and v]


def hrefs(html: str) -> list[str]:
    parser = _Hrefs()
    parser.feed(html)
    return parser.hrefs


@pytest.fixture
def server() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as srv:
        yield srv


@pytest.fixture
def sender(server: SmtpTestServer) -> Iterator[MailSender]:
    with MailSender(**server.sender_kwargs(), email_from=FROM) as snd:
        yield snd


# -- messages ---------------------------------------------------------------------------------


def test_message_carries_the_link_exactly_in_both_parts(templates: MailTemplates) -> None:
    msg = parsed(message(templates).as_bytes())
    assert msg["To"] == "admin@globex.example.com"
    assert msg["From"] == FROM
    assert msg["Subject"] == SUBJECT
    assert msg["X-Onboarding-Tenant"] == "t-001"
    assert msg["Date"].datetime == NOW
    text, html = bodies(msg)
    assert LINK in text.splitlines()  # on a line of its own, unbroken
    assert hrefs(html) == [LINK]
    assert "This link works until 4 March 2026" in text
    assert "This link works until <strong>4 March 2026</strong>" in html
    assert "do not forward" in text and "do not forward" in html
    # The link is in the body only.
    header_text = "\n".join(f"{k}: {v}" for k, v in msg.items())
    assert STATE not in header_text


def test_a_link_longer_than_a_mail_line_survives(templates: MailTemplates) -> None:
    long_link = LINK + "&login_hint=" + "x" * 1500
    msg = parsed(message(templates, link_url=long_link).as_bytes())
    text, html = bodies(msg)
    assert long_link in text.splitlines()
    assert hrefs(html) == [long_link]
    raw = message(templates, link_url=long_link).as_bytes()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_reminder_subject_and_ids(templates: MailTemplates) -> None:
    first = message(templates)
    reminder = message(templates, reminder=1)
    assert reminder["Subject"] == f"Reminder: {SUBJECT}"
    assert "is not connected to HubSpot yet" in bodies(parsed(reminder.as_bytes()))[0]
    # A reminder is its own message, threaded under the first.
    assert reminder["Message-ID"] != first["Message-ID"]
    assert reminder["References"] == first["Message-ID"]


def test_message_id_is_stable_per_link(templates: MailTemplates) -> None:
    connector = "01HZXCONNECTOR000000000000"
    mid = message_id_for("t-001", connector, STATE, FROM)
    assert mid == message_id_for("t-001", connector, STATE, "onboard@acme.example.com")
    assert mid != message_id_for("t-001", connector, STATE + "x", FROM)
    assert mid != message_id_for("t-002", connector, STATE, FROM)
    assert mid.startswith("<onboard.") and mid.endswith("@acme.example.com>")
    assert len(mid.split("@")[0]) == len("<onboard.") + 32
    assert STATE not in mid
    assert message(templates)["Message-ID"] == mid
    assert message(templates, now=NOW + timedelta(hours=1))["Message-ID"] == mid


def test_tenant_name_is_escaped_in_html(templates: MailTemplates) -> None:
    msg = parsed(message(templates, tenant=tenant(name="<script>alert(1)</script>")).as_bytes())
    text, html = bodies(msg)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" in text  # plain text is not HTML
    assert msg["Subject"] == SUBJECT.replace("Globex Corp", "<script>alert(1)</script>")


@pytest.mark.parametrize(
    ("changes", "header"),
    [
        ({"tenant": tenant(name="Globex\r\nBcc: victim@evil.example.com")}, "Subject"),
        ({"tenant": tenant(name="Globex\n")}, "Subject"),
        ({"tenant": tenant(name="Globex\u2028Bcc: x@evil.example.com")}, "Subject"),
        ({"tenant": tenant(tenant_id="t-1\r\nBcc: x@evil.example.com")}, "X-Onboarding-Tenant"),
        ({"tenant": tenant(admin_email="a@globex.example.com\r\nBcc: x@e.com")}, "To"),
        ({"email_from": "onboard@acme.example.com\nBcc: x@evil.example.com"}, "From"),
        ({"connector_name": "HubSpot\r\nX-Evil: 1"}, "Subject"),
    ],
)
def test_line_breaks_in_header_values_are_refused(
    templates: MailTemplates, changes: dict[str, Any], header: str
) -> None:
    with pytest.raises(UnsafeMessageError) as info:
        message(templates, **changes)
    assert info.value.code == "unsafe_message" and not info.value.transient
    assert header in str(info.value)


def test_send_refuses_a_header_with_a_line_break(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    msg = message(templates)
    # The email package lets a trailing LF through; the sender does not.
    del msg["Subject"]
    msg["Subject"] = "Connect Globex\n"
    with pytest.raises(UnsafeMessageError, match="Subject"):
        sender.send(msg)
    assert server.connections == 0 and server.messages == []


def test_bad_admin_email_is_input_error(templates: MailTemplates) -> None:
    with pytest.raises(InputError, match="admin_email"):
        message(templates, tenant=tenant(admin_email="not-an-address"))


# -- templates --------------------------------------------------------------------------------


def test_override_folder_takes_precedence(tmp_path: Path) -> None:
    (tmp_path / "subject.txt").write_text(
        "Action needed: {{ tenant.name }} ({{ tenant.fields.region }})"
    )
    templates = MailTemplates(tmp_path)
    assert templates.files["subject.txt"] == tmp_path / "subject.txt"
    assert templates.files["body.txt"].parent.name == "templates"  # the package default
    assert templates.tenant_fields_used == ["region"]
    msg = message(templates)
    assert msg["Subject"] == "Action needed: Globex Corp (eu)"
    assert LINK in bodies(parsed(msg.as_bytes()))[0]


def test_override_with_undefined_variable_names_file_and_variable(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text(
        "Hello {{ tenant.name }},\n\n{{ link }}\n{{ conector_name }}\n"
    )
    with pytest.raises(InputError) as info:
        MailTemplates(tmp_path)
    text = str(info.value)
    assert str(tmp_path / "body.txt") in text
    assert "conector_name" in text and ":4:" in text


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("body.html", "<p>{% if x %}</p>", "syntax"),
        ("body.html", "<p>No link here</p>", "{{ link }}"),
        ("subject.txt", "Line one\nLine two {{ link }}", "one non-empty line"),
        ("subject.txt", "{{ tenant.nmae }}", "nmae"),
    ],
)
def test_broken_override_fails_at_load(
    tmp_path: Path, name: str, source: str, expected: str
) -> None:
    (tmp_path / name).write_text(source)
    with pytest.raises(InputError) as info:
        MailTemplates(tmp_path)
    assert name in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "Connect now: {{ link }}",
        "Connect {{ link | upper }}",
        "Your code {{ link[-20:] }}",
        "{% set x = link %}Connect {{ x }}",
        "Connect {{ link.split('state=')[1] }}",
    ],
)
def test_a_subject_that_shows_the_link_is_refused_at_load(tmp_path: Path, source: str) -> None:
    """Subjects land in mail logs, list views and notifications: never the link or its state."""
    (tmp_path / "subject.txt").write_text(source)
    with pytest.raises(InputError) as info:
        MailTemplates(tmp_path)
    text = str(info.value)
    assert "subject.txt" in text and "must not show the link" in text


def test_missing_tenant_field_at_render_is_input_error_without_link(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("{{ link }} for {{ tenant.fields.region }}")
    templates = MailTemplates(tmp_path)
    with pytest.raises(InputError) as info:
        message(templates, tenant=tenant(fields={}))
    assert "body.txt" in str(info.value) and "region" in str(info.value)
    assert STATE not in str(info.value)


def test_missing_templates_folder() -> None:
    with pytest.raises(InputError, match="not found"):
        MailTemplates(Path("/nonexistent/templates"))


# -- sending ----------------------------------------------------------------------------------


def test_send_plain(server: SmtpTestServer, sender: MailSender, templates: MailTemplates) -> None:
    sender.send(message(templates))
    (got,) = server.messages
    assert got.mail_from == "onboard@acme.example.com"
    assert got.rcpt_tos == ["admin@globex.example.com"]
    msg = got.message()
    text, html = bodies(msg)
    assert LINK in text.splitlines() and hrefs(html) == [LINK]
    assert msg["Subject"] == SUBJECT


def test_starttls_and_auth(templates: MailTemplates, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        SmtpTestServer(tls="starttls", auth=True) as srv,
        MailSender(**srv.sender_kwargs(), email_from=FROM) as snd,
    ):
        snd.send(message(templates))
        (got,) = srv.messages
        assert got.tls and got.auth_user == "onboard-mailer"
        assert PASSWORD not in repr(snd) and PASSWORD not in str(vars(snd))
    assert PASSWORD not in caplog.text
    assert STATE not in caplog.text


def test_implicit_tls(templates: MailTemplates) -> None:
    with (
        SmtpTestServer(tls="ssl", auth=True) as srv,
        MailSender(**srv.sender_kwargs(), email_from=FROM) as snd,
    ):
        snd.send(message(templates))
        assert srv.messages[0].tls


def test_untrusted_certificate_is_refused(templates: MailTemplates, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with (
        SmtpTestServer(tls="starttls") as srv,
        MailSender(**srv.sender_kwargs(ca_file=other_ca), email_from=FROM) as snd,
    ):
        with pytest.raises(MailTlsError) as info:
            snd.send(message(templates))
        assert info.value.code == "smtp_tls_failed" and not info.value.transient
        assert srv.messages == []


def test_wrong_password(templates: MailTemplates, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-123"
    with (
        SmtpTestServer(tls="starttls", auth=True) as srv,
        MailSender(**srv.sender_kwargs(password=wrong), email_from=FROM) as snd,
        pytest.raises(PermanentMailError) as info,
    ):
        snd.send(message(templates))
    err = info.value
    assert isinstance(err, MailAuthError) and err.code == "smtp_auth_failed"
    assert err.smtp_code == 535 and not is_transient(err)
    assert "535" in str(err)
    assert err.__cause__ is None and err.__suppress_context__
    for secret in (wrong, PASSWORD):
        assert secret not in str(err) and secret not in repr(err) and secret not in caplog.text


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.25", "mail.internal"])
def test_plain_smtp_to_a_remote_host_is_refused_even_without_auth(host: str) -> None:
    """Every message carries an authorize link: not in clear across a network."""
    with pytest.raises(InputError, match="ONBOARD_SMTP_SECURITY") as info:
        MailSender(host=host, security="none", email_from=FROM)
    assert host in str(info.value) and "starttls or ssl" in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_plain_smtp_to_loopback_stays_allowed_for_the_demo_server(host: str) -> None:
    MailSender(host=host, security="none", email_from=FROM).close()


def test_plaintext_auth_is_refused_unless_loopback() -> None:
    with pytest.raises(InputError, match="ONBOARD_SMTP_SECURITY") as info:
        MailSender(
            host="smtp.example.com",
            security="none",
            username="u",
            password="p4ss",
            email_from=FROM,
        )
    assert "p4ss" not in str(info.value)
    # To a loopback host (a local relay) it is allowed.
    MailSender(host="127.0.0.1", security="none", username="u", password="p", email_from=FROM)


def test_421_is_transient_then_the_next_send_succeeds(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    server.on_rcpt("admin@globex.example.com", "421 4.7.0 Try again later")
    with pytest.raises(TransientMailError) as info:
        sender.send(message(templates))
    assert info.value.smtp_code == 421 and info.value.code == "smtp_transient"
    assert is_transient(info.value)
    sender.send(message(templates))
    assert len(server.messages) == 1 and server.connections == 2


def test_550_is_permanent_and_names_no_link(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    to = "gone@globex.example.com"
    server.on_rcpt(to, f"550 5.1.1 <{to}>: Recipient address rejected", always=True)
    with pytest.raises(PermanentMailError) as info:
        sender.send(message(templates, to=to))
    err = info.value
    assert err.smtp_code == 550 and err.code == "smtp_rejected" and not err.transient
    assert str(err).startswith(f"SMTP 550 5.1.1 <{to}>: Recipient address rejected")
    assert STATE not in str(err) and "login.example.com" not in str(err)
    # The connection was reset, not lost: the next tenant goes through on it.
    sender.send(message(templates))
    assert server.connections == 1 and len(server.messages) == 1


def test_long_replies_are_cut(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    to = "long@globex.example.com"
    server.on_rcpt(to, "554 5.7.1 " + "blocked " * 100)
    with pytest.raises(PermanentMailError) as info:
        sender.send(message(templates, to=to))
    assert info.value.smtp_code == 554 and len(str(info.value)) < 360


def test_international_address_goes_out_with_smtputf8(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    sender.send(message(templates, to="jörg@müller.example.com"))
    # An ASCII mailbox at an international domain needs no SMTPUTF8: the domain is punycode.
    sender.send(message(templates, to="jorg@müller.example.com"))
    first, second = server.messages
    assert first.rcpt_tos == ["jörg@müller.example.com"] and first.message()["To"] == (
        "jörg@müller.example.com"
    )
    assert second.rcpt_tos == ["jorg@xn--mller-kva.example.com"]


def test_errors_survive_pickling() -> None:
    err = pickle.loads(pickle.dumps(PermanentMailError("SMTP 550 no", smtp_code=550)))
    assert (
        isinstance(err, PermanentMailError) and err.smtp_code == 550 and str(err) == "SMTP 550 no"
    )
    unsafe = pickle.loads(pickle.dumps(UnsafeMessageError("Subject")))
    assert unsafe.header == "Subject" and unsafe.code == "unsafe_message"


def test_drop_during_data_is_transient_and_next_send_reconnects(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    sender.send(message(templates, to="one@globex.example.com"))
    server.on_data("two@globex.example.com", DROP)
    with pytest.raises(TransientMailError, match="closed the connection"):
        sender.send(message(templates, to="two@globex.example.com"))
    sender.send(message(templates, to="three@globex.example.com"))
    assert [m.rcpt_tos[0].split("@")[0] for m in server.messages] == ["one", "three"]
    assert server.connections == 2


def test_drop_before_data_on_a_reused_connection_reconnects_transparently(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    sender.send(message(templates, to="one@globex.example.com"))
    server.on_rcpt("two@globex.example.com", DROP)
    sender.send(message(templates, to="two@globex.example.com"))  # no error: retried once
    assert len(server.messages) == 2 and server.connections == 2


def test_drop_on_a_fresh_connection_is_not_retried(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    server.on_rcpt("two@globex.example.com", DROP)
    with pytest.raises(TransientMailError):
        sender.send(message(templates, to="two@globex.example.com"))
    assert server.connections == 1


def test_421_on_mail_from_on_a_reused_connection_reconnects(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    sender.send(message(templates))
    # What a server closing an idle connection says first.
    server.on_mail("onboard@acme.example.com", "421 4.4.2 Error: timeout exceeded")
    sender.send(message(templates))
    assert len(server.messages) == 2 and server.connections == 2


@pytest.mark.parametrize(
    ("idle_check_seconds", "logged"),
    [(0.0, "went stale while idle"), (3600.0, "was closed by the server")],
    ids=["noop-check", "retry"],
)
def test_server_closing_an_idle_connection(
    templates: MailTemplates,
    caplog: pytest.LogCaptureFixture,
    idle_check_seconds: float,
    logged: str,
) -> None:
    caplog.set_level(logging.INFO, logger="onboarding.mail")
    with (
        SmtpTestServer(tls="starttls", auth=True) as srv,
        MailSender(
            **srv.sender_kwargs(idle_check_seconds=idle_check_seconds), email_from=FROM
        ) as snd,
    ):
        snd.send(message(templates))
        srv.disconnect_all()
        snd.send(message(templates))
        assert len(srv.messages) == 2 and srv.connections == 2
    assert logged in caplog.text


def test_one_connection_per_thread(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    msg = message(templates)
    for _ in range(20):
        sender.send(msg)
    assert len(server.messages) == 20 and server.connections == 1


def test_threads_share_nothing_but_reuse_their_own(
    server: SmtpTestServer, sender: MailSender, templates: MailTemplates
) -> None:
    start = threading.Barrier(4)

    def batch(worker: int) -> None:
        start.wait()
        for i in range(5):
            sender.send(message(templates, to=f"w{worker}-{i}@globex.example.com"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(batch, range(4)))
    assert len(server.messages) == 20
    assert server.connections == 4
    assert len({m.rcpt_tos[0] for m in server.messages}) == 20


def test_close_closes_every_thread_connection(
    server: SmtpTestServer, templates: MailTemplates
) -> None:
    snd = MailSender(**server.sender_kwargs(), email_from=FROM)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: snd.send(message(templates)), range(3)))
    opened = server.connections
    snd.close()
    snd.close()
    assert len(snd._connections) == 0
    snd.send(message(templates))  # usable again: opens a new connection
    assert server.connections == opened + 1
    snd.close()


def test_server_that_never_answers_times_out(templates: MailTemplates) -> None:
    with SilentServer() as silent:
        snd = MailSender(
            host=silent.host, port=silent.port, security="none", timeout=1, email_from=FROM
        )
        started = time.monotonic()
        with pytest.raises(TransientMailError, match="did not answer within 1 s"):
            snd.send(message(templates))
        assert time.monotonic() - started < 5


def test_connection_refused_is_transient(templates: MailTemplates) -> None:
    snd = MailSender(host="127.0.0.1", port=closed_port(), security="none", email_from=FROM)
    with pytest.raises(TransientMailError, match="cannot reach"):
        snd.send(message(templates))


# -- settings ---------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONBOARD_SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("ONBOARD_SMTP_SECURITY", "ssl")
    monkeypatch.setenv("ONBOARD_SMTP_USERNAME", "mailer")
    monkeypatch.setenv("ONBOARD_SMTP_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("ONBOARD_EMAIL_FROM", FROM)
    monkeypatch.setenv("ONBOARD_SMTP_PORT", "")
    settings = SmtpSettings(_env_file=None)
    assert settings.port == 465 and settings.email_from == FROM
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings)
    snd = MailSender.from_settings(settings)
    assert (snd.host, snd.port, snd.security, snd.username) == (
        "smtp.example.com",
        465,
        "ssl",
        "mailer",
    )
    assert "hunter2-secret" not in repr(snd)
    assert SmtpSettings(_env_file=None, security="starttls", port=None).port == 587


def test_missing_host_and_from_name_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ONBOARD_SMTP_HOST", "ONBOARD_EMAIL_FROM", "ONBOARD_SMTP_BLOCK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError) as info:
        MailSender.from_settings(SmtpSettings(_env_file=None))
    assert "ONBOARD_SMTP_HOST" in str(info.value) and "ONBOARD_EMAIL_FROM" in str(info.value)
    with pytest.raises(InputError, match="ONBOARD_EMAIL_FROM"):
        MailSender(host="smtp.example.com", email_from="not an address")
    with pytest.raises(InputError, match="ONBOARD_SMTP_CA_FILE"):
        MailSender(host="smtp.example.com", email_from=FROM, ca_file="/nonexistent/ca.pem")


# -- the demo server --------------------------------------------------------------------------


def test_local_smtp_server_writes_eml_files(tmp_path: Path, templates: MailTemplates) -> None:
    folder = tmp_path / "outbox"
    with LocalSmtpServer(folder) as local:
        assert local.port != 0
        with MailSender(host=local.host, port=local.port, security="none", email_from=FROM) as snd:
            snd.send(message(templates, to="a@globex.example.com"))
            snd.send(message(templates, to="b@globex.example.com", state=STATE + "2"))
        assert local.messages == 2
    files = sorted(folder.glob("*.eml"))
    assert [f.name.split("-")[0] for f in files] == ["0001", "0002"]
    assert (
        files[0].name
        == "0001-"
        + message_id_for("t-001", "01HZXCONNECTOR000000000000", STATE, FROM).strip("<>")
        + ".eml"
    )
    msg = parsed(files[0].read_bytes())
    assert msg["To"] == "a@globex.example.com"
    assert LINK in bodies(msg)[0]


def test_the_mail_package_does_not_import_the_demo_smtp_server() -> None:
    """aiosmtpd is a demo dependency: a worker that builds and sends mail never loads it."""
    code = (
        "import sys, onboarding.mail; from onboarding.mail import build_message; "
        "assert 'aiosmtpd' not in sys.modules, 'onboarding.mail imported aiosmtpd'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- one email for a campaign's links (onboarding/batch/campaign.py sends it) --------------------

CAMPAIGN_TENANT = Tenant(tenant_id="t1", name="Acme", admin_email="admin@acme.example.com")
HUBSPOT = MailLink(
    "HubSpot",
    "c-hubspot",
    "https://app.hubspot.example/oauth?state=s1",
    "s1",
    NOW + timedelta(hours=72),
)
SLACK = MailLink(
    "Slack", "c-slack", "https://slack.example/oauth?state=s2", "s2", NOW + timedelta(hours=24)
)


def test_one_email_carries_every_link_with_its_connector_and_expiry() -> None:
    message = build_message(
        tenant=CAMPAIGN_TENANT,
        links=[HUBSPOT, SLACK],
        email_from=FROM,
        templates=MailTemplates(brand=BrandValues()),
        now=NOW,
    )
    parsed = message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert (
        parsed["Subject"]
        == "Acme Onboarding would like to connect to your HubSpot and Slack for Acme"
    )
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "1. HubSpot:" in text and "2. Slack:" in text
    assert text.index(HUBSPOT.url) < text.index("2. Slack:") < text.index(SLACK.url)
    assert "works until 4 March 2026" in text and "works until 2 March 2026" in text
    for link in (HUBSPOT, SLACK):
        assert link.url in text and link.url.replace("&", "&amp;") in html
        assert link.state not in parsed["Subject"] and link.state not in parsed["Message-ID"]


def test_the_message_id_follows_the_set_of_links() -> None:
    both = message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s2")])
    assert both == message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s2")])
    assert both != message_id_for("t1", "c-hubspot", "s1", FROM)
    assert both != message_id_for("t1", "c-hubspot", "s1", FROM, more=[("c-slack", "s3")])
    assert both != message_id_for(
        "t1", "c-hubspot", "s1", FROM, reminder=1, more=[("c-slack", "s2")]
    )


def test_a_template_that_shows_one_link_is_refused_for_a_campaign(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("Connect {{ tenant.name }}: {{ link }}\n")
    templates = MailTemplates(tmp_path)  # fine for one connector
    with pytest.raises(InputError, match=r"body\.txt.*loop over `links`"):
        templates.check_campaign()
    (tmp_path / "body.txt").write_text(
        "{% for item in links %}{{ item.connector_name }}: {{ item.link }}\n{% endfor %}"
    )
    MailTemplates(tmp_path).check_campaign()


def test_a_subject_that_shows_a_campaign_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "subject.txt").write_text("Connect {{ links[-1].link }}\n")
    with pytest.raises(InputError, match=r"subject\.txt.*must not show the link"):
        MailTemplates(tmp_path).check_campaign()


def test_a_render_error_never_quotes_any_of_the_links(tmp_path: Path) -> None:
    # Passes the load-time check (sample links), fails on the real second link, naming it.
    (tmp_path / "body.txt").write_text(
        "{% for item in links %}{{ item.link }}{% endfor %}"
        '{% if "slack.example" in links[-1].link %}{{ {}[links[-1].link] }}{% endif %}\n'
    )
    templates = MailTemplates(tmp_path)
    with pytest.raises(InputError) as caught:
        build_message(
            tenant=CAMPAIGN_TENANT,
            links=[HUBSPOT, SLACK],
            email_from=FROM,
            templates=templates,
            now=NOW,
        )
    assert "body.txt" in str(caught.value) and "<link>" in str(caught.value)
    assert HUBSPOT.url not in str(caught.value) and SLACK.url not in str(caught.value)
