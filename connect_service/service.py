"""What the service does for a link page, its button and the provider's callback, without
HTTP: each step reads and writes the ledger and calls Versori, and answers with a `Page`.
Stateless between requests (everything lives in the ledger), so any number of replicas on one
ledger serve the same links.

Every connection exactly once: a callback claims its state (`connecting`) before it calls
CreateConnection, calls it once (a one-time code is never sent twice), and resolves an answer
that never came (a timeout, a dropped socket, a 5xx, a 409) by asking Versori for the
tenant's connection. A claim left unfinished (a crash, a SIGTERM, a ledger outage) is resolved
the same way on the tenant's next request, or by `sweep` (on start, then every few minutes).

A state minted by the button is bound to the browser that pressed it (a cookie, kept only as
its hash next to the state): only that browser's callback may use it.

Secrets: a token, state or code is never logged or shown; logs name the tenant and the masked
state. Versori's and the ledger's errors are logged by type and code, never by message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

from connect_service import pages
from connect_service.event_sender import EventSender
from connect_service.pages import Page
from onboarding import constants
from onboarding.batch.outcomes import StatusChange
from onboarding.batch.retry_policy import BROWSER_RETRY
from onboarding.batch.tenant_events import tenant_event
from onboarding.clock import utcnow
from onboarding.connections.activation import activate, already_activated, wanted_of
from onboarding.connections.record_connection import tenant_of
from onboarding.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ConflictError,
    LinkCheckError,
    OnboardingError,
    ServerError,
)
from onboarding.inputs.brand import Brand
from onboarding.inputs.profile import ConnectorProfile, load_profile, readable
from onboarding.ledger import (
    HELD_STATUSES,
    WAITING_STATUSES,
    ConnectLink,
    ConnectState,
    Ledger,
    Record,
    SeenLink,
    StateOutcome,
    Status,
    state_digest,
)
from onboarding.settings import VersoriSettings
from onboarding.versori.authorize_url import check_link, mask_state
from onboarding.versori.client import VersoriClient

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

# The cookie that lets a declined (or failed) callback page offer the way back to its link.
RETRY_COOKIE = "onboard_connect"
RETRY_COOKIE_SECONDS = 3600
MINT_WINDOW = timedelta(hours=1)
# The cookie that binds a minted state to the browser that pressed the button (RFC 6749
# 10.12): a random value, kept in the ledger only as its sha256 next to the state.
BIND_COOKIE = "onboard_browser"
BIND_COOKIE_SECONDS = 7 * 24 * 3600
# Versori calls inside one request: the browser is waiting, so a few quick tries only
# (InitialiseOAuth2Connection: a new state each time, safe to try again), as BROWSER_RETRY
# (onboarding/batch/retry_policy.py) sets. Never CreateConnection: it is tried once.
CALL_DEADLINE_SECONDS = 15.0
# CreateConnection is tried once, within this; then the lookup, within its own: the browser
# waits at most their sum (and the ledger's writes).
CREATE_DEADLINE_SECONDS = 10.0
LOOKUP_DEADLINE_SECONDS = 8.0
# A claim younger than this may still have its CreateConnection in flight (in this process or
# another replica, SIGTERM's grace included): it is left alone; an older one is resolved.
CONNECTING_GRACE = timedelta(seconds=60)
# What `claimed_by` starts with once nothing is in flight for a claim any more.
AWAITING_LOOKUP = "lookup:"


def _branded(
    method: Callable[Concatenate[ConnectService, P], Page],
) -> Callable[Concatenate[ConnectService, P], Page]:
    """The request's pages say who is asking: the service's brand, or the profile's own once
    the request's profile is known (ConnectService._profile)."""

    def answer(self: ConnectService, /, *args: P.args, **kwargs: P.kwargs) -> Page:
        token = pages.use_brand(self.brand)
        try:
            return method(self, *args, **kwargs)
        finally:
            pages.forget_brand(token)

    answer.__name__, answer.__doc__ = method.__name__, method.__doc__
    return answer


