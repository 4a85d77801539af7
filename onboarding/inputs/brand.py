"""Who is asking, as an email or a connect page shows it: the brand's settings
(`onboarding.settings.brand`: ONBOARD_BRAND_*, its file, a profile's `brand:` mapping, each
checked there) with every key resolved, the name never empty.

    Brand               what emails and pages show: every key resolved
    default_name        the name shown until ONBOARD_BRAND_NAME is set
    brand_from_settings a process's brand (the connect service's), from its settings
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from email.utils import parseaddr
from urllib.parse import urlsplit

from onboarding.settings.brand import (
    DEFAULT_COLOR,
    LINE_BREAKS,
    BrandSettings,
    BrandValues,
    SenderSettings,
)

# The logo's box in emails and pages, in CSS pixels (it keeps its own aspect ratio in
# browsers; mail clients that honour only the attributes show it at this size).
DEFAULT_LOGO_WIDTH = 160
DEFAULT_LOGO_HEIGHT = 40
# Said of a sender with no name at all (no ONBOARD_BRAND_NAME, no From address, no connect
# base URL): only the connect service can be in that state.
UNNAMED = "the sender of your email"


@dataclass(frozen=True)
class Brand:
    """What an email or a page shows of the product: every key resolved."""

    name: str
    logo_url: str | None = None
    logo_width: int = DEFAULT_LOGO_WIDTH
    logo_height: int = DEFAULT_LOGO_HEIGHT
    color: str = DEFAULT_COLOR
    support: str | None = None
    privacy_url: str | None = None
    terms_url: str | None = None
    reason: str | None = None
    # False while no ONBOARD_BRAND_NAME (nor a profile's brand.name) names the product.
    named: bool = True

    @classmethod
    def of(
        cls,
        values: BrandValues | None = None,
        *,
        email_from: str | None = None,
        fallback_host: str | None = None,
    ) -> Brand:
        values = values or BrandValues()
        fields = values.set_values()
        named = "name" in fields
        if not named:
            fields["name"] = default_name(email_from, fallback_host)
        return cls(**fields, named=named)

    def with_override(self, values: BrandValues | None) -> Brand:
        """This brand with a profile's `brand:` keys over it (its connector's emails, pages)."""
        if values is None:
            return self
        fields = values.set_values()
        return replace(self, **fields, named=self.named or "name" in fields)

    @property
    def support_is_email(self) -> bool:
        return self.support is not None and "://" not in self.support

    @property
    def support_href(self) -> str | None:
        """The support contact as a link: mailto: for an address, else its URL."""
        if self.support is None:
            return None
        return f"mailto:{self.support}" if self.support_is_email else self.support

    @property
    def logo_origin(self) -> str | None:
        """scheme://host[:port] of the logo: the one source the pages' img-src allows."""
        if self.logo_url is None:
            return None
        parts = urlsplit(self.logo_url)
        return f"{parts.scheme}://{parts.netloc}".lower()


def default_name(email_from: str | None, fallback_host: str | None = None) -> str:
    """The name shown until ONBOARD_BRAND_NAME is set.

    The From line is what the admin's mail client already shows as the sender: naming the same
    party in the body keeps the two consistent (a body naming someone other than the From line
    is what people and filters learn to distrust), and it is a name the operator set on purpose.
    Its display name when it has one ("Acme Analytics <onboarding@acme.com>": Acme Analytics),
    else its domain (acme.com). The connect service may run without a From address: then the
    host of its own links, which the admin just opened."""
    if email_from:
        display, address = parseaddr(email_from.strip())
        display = display.strip()
        if display and not LINE_BREAKS.search(display):
            return display[:100]
        domain = address.rpartition("@")[2].strip().lower()
        if domain:
            try:
                return domain.encode("ascii").decode("idna")
            except UnicodeError:
                return domain
    if fallback_host:
        host = urlsplit(fallback_host).hostname if "://" in fallback_host else fallback_host
        if host:
            return host
    return UNNAMED


def brand_from_settings(brand: BrandSettings, sender: SenderSettings) -> Brand:
    """A process's brand (the connect service's): ONBOARD_BRAND_* (and its file), the name
    defaulting from ONBOARD_EMAIL_FROM, then ONBOARD_CONNECT_BASE_URL's host."""
    return Brand.of(
        brand.values(), email_from=sender.email_from, fallback_host=sender.connect_base_url
    )
