"""The email templates: subject.txt, body.txt and body.html, loaded and checked at load time.

A profile's `email_templates` folder overrides any of the three; the rest come from
onboarding/templates/. Every template is rendered once with sample values when loaded, so a
typo, a body without the link or a subject that shows it fails before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    nodes,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from onboarding.clock import utcnow
from onboarding.errors import InputError, Problem
from onboarding.inputs.brand import Brand
from onboarding.inputs.roster import Tenant
from onboarding.mail.message import MailLink, has_line_break
from onboarding.settings.brand import BrandValues

TEMPLATE_NAMES = ("subject.txt", "body.txt", "body.html")
DEFAULT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_NAMED = ("tenant_id", "name", "admin_email")
_DICT_METHODS = frozenset(dir(dict))


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str

    def __repr__(self) -> str:  # the bodies hold the link
        return f"RenderedMail(subject={self.subject!r}, text=..., html=...)"


class _AnyFields(dict[str, str]):
    """Stands in for any tenant's free fields when the templates are checked at load time."""

    def __missing__(self, key: str) -> str:
        return f"sample-{key}"


class _SampleTenant(Tenant):
    @property
    def values(self) -> dict[str, str]:
        out = _AnyFields(self.fields)
        out.update(tenant_id=self.tenant_id, name=self.name, admin_email=self.admin_email)
        return out


_SAMPLE_HOST = "auth.example.com"
_SAMPLE_STATE = "sample-state-0123456789"
_SAMPLE_LINK = f"https://{_SAMPLE_HOST}/oauth2/authorize?state={_SAMPLE_STATE}"
_SAMPLE_LINK_2 = f"https://{_SAMPLE_HOST}/oauth2/authorize?state={_SAMPLE_STATE}-2"
_VARIABLES = (
    "Email template variables: tenant (.name, .tenant_id, .admin_email, .fields.<column>), "
    "links (a list, one per connector: .display_name, .connector_name, .connector_id, .link, "
    ".expires_at, .expires_on, .expires_in_hours, .opened_at, .declined, .access), reminder, "
    "brand (.name, .logo_url, .logo_width, .logo_height, .color, .support, .support_href, "
    ".support_is_email, .privacy_url, .terms_url, .reason); and the first link's "
    "display_name, connector_name, link, expires_at, expires_on, expires_in_hours, opened_at, "
    "declined, access."
)
# Render-time checks use a brand with every key set and one with none.
_SAMPLE_BRANDS = (
    Brand(
        name="Sample Brand",
        logo_url="https://brand.example.com/logo.png",
        support="support@brand.example.com",
        privacy_url="https://brand.example.com/privacy",
        terms_url="https://brand.example.com/terms",
        reason="so that your data syncs",
    ),
    Brand(name="brand.example.com", named=False),
)


def date_words(when: datetime) -> str:
    """A date as people write it: 5 January 2027 (its UTC date)."""
    day = when.astimezone(UTC)
    return f"{day.day} {day:%B %Y}"


def link_context(link: MailLink, now: datetime) -> dict[str, Any]:
    """One link's template variables."""
    expires = link.expires_at.astimezone(UTC)
    return {
        "connector_name": link.connector_name,
        "display_name": link.display_name or link.connector_name,
        "connector_id": link.connector_id,
        "link": link.url,
        "expires_at": expires,
        "expires_on": date_words(expires),
        "expires_in_hours": max(0, round((expires - now).total_seconds() / 3600)),
        "opened_at": link.opened_at.astimezone(UTC) if link.opened_at else None,
        "declined": link.declined,
        "reconnect": link.reconnect,
        "access": list(link.access),
    }


