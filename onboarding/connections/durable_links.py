"""Durable connect links, as a batch issues them for `onboard connect-server` (connect_service/):
one per (tenant, connector) per email, its token kept in the ledger only as a hash.

    issue_connect_link   a new link's token, valid for the profile's connect_link_days
    connect_url          the link an email carries: `<base>/c/<token>`
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from onboarding.clock import utcnow
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Ledger


def connect_url(base_url: str, token: str) -> str:
    """The durable link an email carries: `<base>/c/<token>`."""
    return f"{base_url.rstrip('/')}/c/{token}"


def issue_connect_link(
    ledger: Ledger,
    tenant_id: str,
    profile: ConnectorProfile,
    profile_path: str | Path,
    now: datetime | None = None,
) -> str:
    """A new durable link's token for (tenant, the profile's connector), valid for the
    profile's connect_link_days; the plain token is returned this once."""
    when = now or utcnow()
    return ledger.issue_connect_link(
        tenant_id,
        profile.target_id,
        str(Path(profile_path).resolve()),
        when + timedelta(days=profile.connect_link_days),
        now=when,
    )