@dataclass(frozen=True)
class CallbackAnswer:
    """What the provider sent the browser back with."""

    state: str
    code: str
    error: str


class ConnectService:
    """One per process; thread-safe (requests run on a thread pool). `client_for` gives the
    Versori client of an API (`versori_clients`, from the settings); `brand` is who the pages
    say is asking where no profile says otherwise (the settings' brand; none: unnamed)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        client_for: Callable[[str], VersoriClient],
        events: EventSender | None = None,
        mints_per_hour: int = 10,
        secure_cookies: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = utcnow,
        create_deadline: float = CREATE_DEADLINE_SECONDS,
        lookup_deadline: float = LOOKUP_DEADLINE_SECONDS,
        connecting_grace: timedelta = CONNECTING_GRACE,
        brand: Brand | None = None,
    ) -> None:
        self.ledger = ledger
        # Who the pages say is asking (ONBOARD_BRAND_*, read once); a profile's own wins.
        self.brand = brand or Brand.of()
        self._client_for = client_for
        self.events = events or EventSender()
        self.mints_per_hour = mints_per_hour
        self.secure_cookies = secure_cookies
        self._sleep = sleep
        self._clock = clock
        self.create_deadline = create_deadline
        self.lookup_deadline = lookup_deadline
        self.connecting_grace = connecting_grace
        self._profiles: dict[str, tuple[float, ConnectorProfile]] = {}
        self._profiles_lock = threading.Lock()
        # Which process claimed a state: what an operator reads next to a `connecting` row.
        self.process = f"{socket.gethostname()}:{os.getpid()}"

    # --- the link page ---------------------------------------------------------------------

    def _live_link(self, token: str) -> tuple[ConnectLink | None, Page | None]:
        """The link, or the page that refuses it. Unknown and revoked take the same path to
        the same page: one indexed read, no other work."""
        link = self.ledger.find_connect_link(token) if _plausible(token) else None
        refused = _refusal(link, self._clock())
        return (None, refused) if refused is not None else (link, None)

    @_branded
    def show_link(self, token: str) -> Page:
        """GET (or HEAD) /c/<token>: the page with its button. Counts a fetch, not an open:
        mail scanners fetch every link of a message. The page's own script reports a person
        (`note_seen`). Mints nothing. One statement: the link, its tenant's record and the
        fetch counted with them (ConnectLinks.view_link)."""
        if not _plausible(token):
            return pages.invalid_link()
        now = self._clock()
        view = self.ledger.view_link(token, now)
        refused = _refusal(view.link, now)
        if refused is not None or view.link is None:
            return refused or pages.invalid_link()
        link = view.link
        found = self._context(link, view.record, view.unfinished)
        if isinstance(found, Page):
            return found
        profile, record = found
        if not view.counted:  # a claim of the tenant's was resolved first (_settle_tenant)
            self.ledger.note_link_fetched(link, now)
        authorize = profile.render(tenant_of(record).values).authorize_url
        return pages.link_page(
            record.tenant_name,
            profile.display_name,
            link.csrf,
            pages.origin_of(authorize),
            access=profile.access,
        )

    def note_seen(self, token: str, csrf: str, *, cross_site: bool) -> Page:
        """POST /c/<token>/seen, sent by the link page's own script once it is shown: a
        person opened the link (status `opened`, an event). Same-origin, with the page's CSRF
        value; answers 204 whatever happened (nothing to show). One statement: the open
        counted and the status moved only for a live link and its own CSRF value
        (ConnectLinks.note_seen); the status only from a waiting one (never from connected,
        declined, failed)."""
        if cross_site or not _plausible(token):
            return pages.no_content()
        seen = self.ledger.note_seen(token, csrf, self._clock())
        if seen is not None and seen.opened:
            profile = self._profile(seen.profile_path, seen.connector_id)
            if profile is not None:
                self._event(seen, profile, Status.OPENED)
            log.info("tenant %s opened its link", seen.tenant_id)
        return pages.no_content()

    @_branded
    def press_button(
        self,
        token: str,
        csrf: str,
        *,
        cross_site: bool,
        browser: str | None = None,
        https: bool = False,
    ) -> Page:
        """POST /c/<token>: a new state from Versori, recorded and bound to this browser, and a
        303 to the provider. `browser`: the binding cookie the request carried, if any. Two
        statements: the link and its tenant read with the mint counted (press_link), and
        the new state recorded (record_minted_link)."""
        if not _plausible(token):
            return pages.invalid_link()
        now = self._clock()
        if cross_site:  # refused, but as a page that says what the link is
            link, refused = self._live_link(token)
            return refused or pages.forbidden_form()
        view = self.ledger.press_link(token, csrf, self.mints_per_hour, MINT_WINDOW, now)
        refused = _refusal(view.link, now)
        if refused is not None or view.link is None:
            return refused or pages.invalid_link()
        link = view.link
        if not _same(csrf, link.csrf):
            return pages.forbidden_form()
        found = self._context(link, view.record, view.unfinished)
        if isinstance(found, Page):
            return found
        profile, record = found
        # take_mint: the limit reached, or a claim of the tenant's resolved first. A mint
        # counts the press as an open too: a press is a person.
        if not view.counted and not self.ledger.take_mint(
            link, self.mints_per_hour, MINT_WINDOW, now
        ):
            return pages.too_many_tries(_minutes_left(link, now))
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
            if record.status in WAITING_STATUSES:
                self._event(record, profile, Status.OPENED)
            return self._mint_failed(record, err)
        created = self._clock()
        bound = browser if browser and _plausible(browser) else secrets.token_urlsafe(32)
        self.ledger.record_minted_link(
            tenant_id=record.tenant_id,
            connector_id=record.connector_id,
            url=checked.url,
            state=checked.state,
            created_at=created,
            expires_at=created + timedelta(hours=profile.link_ttl_hours),
            link_hash=link.token_hash,
            browser_hash=_digest(bound),
        )
        if record.status is not Status.OPENED:
            self._event(record, profile, Status.OPENED)
        log.info(
            "tenant %s: new state %s for %s", record.tenant_id, checked.masked_state, profile.name
        )
        secure = self.secure_cookies or https
        cookies = [self._retry_cookie(token, secure)]
        if bound != browser:
            cookies.append(_cookie(BIND_COOKIE, bound, BIND_COOKIE_SECONDS, secure))
        return pages.redirect(checked.url, tuple(cookies), kind="to_provider")

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

    @_branded
    def callback(
        self, answer: CallbackAnswer, retry_token: str | None, browser: str | None = None
    ) -> Page:
        """GET /callback: the provider's answer for one state. `retry_token`: the link this
        browser came from (its cookie); `browser`: its binding cookie. One statement reads
        the state, its tenant and their profile, and claims the state when nothing refuses
        it (ConnectStates.callback_view); one more records what Versori made."""
        if not answer.state or not (answer.code or answer.error):
            return pages.callback_refused("missing")
        now = self._clock()
        retry = retry_token if retry_token and _plausible(retry_token) else None
        view = self.ledger.callback_view(
            answer.state,
            at=now,
            browser=_digest(browser) if browser else None,
            retry_token=retry,
            claim_by=None if answer.error else self.process,
        )
        claimed = view.claimed
        if view.state is not None and not claimed:
            refused = self._refuse_bound(view.state, browser, retry_token)
            if refused is not None:
                return refused
        record, refusal = self._current_state(answer.state, view.record, now)
        if record is None:
            return self._unclaimed(answer, claimed, pages.callback_refused(refusal))
        path = view.retry_path or view.latest_path
        profile = self._profile(path, record.connector_id) if path else None
        name = profile.name if profile is not None else record.profile
        can_retry = view.retry_path is not None
        if answer.error:
            return self._declined(answer, profile, name, can_retry)
        if profile is None:
            return self._unclaimed(answer, claimed, pages.try_again_later())
        # A state the one statement did not claim: a batch's (no row yet), or one claimed or
        # revoked in between. claim_state decides, as before.
        if not claimed and not self.ledger.claim_state(
            answer.state,
            tenant_id=record.tenant_id,
            connector_id=record.connector_id,
            by=self.process,
            at=now,
        ):
            again = self.ledger.find_state(answer.state)
            if again is not None and again.link_revoked:
                return pages.link_withdrawn()
            return pages.callback_refused("used")
        digest = state_digest(answer.state)
        log.info(
            "tenant %s: connecting to %s (state %s)",
            record.tenant_id,
            name,
            mask_state(answer.state),
        )
        tenant = tenant_of(record)
        client = self._client_for(profile.api)
        try:
            if _in_place(record, profile):
                return self._reconnect(digest, record, profile, answer, can_retry)
            connection = client.create_connection(
                profile.organisation_id,
                profile.target_id,
                code=answer.code,
                state=answer.state,
                name=profile.connection_name_for(tenant.values),
                external_id=record.tenant_id,
                template_id=profile.connection_template_id,
                redirect_url=profile.redirect_url,
                deadline=self.create_deadline,
            )
        except OnboardingError as err:
            return self._create_failed(digest, record, profile, err, can_retry)
        return self._connected(digest, record, profile, connection.id)

    def _reconnect(
        self,
        digest: str,
        record: Record,
        profile: ConnectorProfile,
        answer: CallbackAnswer,
        can_retry: bool,
    ) -> Page:
        """A broken connection given the new credential in place (UpdateConnection on the id
        the ledger holds): never a second connection. Gone meanwhile: a new one, as for a
        disconnected tenant. A lost answer is settled by reading the connection back."""
        client = self._client_for(profile.api)
        assert record.connection_id is not None  # _in_place
        existing = client.get_connection(
            profile.organisation_id, record.connection_id, deadline=self.lookup_deadline
        )
        if existing is None:
            log.info(
                "tenant %s: connection %s is gone; making a new one",
                record.tenant_id,
                record.connection_id,
            )
            made = client.create_connection(
                profile.organisation_id,
                profile.target_id,
                code=answer.code,
                state=answer.state,
                name=profile.connection_name_for(tenant_of(record).values),
                external_id=record.tenant_id,
                template_id=profile.connection_template_id,
                redirect_url=profile.redirect_url,
                deadline=self.create_deadline,
            )
            return self._connected(digest, record, profile, made.id)
        log.info("tenant %s: reconnecting connection %s in place", record.tenant_id, existing.id)
        try:
            updated = client.update_connection(
                profile.organisation_id,
                existing.id,
                code=answer.code,
                state=answer.state,
                name=existing.name,
                base_url=existing.base_url or "",
                redirect_url=profile.redirect_url,
                deadline=self.create_deadline,
            )
        except OnboardingError as err:
            return self._create_failed(digest, record, profile, err, can_retry)
        return self._connected(digest, record, profile, updated.id)

    def _refuse_bound(
        self, bound: ConnectState, browser: str | None, retry_token: str | None
    ) -> Page | None:
        """The page that ends a callback for a state the button minted, or None to go on:
        withdrawn (its link revoked), another browser's, or claimed already (then what became
        of it: connected, being completed, or resolved now)."""
        if bound.link_revoked:
            log.info("tenant %s: callback refused, its link was revoked", bound.tenant_id)
            return pages.link_withdrawn()
        if bound.browser_hash is not None and not (
            browser and _same(_digest(browser), bound.browser_hash)
        ):
            log.warning(
                "tenant %s: callback refused, from a browser other than the one that pressed "
                "the button",
                bound.tenant_id,
            )
            return pages.wrong_browser()
        if bound.claimed_at is None:
            return None
        record = self.ledger.get(bound.tenant_id, bound.connector_id)
        if record is None:
            return pages.callback_refused("unknown")
        profile = self._profile_of_record(record, self._retry_link(retry_token, record))
        outcome: str | None = bound.outcome
        if bound.connecting:
            outcome = None
            if profile is not None and not self._in_flight(bound):
                outcome = self._resolve(bound, record, profile)
            if outcome is None:
                return pages.connecting_now()
        if outcome == StateOutcome.CONNECTED:
            return pages.connected(
                record.tenant_name,
                profile.display_name if profile is not None else readable(record.profile),
            )
        return pages.callback_refused("used")

    def _create_failed(
        self,
        digest: str,
        record: Record,
        profile: ConnectorProfile,
        err: OnboardingError,
        can_retry: bool,
    ) -> Page:
        """CreateConnection did not answer with a connection. A refusal of the code or body is
        final for this state; any answer that may hide a connection Versori made (a timeout, a
        dropped socket, a 5xx, a 409) is settled by asking Versori, never by trying the code
        again."""
        log.warning(
            "tenant %s: CreateConnection failed (%s); %s",
            record.tenant_id,
            err.code,
            "asking Versori whether it made the connection" if _unknown(err) else "not made",
        )
        message = str(err) if isinstance(err, APIError) else type(err).__name__
        if not _unknown(err):
            self.ledger.finish_state(
                digest, StateOutcome.FAILED, error=(f"create_{err.code}", message)
            )
            return pages.connection_failed(can_retry)
        looked, found = self._lookup(record, profile)
        if not looked:
            self.ledger.mark_awaiting_lookup(digest, AWAITING_LOOKUP + self.process)
            log.warning(
                "tenant %s: left connecting; resolved on its next request or by the sweep",
                record.tenant_id,
            )
            return pages.not_confirmed()
        if found is not None:
            return self._connected(digest, record, profile, found)
        self.ledger.finish_state(
            digest, StateOutcome.NOT_FOUND, error=(f"create_{err.code}", message)
        )
        log.info("tenant %s: Versori holds no connection; a new try may start", record.tenant_id)
        return pages.connection_failed(can_retry)

    def _connected(
        self, digest: str, record: Record, profile: ConnectorProfile, connection_id: str
    ) -> Page:
        """Versori holds the tenant's connection: recorded (its id in the log first, so that
        a ledger outage loses nothing), the event sent, the connected page."""
        log.info(
            "tenant %s connected to %s: connection %s",
            record.tenant_id,
            profile.name,
            connection_id,
        )
        try:
            updated = self.ledger.finish_state(
                digest, StateOutcome.CONNECTED, connection_id=connection_id, at=self._clock()
            )
        except Exception as err:  # the ledger is down: Versori's word stands, the sweep records it
            log.error(
                "tenant %s: connection %s made, but the ledger could not record it (%s); "
                "recorded on the tenant's next request or by the sweep",
                record.tenant_id,
                connection_id,
                type(err).__name__,
            )
            updated = None
        if updated is not None:
            self._event(updated, profile, Status.CONNECTED)
            self._activate_if_ready(updated, profile)
        if profile.success_url:
            return pages.redirect(profile.success_url, kind="to_success_url")
        return pages.connected(record.tenant_name, profile.display_name)

    # --- what an unfinished claim came to ------------------------------------------------------

    def _in_flight(self, state: ConnectState) -> bool:
        """A claim whose CreateConnection may still be running (here or in another replica)."""
        if state.claimed_by and state.claimed_by.startswith(AWAITING_LOOKUP):
            return False
        return (
            state.claimed_at is not None
            and state.claimed_at > self._clock() - self.connecting_grace
        )

    def _lookup(self, record: Record, profile: ConnectorProfile) -> tuple[bool, str | None]:
        """Versori's connection for the tenant: (asked, its id or None). (False, None) when
        Versori could not be asked."""
        client = self._client_for(profile.api)
        if _in_place(record, profile):
            in_place = self._lookup_in_place(client, record, profile)
            if in_place is not None:
                return in_place
        try:
            found = client.find_connection(
                profile.organisation_id,
                profile.target_id,
                external_id=record.tenant_id,
                name=profile.connection_name_for(tenant_of(record).values),
                template_id=profile.connection_template_id,
                deadline=self.lookup_deadline,
            )
        except OnboardingError as err:
            log.warning(
                "tenant %s: could not ask Versori for its connection (%s)",
                record.tenant_id,
                err.code,
            )
            return False, None
        return True, found.id if found is not None else None

    def _lookup_in_place(
        self, client: VersoriClient, record: Record, profile: ConnectorProfile
    ) -> tuple[bool, str | None] | None:
        """For a reconnect in place: whether the connection's credential works again (the
        update landed), by reading it back; None when the connection is gone (then a new one
        was being made: looked up as any other)."""
        assert record.connection_id is not None  # _in_place
        try:
            found = client.get_connection(
                profile.organisation_id, record.connection_id, deadline=self.lookup_deadline
            )
        except OnboardingError as err:
            log.warning(
                "tenant %s: could not read connection %s back (%s)",
                record.tenant_id,
                record.connection_id,
                err.code,
            )
            return False, None
        if found is None:
            return None
        errors, expires_at = found.credential_health()
        working = errors == [] and (expires_at is None or expires_at > self._clock())
        return True, found.id if working else None

    def _resolve(
        self, state: ConnectState, record: Record, profile: ConnectorProfile
    ) -> StateOutcome | None:
        """Settle an unfinished claim from Versori's word: what it came to, or None when
        Versori could not be asked (still unfinished)."""
        looked, found = self._lookup(record, profile)
        if not looked:
            return None
        if found is not None:
            log.info(
                "tenant %s: an unfinished connection resolved: connection %s",
                record.tenant_id,
                found,
            )
            updated = self.ledger.finish_state(
                state.state_hash, StateOutcome.CONNECTED, connection_id=found, at=self._clock()
            )
            if updated is not None:
                self._event(updated, profile, Status.CONNECTED)
            return StateOutcome.CONNECTED
        log.info(
            "tenant %s: an unfinished connection resolved: Versori holds none", record.tenant_id
        )
        self.ledger.finish_state(
            state.state_hash,
            StateOutcome.NOT_FOUND,
            error=("connect_lost", "the connection was not completed; open the link again"),
        )
        return StateOutcome.NOT_FOUND

    def _settle_tenant(self, record: Record, profile: ConnectorProfile) -> Page | None:
        """Before a tenant's link page or button: its unfinished claims resolved first, so a
        connection Versori made is never made twice. The page that ends the request (connected
        now, or one still in flight), or None."""
        waiting = self.ledger.connecting_of(record.tenant_id, record.connector_id)
        for state in waiting:
            if self._in_flight(state) or self._resolve(state, record, profile) is None:
                return pages.connecting_now()
        if waiting:
            now = self.ledger.get(record.tenant_id, record.connector_id)
            if now is not None and now.status in HELD_STATUSES:
                return pages.already_connected(record.tenant_name, profile.display_name)
        return None

    def sweep(self) -> int:
        """Resolve every claim left unfinished (by a crash, a SIGTERM past its grace, a ledger
        or Versori outage) from Versori's word: how many were finished. Run on start and every
        few minutes; safe in several replicas at once (a claim is finished once)."""
        done = 0
        for state in self.ledger.unfinished_states():
            if self._in_flight(state):
                continue
            record = self.ledger.get(state.tenant_id, state.connector_id)
            path = self.ledger.latest_profile_path(state.tenant_id, state.connector_id)
            profile = self._profile(path, state.connector_id) if path else None
            if record is None or profile is None:
                continue
            try:
                done += self._resolve(state, record, profile) is not None
            except Exception as err:  # one tenant's trouble never stops the sweep
                log.warning("sweep: tenant %s: %s", state.tenant_id, type(err).__name__)
        if done:
            log.info("sweep: %d unfinished connection(s) resolved", done)
        return done

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
        shown = profile.display_name if profile is not None else readable(name)
        return pages.declined(shown, can_retry)

    def _current_state(
        self, state: str, record: Record | None, now: datetime
    ) -> tuple[Record | None, str]:
        """`record`, the tenant holding `state` now, if unexpired and not connected; else
        why not."""
        if record is None:
            return None, ("superseded" if self.ledger.find_superseded(state) else "unknown")
        if record.status in HELD_STATUSES:
            return None, "used"
        if record.status is Status.EXPIRED or (
            record.expires_at is not None and record.expires_at <= now
        ):
            return None, "expired"
        return record, ""

    def _unclaimed(self, answer: CallbackAnswer, claimed: bool, page: Page) -> Page:
        """`page`, the callback's end before CreateConnection: a claim this request made is
        let go first (nothing was sent for it), so that the state stays usable."""
        if claimed:
            self.ledger.release_claim(answer.state, self.process)
        return page

    @_branded
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

    def _retry_cookie(self, token: str, secure: bool) -> str:
        return _cookie(RETRY_COOKIE, token, RETRY_COOKIE_SECONDS, secure)

    # --- shared ------------------------------------------------------------------------------

    def _context(
        self, link: ConnectLink, record: Record | None, unfinished: bool
    ) -> tuple[ConnectorProfile, Record] | Page:
        """The link's profile and its tenant's record (read with the link, and whether a
        claim of the tenant is unfinished); or the page that ends the request there (no
        record, the profile unreadable, the tenant connected already, a claim of its still
        in flight). A claim a crash left is resolved first, so that a connection Versori made
        is never made twice."""
        if record is None:
            return pages.invalid_link()
        profile = self._profile(link.profile_path, link.connector_id)
        if profile is None:
            return pages.try_again_later()
        if record.status in HELD_STATUSES:
            return pages.already_connected(record.tenant_name, profile.display_name)
        if unfinished:
            settled = self._settle_tenant(record, profile)
            if settled is not None:
                return settled
        return profile, record

    def _profile_of_record(
        self, record: Record, link: ConnectLink | None
    ) -> ConnectorProfile | None:
        """The profile of a callback's tenant: from the browser's link when it has one, else
        from any of the tenant's links (the one that minted the state)."""
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
                return self._branding(cached[1])
            profile = load_profile(path)
        except (OSError, OnboardingError) as err:
            log.error("cannot load the profile %s: %s", path, type(err).__name__)
            return None
        if profile.target_id != connector_id:
            log.error("the profile %s no longer names connector %s", path, connector_id)
            return None
        with self._profiles_lock:
            self._profiles[path] = (mtime, profile)
        return self._branding(profile)

    def _branding(self, profile: ConnectorProfile) -> ConnectorProfile:
        """The request's pages from here on show the profile's brand over the service's."""
        pages.use_brand(self.brand.with_override(profile.brand))
        return profile

    def _call(self, call: Callable[[VersoriClient], T], profile: ConnectorProfile) -> T:
        """A Versori call, tried again briefly on a transient failure (the browser waits), as
        BROWSER_RETRY says. Only for InitialiseOAuth2Connection: never CreateConnection."""
        client = self._client_for(profile.api)
        for n in range(1, BROWSER_RETRY.tries + 1):
            try:
                return call(client)
            except OnboardingError as err:
                wait = BROWSER_RETRY.wait_after(err, n + 1)
                if wait is None:
                    raise
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _activate_if_ready(self, record: Record, profile: ConnectorProfile) -> None:
        """With a profile naming `environment_id`: once the tenant is connected for every
        profile of that environment it holds a record of (a campaign: each system), activate
        it on the environment (ActivateUser; onboarding/connections/activation.py). Never
        fails the page: a refusal is noted on the records, and sync tries again."""
        if profile.environment_id is None or profile.api != constants.PLATFORM_V2:
            return
        try:
            rows = self.ledger.tenant_records(record.tenant_id)
            templates: dict[str, str] = {}
            for row in rows:
                other = profile
                if row.connector_id != profile.target_id:
                    path = self.ledger.latest_profile_path(row.tenant_id, row.connector_id)
                    found = self._profile(path, row.connector_id) if path else None
                    if found is None:
                        continue
                    other = found
                if other.environment_id == profile.environment_id:
                    templates[row.connector_id] = str(other.connection_template_id)
            wanted = wanted_of(record.tenant_id, rows, templates)
            if wanted is None or already_activated(rows, wanted):
                return
            client = self._client_for(profile.api)
            done = activate(
                client,
                self.ledger,
                profile.organisation_id,
                str(profile.environment_id),
                wanted,
                now=self._clock(),
            )
        except Exception as err:  # the page stands: sync activates it later
            log.warning(
                "tenant %s: could not activate it (%s); sync tries again",
                record.tenant_id,
                type(err).__name__,
            )
            return
        if done.activation_id is None:
            code = done.refused[0] if done.refused else "refused"
            log.warning(
                "tenant %s: activation refused (%s); sync tries again", record.tenant_id, code
            )
            return
        log.info("tenant %s activated: activation %s", record.tenant_id, done.activation_id)
        for connector_id in done.connectors:
            now = self.ledger.get(record.tenant_id, connector_id)
            if now is not None:
                self._event(now, profile, Status.ACTIVATED)

    def _event(
        self,
        record: Record | ConnectLink | SeenLink,
        profile: ConnectorProfile,
        status: Status,
        error_code: str = "",
    ) -> None:
        connection_id = getattr(record, "connection_id", None)
        change = StatusChange(
            record.tenant_id,
            record.connector_id,
            profile.name,
            status.value,
            error_code,
            connection_id if status in HELD_STATUSES else None,
        )
        try:
            self.events(tenant_event(change))
        except Exception as err:  # an event never fails a request
            log.warning("could not queue a tenant event: %s", type(err).__name__)


