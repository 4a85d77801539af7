"""What the service does for a link page, its button and the provider's callback, without
HTTP: each step reads and writes the ledger and calls Versori, and answers with a `Page`.
Stateless between requests (everything lives in the ledger), so any number of replicas on one
ledger serve the same links.

Secrets: a token, state or code is never logged or shown; logs name the tenant and the masked
state. Versori's and the ledger's errors are logged by type and code, never by message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from onboarding import constants
from onboarding.client import VersoriClient
from onboarding.clock import utcnow
from onboarding.connect import pages
from onboarding.connect.events import EventSender
from onboarding.connect.pages import Page
from onboarding.connection import tenant_of
from onboarding.errors import (
    APIError,
    LinkCheckError,
    OnboardingError,
    RateLimitedError,
    is_transient,
)
from onboarding.events import tenant_event
from onboarding.ledger import ConnectLink, ConnectOutcome, Ledger, Record, Status
from onboarding.links import check_link, mask_state
from onboarding.outcomes import StatusChange
from onboarding.profile import ConnectorProfile, load_profile

log = logging.getLogger(__name__)
T = TypeVar("T")

# The cookie that lets a declined (or failed) callback page offer the way back to its link.
RETRY_COOKIE = "onboard_connect"
RETRY_COOKIE_SECONDS = 3600
MINT_WINDOW = timedelta(hours=1)
# Versori calls inside one request: the browser is waiting, so a few quick tries only.
CALL_TRIES = 3
CALL_WAITS = (0.25, 0.75)
MAX_WAIT_IN_REQUEST = 2.0
CALL_DEADLINE_SECONDS = 15.0


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


@dataclass(frozen=True)
class CallbackAnswer:
    """What the provider sent the browser back with."""

    state: str
    code: str
    error: str


class ConnectService:
    """One per process; thread-safe (requests run on a thread pool)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        client_for: Callable[[str], VersoriClient] | None = None,
        events: EventSender | None = None,
        mints_per_hour: int = 10,
        secure_cookies: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ledger = ledger
        self._client_for = client_for or _env_clients()
        self.events = events or EventSender()
        self.mints_per_hour = mints_per_hour
        self.secure_cookies = secure_cookies
        self._sleep = sleep
        self._clock = clock
        self._profiles: dict[str, tuple[float, ConnectorProfile]] = {}
        self._profiles_lock = threading.Lock()

    # --- the link page ---------------------------------------------------------------------

    def _live_link(self, token: str) -> tuple[ConnectLink | None, Page | None]:
        """The link, or the page that refuses it. Unknown and revoked take the same path to
        the same page: one indexed read, no other work."""
        link = self.ledger.find_connect_link(token) if _plausible(token) else None
        if link is None or link.revoked_at is not None:
            return None, pages.invalid_link()
        if link.expires_at <= self._clock():
            return None, pages.expired_link()
        return link, None

    def show_link(self, token: str) -> Page:
        """GET /c/<token>: the page with its button. Records the open; mints nothing (mail
        scanners follow links)."""
        link, refused = self._live_link(token)
        if link is None:
            return refused or pages.invalid_link()
        found = self._context(link)
        if isinstance(found, Page):
            return found
        profile, record = found
        if self.ledger.note_link_opened(link, self._clock()):
            self._event(record, profile, Status.OPENED)
        authorize = profile.render(tenant_of(record).values).authorize_url
        return pages.link_page(
            record.tenant_name, profile.name, link.csrf, pages.origin_of(authorize)
        )

    def press_button(self, token: str, csrf: str, *, cross_site: bool) -> Page:
        """POST /c/<token>: a new state from Versori, recorded, and a 303 to the provider."""
        link, refused = self._live_link(token)
        if link is None:
            return refused or pages.invalid_link()
        if cross_site or not _same(csrf, link.csrf):
            return pages.forbidden_form()
        found = self._context(link)
        if isinstance(found, Page):
            return found
        profile, record = found
        if not self.ledger.take_mint(link, self.mints_per_hour, MINT_WINDOW, self._clock()):
            return pages.too_many_tries(_minutes_left(link, self._clock()))
        tenant = tenant_of(record)
        try:
            request = profile.render(tenant.values)
            url = self._call(
                lambda client: client.initialise(
                    profile.organisation_id, profile.target_id, request
                ),
                profile,
            )
            checked = check_link(
                url, request, redirect_uri=profile.redirect_uri, redirect_host=profile.redirect_host
            )
        except (OnboardingError, ValueError) as err:
            return self._mint_failed(record, err)
        created = self._clock()
        self.ledger.record_minted_link(
            tenant_id=record.tenant_id,
            connector_id=record.connector_id,
            url=checked.url,
            state=checked.state,
            created_at=created,
            expires_at=created + timedelta(hours=profile.link_ttl_hours),
        )
        if record.status is not Status.OPENED:
            self._event(record, profile, Status.OPENED)
        log.info(
            "tenant %s: new state %s for %s", record.tenant_id, checked.masked_state, profile.name
        )
        return pages.redirect(checked.url, self._retry_cookie(token), kind="to_provider")

    def _mint_failed(self, record: Record, err: BaseException) -> Page:
        code = err.code if isinstance(err, OnboardingError) else "invalid_request"
        if isinstance(err, LinkCheckError):
            code = LinkCheckError.code
        log.warning("tenant %s: could not make a new state (%s)", record.tenant_id, code)
        message = str(err) if isinstance(err, APIError | LinkCheckError) else type(err).__name__
        self.ledger.note_connect_error(
            record.tenant_id, record.connector_id, f"connect_{code}", message
        )
        return pages.try_again_later()

    # --- the callback ------------------------------------------------------------------------

    def callback(self, answer: CallbackAnswer, retry_token: str | None) -> Page:
        """GET /callback: the provider's answer for one state."""
        if not answer.state or not (answer.code or answer.error):
            return pages.callback_refused("missing")
        record, refusal = self._current_state(answer.state)
        if record is None:
            return pages.callback_refused(refusal)
        profile = self._profile_of_record(record, retry_token)
        name = profile.name if profile is not None else record.profile
        can_retry = self._retry_link(retry_token, record) is not None
        if answer.error:
            return self._declined(answer, profile, name, can_retry)
        if profile is None:
            return pages.try_again_later()
        if not self.ledger.claim_callback(answer.state, record.tenant_id, record.connector_id):
            return pages.callback_refused("used")
        tenant = tenant_of(record)
        try:
            connection = self._call(
                lambda client: client.create_connection(
                    profile.organisation_id,
                    profile.target_id,
                    code=answer.code,
                    state=answer.state,
                    name=profile.connection_name_for(tenant.values),
                    external_id=record.tenant_id,
                    template_id=profile.connection_template_id,
                    redirect_url=profile.redirect_url,
                ),
                profile,
            )
        except OnboardingError as err:
            log.warning(
                "tenant %s: CreateConnection failed (%s, state %s)",
                record.tenant_id,
                err.code,
                mask_state(answer.state),
            )
            message = str(err) if isinstance(err, APIError) else type(err).__name__
            self.ledger.note_connect_error(
                record.tenant_id, record.connector_id, f"create_{err.code}", message
            )
            return pages.connection_failed(can_retry)
        result = self.ledger.connect_state(
            answer.state, connection_id=connection.id, at=self._clock()
        )
        if result.outcome is not ConnectOutcome.CONNECTED or result.record is None:
            # Versori made the connection, but the link changed under it (an operator's reset
            # or revoke mid-callback): the ledger's word stands; the id is in the log.
            log.warning(
                "tenant %s: connection %s made, but the ledger refused its state (%s)",
                record.tenant_id,
                connection.id,
                result.outcome.value,
            )
            return pages.callback_refused(_refusal(result.outcome))
        self._event(result.record, profile, Status.CONNECTED)
        log.info("tenant %s connected to %s (%s)", record.tenant_id, name, connection.id)
        if profile.success_url:
            return pages.redirect(profile.success_url, kind="to_success_url")
        return pages.connected(record.tenant_name, name)

    def _declined(
        self, answer: CallbackAnswer, profile: ConnectorProfile | None, name: str, can_retry: bool
    ) -> Page:
        """The provider sent an error (access_denied: the admin said no): status `declined`."""
        declined = self.ledger.record_declined(
            answer.state, _provider_code(answer.error), self._clock()
        )
        if declined is None:  # changed in between (connected, replaced)
            return pages.callback_refused("used")
        if profile is not None:
            self._event(declined, profile, Status.DECLINED, declined.error_code or "")
        log.info("tenant %s declined %s (%s)", declined.tenant_id, name, declined.error_code)
        return pages.declined(name, can_retry)

    def _current_state(self, state: str) -> tuple[Record | None, str]:
        """The tenant holding `state` now, unexpired and not connected; else why not."""
        record = self.ledger.find_by_state(state)
        if record is None:
            return None, ("superseded" if self.ledger.find_superseded(state) else "unknown")
        if record.status is Status.CONNECTED or self.ledger.callback_claimed(state):
            return None, "used"
        if record.status is Status.EXPIRED or (
            record.expires_at is not None and record.expires_at <= self._clock()
        ):
            return None, "expired"
        return record, ""

    def retry(self, retry_token: str | None) -> Page:
        """GET /retry: back to the link this browser came from (its cookie), else refused."""
        if retry_token and _plausible(retry_token):
            link, refused = self._live_link(retry_token)
            if link is not None:
                return pages.redirect(f"/c/{retry_token}", kind="to_link")
            return refused or pages.invalid_link()
        return pages.invalid_link()

    def _retry_link(self, token: str | None, record: Record) -> ConnectLink | None:
        if not token or not _plausible(token):
            return None
        link = self.ledger.find_connect_link(token)
        if link is None or link.revoked_at is not None or link.expires_at <= self._clock():
            return None
        if (link.tenant_id, link.connector_id) != (record.tenant_id, record.connector_id):
            return None
        return link

    def _retry_cookie(self, token: str) -> str:
        secure = "; Secure" if self.secure_cookies else ""
        return (
            f"{RETRY_COOKIE}={token}; Path=/; Max-Age={RETRY_COOKIE_SECONDS}; HttpOnly; "
            f"SameSite=Lax{secure}"
        )

    # --- shared ------------------------------------------------------------------------------

    def _context(self, link: ConnectLink) -> tuple[ConnectorProfile, Record] | Page:
        """The link's profile and its tenant's record; or the page that ends the request there
        (no record, the profile unreadable, the tenant connected already)."""
        record = self.ledger.get(link.tenant_id, link.connector_id)
        if record is None:
            return pages.invalid_link()
        profile = self._profile(link.profile_path, link.connector_id)
        if profile is None:
            return pages.try_again_later()
        if record.status is Status.CONNECTED:
            return pages.already_connected(record.tenant_name, profile.name)
        return profile, record

    def _profile_of_record(self, record: Record, token: str | None) -> ConnectorProfile | None:
        """The profile of a callback's tenant: from the browser's link when it has one, else
        from any of the tenant's links (the one that minted the state)."""
        link = self._retry_link(token, record)
        path = (
            link.profile_path
            if link is not None
            else self.ledger.latest_profile_path(record.tenant_id, record.connector_id)
        )
        return self._profile(path, record.connector_id) if path else None

    def _profile(self, path: str, connector_id: str) -> ConnectorProfile | None:
        """The profile at `path`, loaded again when the file changes; None (logged) when it
        cannot be read or names another connector."""
        try:
            mtime = Path(path).stat().st_mtime
            with self._profiles_lock:
                cached = self._profiles.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            profile = load_profile(path)
        except (OSError, OnboardingError) as err:
            log.error("cannot load the profile %s: %s", path, type(err).__name__)
            return None
        if profile.target_id != connector_id:
            log.error("the profile %s no longer names connector %s", path, connector_id)
            return None
        with self._profiles_lock:
            self._profiles[path] = (mtime, profile)
        return profile

    def _call(self, call: Callable[[VersoriClient], T], profile: ConnectorProfile) -> T:
        """A Versori call, tried again briefly on a transient failure (the browser waits)."""
        client = self._client_for(profile.api)
        for attempt in range(CALL_TRIES):
            try:
                return call(client)
            except OnboardingError as err:
                if not is_transient(err) or attempt == CALL_TRIES - 1:
                    raise
                wait = CALL_WAITS[min(attempt, len(CALL_WAITS) - 1)]
                if isinstance(err, RateLimitedError) and err.retry_after is not None:
                    if err.retry_after > MAX_WAIT_IN_REQUEST:
                        raise
                    wait = max(wait, err.retry_after)
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _event(
        self, record: Record, profile: ConnectorProfile, status: Status, error_code: str = ""
    ) -> None:
        change = StatusChange(
            record.tenant_id, record.connector_id, profile.name, status.value, error_code
        )
        try:
            self.events(tenant_event(change))
        except Exception as err:  # an event never fails a request
            log.warning("could not queue a tenant event: %s", type(err).__name__)