class MailTemplates:
    """subject.txt, body.txt and body.html: each from `folder` if it has it, else the default.

    Variables: tenant (tenant.name, .tenant_id, .admin_email, .fields, .values); links, one per
    connector the email carries (a campaign's email carries several), each with display_name
    (the profile's, else its name), connector_name, connector_id, link, expires_at (aware
    datetime, UTC) and expires_in_hours (int), opened_at (when the admin first opened its
    connect link without finishing, else None), declined (they said no at the provider) and
    reconnect ("broken" or "disconnected": the connection stopped working; else "");
    the first link's at the top level too; reminder (0 on first send); brand
    (onboarding.inputs.brand.Brand: name, logo_url, logo_width, logo_height, color, support,
    support_href, support_is_email, privacy_url, terms_url, reason), each link's expires_on
    (its date in words) and access (what it asks, in plain words or as scopes). HTML is autoescaped;
    text is not. An undefined variable is an error, and every template is rendered once with
    sample values here, so a typo fails before anything is sent; `check_campaign` also asks
    that an email with two links shows both.
    """

    def __init__(
        self, folder: str | os.PathLike[str] | None = None, *, brand: BrandValues | None = None
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        # ONBOARD_BRAND_* (and ONBOARD_BRAND_FILE), as the caller read them (the settings root's
        # `brand.values()`: a bad value stops the run before anything is sent); none given,
        # none set: the From line names the sender.
        self.brand_values = brand if brand is not None else BrandValues()
        loaders: list[FileSystemLoader] = []
        if self.folder is not None:
            if not self.folder.is_dir():
                raise InputError(f"{self.folder}: email templates folder not found")
            loaders.append(FileSystemLoader(self.folder))
        loaders.append(FileSystemLoader(DEFAULT_TEMPLATES))
        # Sandboxed: a template may read what it is given, not reach into Python from there.
        self._env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(("html", "htm", "xml"), default_for_string=False),
            undefined=StrictUndefined,
            auto_reload=False,
        )
        self._templates: dict[str, Template] = {}
        self.files: dict[str, Path] = {}
        for name in TEMPLATE_NAMES:
            try:
                template = self._env.get_template(name)
            except TemplateSyntaxError as err:
                where = err.filename or name
                raise InputError(
                    [Problem(where, err.lineno, "", f"template syntax error: {err.message}")]
                ) from None
            except (TemplateError, OSError, UnicodeDecodeError) as err:
                raise InputError(f"{name}: cannot load the email template ({err})") from None
            self._templates[name] = template
            self.files[name] = Path(template.filename or name)
        self.tenant_fields_used = self._fields_used()
        self._subject_uses_link = self._uses_link("subject.txt")
        self._check()

    def __repr__(self) -> str:
        return f"MailTemplates(folder={self.folder!r})"

    def render(
        self,
        *,
        tenant: Tenant,
        links: Sequence[MailLink],
        now: datetime,
        reminder: int = 0,
        email_from: str = "",
    ) -> RenderedMail:
        """Render all three; a template error is an InputError naming the file (never a link).
        `email_from` names the sender until a brand name is set (brand.default_name)."""
        context = _context(
            tenant,
            [link_context(link, now) for link in links],
            reminder,
            self.brand_for(email_from, links),
        )
        secrets = [link.url for link in links]
        out = {name: self._render(name, context, secrets=secrets) for name in TEMPLATE_NAMES}
        return RenderedMail(
            subject=out["subject.txt"].strip(), text=out["body.txt"], html=out["body.html"]
        )

    def brand_for(self, email_from: str, links: Sequence[MailLink] = ()) -> Brand:
        """The brand an email shows: ONBOARD_BRAND_*, under the first link's profile's own."""
        brand = Brand.of(self.brand_values, email_from=email_from or None)
        return brand.with_override(links[0].brand if links else None)

    def _render(self, name: str, context: Mapping[str, Any], secrets: Iterable[str] = ()) -> str:
        template = self._templates[name]
        try:
            return template.render(context)
        except Exception as err:  # UndefinedError, SecurityError, TypeError from a filter...
            text = f"{type(err).__name__}: {err}" if not isinstance(err, TemplateError) else ""
            text = text or str(getattr(err, "message", None) or err)
            for secret in secrets:
                text = text.replace(secret, "<link>")
            raise InputError(
                [Problem(str(self.files[name]), _template_line(err, template), "", text)],
                hint=_VARIABLES,
            ) from None

    def _check(self, samples: Sequence[str] = (_SAMPLE_LINK,)) -> None:
        """Render with sample values, the first email and a reminder, carrying one link per
        sample: each body must show every link, the subject none."""
        tenant = _SampleTenant.model_construct(
            tenant_id="sample-tenant",
            name="Sample Tenant",
            admin_email="admin@example.com",
            fields=_AnyFields(),
        )
        now = utcnow().replace(microsecond=0)
        # The first email with a full brand and with none; a reminder to an admin who opened
        # the link, then to one who declined.
        for reminder, brand in zip((0, 0, 1, 2), _SAMPLE_BRANDS * 2, strict=True):
            links = [
                MailLink(
                    f"Sample Connector {i}",
                    f"sample-{i}",
                    url,
                    "",
                    now + timedelta(hours=72),
                    opened_at=now - timedelta(days=1) if reminder else None,
                    declined=reminder == 2,
                    access=("Read your sample data",) if i % 2 else ("read", "write"),
                )
                for i, url in enumerate(samples, 1)
            ]
            context = _context(tenant, [link_context(link, now) for link in links], reminder, brand)
            out = {name: self._render(name, context) for name in TEMPLATE_NAMES}
            subject = out["subject.txt"].strip()
            problems = []
            if not subject or has_line_break(subject):
                problems.append((TEMPLATE_NAMES[0], "must render to exactly one non-empty line"))
            elif self._subject_uses_link or _SAMPLE_STATE in subject or _SAMPLE_HOST in subject:
                # Subjects end up in mail logs, list views and notifications: never the link.
                problems.append(
                    (TEMPLATE_NAMES[0], "must not show the link (or its state); remove {{ link }}")
                )
            for name in TEMPLATE_NAMES[1:]:
                if any(url not in out[name] for url in samples):
                    problems.append(
                        (name, "does not show the link: use {{ link }}")
                        if len(samples) == 1
                        else (
                            name,
                            "does not show every link of an email with several connectors: "
                            "loop over `links` ({% for item in links %}{{ item.link }}"
                            "{% endfor %})",
                        )
                    )
            if problems:
                raise InputError([Problem(str(self.files[n]), None, "", m) for n, m in problems])

    def check_campaign(self) -> None:
        """For a campaign (several connectors): an email with two links must show both."""
        self._check((_SAMPLE_LINK, _SAMPLE_LINK_2))

    def _uses_link(self, name: str) -> bool:
        """Whether a template reads the variable `link` anywhere (filters, slices included)."""
        source = self.files[name].read_text(encoding="utf-8")
        return any(n.name == "link" for n in self._env.parse(source).find_all(nodes.Name))

    def _fields_used(self) -> list[str]:
        """Roster columns the templates read as tenant.fields.<x> or tenant.values.<x>."""
        found: list[str] = []
        for name in TEMPLATE_NAMES:
            source = self.files[name].read_text(encoding="utf-8")
            for node in self._env.parse(source).find_all((nodes.Getattr, nodes.Getitem)):
                if not isinstance(node, nodes.Getattr | nodes.Getitem):
                    continue
                inner = node.node
                if not (
                    isinstance(inner, nodes.Getattr)
                    and inner.attr in ("fields", "values")
                    and isinstance(inner.node, nodes.Name)
                    and inner.node.name == "tenant"
                ):
                    continue
                key: object = None
                if isinstance(node, nodes.Getattr) and node.attr not in _DICT_METHODS:
                    key = node.attr
                elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                    key = node.arg.value
                if isinstance(key, str) and key not in _NAMED:
                    found.append(key)
        return list(dict.fromkeys(found))


def _context(
    tenant: Tenant, links: list[dict[str, Any]], reminder: int, brand: Brand
) -> dict[str, Any]:
    # A reconnect email when every link it carries is one (else the invitation, each
    # reconnect link marked in the list).
    # Its reason: "broken" when any of them is (said more precisely), else "disconnected".
    reasons = {link["reconnect"] for link in links}
    reconnect = "" if "" in reasons else ("broken" if "broken" in reasons else "disconnected")
    return {
        "tenant": tenant,
        **links[0],
        "links": links,
        "reminder": reminder,
        "brand": brand,
        "reconnect": reconnect,
    }


def _template_line(err: BaseException, template: Template) -> int | None:
    """The template line a render error came from (Jinja rewrites tracebacks to point there)."""
    lineno = getattr(err, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    tb = err.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == template.filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