def versori_clients(settings: VersoriSettings) -> Callable[[str], VersoriClient]:
    """A Versori client per API, made when first needed, from VERSORI_* (`settings`, as
    `onboard run` reads them), its calls within what a browser waits."""
    clients: dict[str, VersoriClient] = {}
    lock = threading.Lock()

    def client_for(api: str) -> VersoriClient:
        with lock:
            if api not in clients:
                clients[api] = VersoriClient.from_settings(
                    settings,
                    api=api,  # type: ignore[arg-type]  # a profile's checked api
                    deadline=CALL_DEADLINE_SECONDS,
                    max_connections=constants.DEFAULT_CONCURRENCY,
                )
            return clients[api]

    return client_for


def _in_place(record: Record, profile: ConnectorProfile) -> bool:
    """A broken connection's reconnect: updated in place (Platform API v2 only)."""
    return (
        record.reconnect_of == Status.BROKEN.value
        and record.connection_id is not None
        and profile.api == constants.PLATFORM_V2
    )


def _cookie(name: str, value: str, seconds: int, secure: bool) -> str:
    """Sent on the provider's top-level redirect back (SameSite=Lax), never to scripts;
    `Secure` whenever the service is reached over https (its base URL, or this request)."""
    return f"{name}={value}; Path=/; Max-Age={seconds}; HttpOnly; SameSite=Lax" + (
        "; Secure" if secure else ""
    )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _unknown(err: OnboardingError) -> bool:
    """An answer to CreateConnection that may hide a connection Versori made: no answer (a
    timeout, a dropped socket), a 5xx, or a 409 (it holds one for this end user already)."""
    if isinstance(err, APITimeoutError | APIConnectionError | ServerError):
        return True
    return isinstance(err, ConflictError)


def _plausible(token: str) -> bool:
    # token_urlsafe(32) is 43 characters of [A-Za-z0-9_-]; anything else is not one of ours.
    return 20 <= len(token) <= 128 and all(c.isalnum() or c in "-_" for c in token)


def _refusal(link: ConnectLink | None, now: datetime) -> Page | None:
    """The page that refuses a link (unknown and revoked: the same one), or None."""
    if link is None or link.revoked_at is not None:
        return pages.invalid_link()
    if link.expires_at <= now:
        return pages.expired_link()
    return None


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


def is_secure_base(base_url: str | None) -> bool:
    return base_url is None or urlsplit(base_url).scheme == "https"