def _env_clients() -> Callable[[str], VersoriClient]:
    """A Versori client per API, made when first needed, from VERSORI_* (as `onboard run`)."""
    from onboarding.settings import VersoriSettings

    clients: dict[str, VersoriClient] = {}
    lock = threading.Lock()

    def client_for(api: str) -> VersoriClient:
        with lock:
            if api not in clients:
                settings = VersoriSettings()
                clients[api] = VersoriClient(
                    api=api,  # type: ignore[arg-type]  # a profile's checked api
                    connect_timeout=settings.connect_timeout,
                    read_timeout=min(settings.read_timeout, CALL_DEADLINE_SECONDS),
                    call_deadline=min(settings.call_deadline, CALL_DEADLINE_SECONDS),
                    max_connections=constants.DEFAULT_CONCURRENCY,
                )
            return clients[api]

    return client_for


def _plausible(token: str) -> bool:
    # token_urlsafe(32) is 43 characters of [A-Za-z0-9_-]; anything else is not one of ours.
    return 20 <= len(token) <= 128 and all(c.isalnum() or c in "-_" for c in token)


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


def _minutes_left(link: ConnectLink, now: datetime) -> int:
    if link.mint_window_at is None:
        return 60
    left = link.mint_window_at + MINT_WINDOW - now
    return max(1, int(left.total_seconds() // 60) + 1)


def _provider_code(error: str) -> str:
    # The provider's error code is a short token (RFC 6749 4.1.2.1); keep it printable, short.
    code = "".join(c for c in error if c.isalnum() or c in "_-.")[:60]
    return code or "provider_error"


def _refusal(outcome: ConnectOutcome) -> str:
    return {
        ConnectOutcome.SUPERSEDED: "superseded",
        ConnectOutcome.EXPIRED: "expired",
        ConnectOutcome.USED: "used",
    }.get(outcome, "unknown")


def is_secure_base(base_url: str | None) -> bool:
    return base_url is None or urlsplit(base_url).scheme == "https"
