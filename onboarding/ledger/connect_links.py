"""Durable connect links and the OAuth callback's writes (onboard connect-server).

A connect link is `https://<connect base>/c/<token>`: one per email, per (tenant, connector),
valid until its own expiry, a revoke, or the tenant's connection. The token is a random
value of 256 bits handed out once (`issue_connect_link`) and stored only as its sha256, like
a state. Behind it, the tenant's OAuth state is minted on demand (the link's button), so an
emailed link never goes stale the way a raw authorize URL does.

Every write here is one conditional statement, or one short transaction under the tenant's
lock (PostgreSQL) or the database's write lock (SQLite), so that several replicas of the
service on one ledger never mint past a link's rate limit, never move a state to the history
twice, and connect a tenant once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    text,
    true,
)

from onboarding.clock import utcnow
from onboarding.ledger.database import Database, Repository
from onboarding.ledger.engine import lock_key, lock_tenants, reconnecting
from onboarding.ledger.link_sql import among
from onboarding.ledger.queries import HELD, count_where
from onboarding.ledger.records import Record, aware, aware_values, utc
from onboarding.ledger.schema import (
    WAITING_STATUSES,
    Status,
    metadata,
    records,
    state_digest,
    superseded_links,
    tenant_row,
)

# Bytes of randomness in a link's token: 256 bits, URL-safe base64 (43 characters).
TOKEN_BYTES = 32

connect_links = Table(
    "onboarding_connect_links",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    # The profile file as the run that issued the link saw it: what the service renders the
    # initialise request from when the button is pressed.
    Column("profile_path", Text, nullable=False),
    # Tied to this link: the page's form carries it, the POST must give it back.
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("opened_first_at", DateTime(timezone=True)),
    Column("opened_last_at", DateTime(timezone=True)),
    Column("opened_count", Integer, nullable=False, default=0, server_default=text("0")),
    # Every GET of the link's page (a mail scanner's too): opened_* counts only a person's
    # evidence (the page's own script, or its button).
    Column("fetched_count", Integer, nullable=False, default=0, server_default=text("0")),
    Column("fetched_first_at", DateTime(timezone=True)),
    Column("fetched_last_at", DateTime(timezone=True)),
    # The mint rate limit: a fixed window that starts with its first mint.
    Column("mint_window_at", DateTime(timezone=True)),
    Column("mint_count", Integer, nullable=False, default=0, server_default=text("0")),
    Column("minted_at", DateTime(timezone=True)),
    Index("ix_onboarding_connect_links_tenant", "tenant_id", "connector_id"),
)

# Each state a callback came back with, claimed before CreateConnection is called, so that a
# replayed or doubled callback never calls Versori twice with the same code.
callback_states = Table(
    "onboarding_callback_states",
    metadata,
    Column("state_hash", String(64), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)


# Each state the connect service handed a browser or claimed for a callback, and what became
# of it (see connect_states.py, its reads and writes).
connect_states = Table(
    "onboarding_connect_states",
    metadata,
    Column("state_hash", String(64), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    # The connect link whose button minted it (its token_hash); None for a batch's state.
    Column("link_hash", String(64)),
    # sha256 of the browser's binding cookie: only that browser's callback may use the state.
    Column("browser_hash", String(64)),
    Column("minted_at", DateTime(timezone=True), nullable=False),
    # Set by the callback before CreateConnection: `connecting` until finished_at.
    Column("claimed_at", DateTime(timezone=True)),
    Column("claimed_by", String(200)),
    Column("finished_at", DateTime(timezone=True)),
    Column("outcome", String(20)),
    Column("connection_id", String(200)),
    Index("ix_onboarding_connect_states_tenant", "tenant_id", "connector_id"),
)


def token_digest(token: str) -> str:
    """How a token is looked up: its sha256, hex (as a state is; 256 random bits need no
    salt or slow hash)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ConnectLink:
    token_hash: str
    tenant_id: str
    connector_id: str
    profile_path: str
    csrf: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    opened_first_at: datetime | None
    opened_last_at: datetime | None
    opened_count: int
    mint_window_at: datetime | None
    mint_count: int
    minted_at: datetime | None
    fetched_count: int = 0
    fetched_first_at: datetime | None = None
    fetched_last_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> ConnectLink:
        return cls(**aware_values(row))


@dataclass(frozen=True)
class LinkOpens:
    """What a tenant's connect links (for one connector) say about the admin: opened how many
    times, first and last. What a reminder reads to say "you opened the link but did not
    finish"."""

    count: int
    first_at: datetime | None
    last_at: datetime | None


@dataclass(frozen=True)
class Funnel:
    """One connector's tenants, as far as each got: linked (a link was made), delivered
    (sent or stored), opened (a person opened a connect link: its page's script ran, or its
    button was pressed), started (the button was pressed: off to the provider), connected,
    activated (live on the profile's environment); and declined / failed / broken /
    disconnected (their status now). Each stage counts the tenants that reached it, whatever
    came later. `fetched`, apart: tenants whose link page was only fetched (a mail
    scanner's GET, or a person whose browser ran no script), never opened."""

    linked: int
    delivered: int
    opened: int
    started: int
    connected: int
    declined: int
    failed: int
    fetched: int = 0
    activated: int = 0
    broken: int = 0
    disconnected: int = 0

    STAGES = ("linked", "delivered", "opened", "started", "connected", "activated")

    def share(self, stage: str) -> float:
        """A stage's count as a share of linked (0 when nothing was linked)."""
        return getattr(self, stage) / self.linked if self.linked else 0.0

    def as_dict(self) -> dict[str, int]:
        return {
            "linked": self.linked,
            "delivered": self.delivered,
            "opened": self.opened,
            "started": self.started,
            "connected": self.connected,
            "declined": self.declined,
            "failed": self.failed,
            "fetched": self.fetched,
            "activated": self.activated,
            "broken": self.broken,
            "disconnected": self.disconnected,
        }


@dataclass(frozen=True)
class LinkView:
    """What a link's page or its button reads, in one statement: the link (None: no such
    token), its tenant's record, whether the tenant has a claim not finished, and whether
    the request's own write landed with it (`counted`: the page's fetch, or the button's
    mint and open; see ConnectLinks.view_link and press_link)."""

    link: ConnectLink | None
    record: Record | None = None
    unfinished: bool = False
    counted: bool = False


@dataclass(frozen=True)
class SeenLink:
    """A person's open counted on a link (its page's beacon): whose link, and whether the
    tenant's status moved to `opened` with it."""

    tenant_id: str
    connector_id: str
    profile_path: str
    opened: bool


class ConnectLinks(Repository):
    """Connect links: their reads and writes (one part of the ledger)."""

    @cached_property
    def _click_sql(self) -> LinkStatements:
        return LinkStatements(self.db)

    @reconnecting
    def view_link(self, token: str, at: datetime) -> LinkView:
        """GET of a link's page: the link, its tenant's record and whether a claim of the
        tenant is unfinished, in one statement; with it the fetch is counted (fetched_*)
        when the page can be shown: the link live at `at`, the tenant not connected, no
        claim of its unfinished (else `counted` is False and nothing is written). The
        profile file is the service's to read after: one it cannot read (a 503 page) still
        counts the fetch, which did happen."""
        return self._link_view(self._click_sql.fetch, {"p_token_hash": token_digest(token)}, at)

    @reconnecting
    def press_link(
        self, token: str, csrf: str, limit: int, window: timedelta, at: datetime
    ) -> LinkView:
        """POST of a link's button: what view_link reads and, in the same statement, one
        mint counted against the link's limit (`limit` in a fixed `window`, as take_mint)
        and the press as an open, when the button may mint: the link live at `at`, `csrf`
        its own, the tenant not connected, no claim of its unfinished, the limit not
        reached. `counted` says whether it was; else nothing is written. As take_mint after
        a failed Versori call, a press whose profile file the service then cannot read (a
        503 page) stays counted: the press happened."""
        when = utc(at)
        values = {
            "p_token_hash": token_digest(token),
            "p_csrf": csrf,
            "p_limit": limit,
            "p_window_start": when - window,
        }
        return self._link_view(self._click_sql.mint, values, when)

    def _link_view(self, write: Any, values: dict[str, Any], at: datetime) -> LinkView:
        sql = self._click_sql
        params = {**values, "p_now": utc(at)}
        mapping: Mapping[Any, Any] | None
        if sql.postgres:
            with self.db.single.connect() as conn:
                mapping = sql.read_after[write].fetch_one(conn, params)
            counted = bool(mapping["counted"]) if mapping is not None else False
        else:
            with self.engine.begin() as conn:  # the write first: SQLite's write lock at once
                counted = bool(conn.execute(write, params).rowcount)
                row = conn.execute(sql.read, params).first()
            mapping = row._mapping if row is not None else None
        if mapping is None:
            return LinkView(None)
        link = ConnectLink(**prefixed(mapping, "l_"))
        held = prefixed(mapping, "r_")
        record = Record.from_values(held) if held["tenant_id"] is not None else None
        return LinkView(link, record, bool(mapping["unfinished"]), counted)

    @reconnecting
    def note_seen(self, token: str, csrf: str, at: datetime) -> SeenLink | None:
        """The link's page's beacon: a person opened it. One statement on PostgreSQL: the
        link's open counted, when it is live at `at` and `csrf` is its own, and the tenant's
        status `opened` when it was waiting for the admin (as note_link_opened). None, and
        nothing written, when the link is not live or the CSRF value is not its own."""
        sql = self._click_sql
        params = {
            "p_token_hash": token_digest(token),
            "p_csrf": csrf,
            "p_now": utc(at),
            "p_updated_at": utcnow(),
        }
        if sql.postgres:
            with self.db.single.connect() as conn:
                seen = sql.seen.fetch_one(conn, params)
            if seen is None:
                return None
            return SeenLink(
                seen["tenant_id"], seen["connector_id"], seen["profile_path"], bool(seen["moved"])
            )
        with self.engine.begin() as conn:
            row = conn.execute(sql.open, params).first()
            if row is None:
                return None
            moved = conn.execute(
                sql.move,
                {**params, "p_tenant_id": row.tenant_id, "p_connector_id": row.connector_id},
            )
        return SeenLink(row.tenant_id, row.connector_id, row.profile_path, bool(moved.rowcount))

    @reconnecting
    def issue_connect_link(
        self,
        tenant_id: str,
        connector_id: str,
        profile_path: str,
        expires_at: datetime,
        *,
        now: datetime | None = None,
    ) -> str:
        """A new connect link for (tenant, connector): its token, in plain text, returned this
        once (only its hash is kept). Older links of the tenant stay valid until their own
        expiry, a revoke, or the tenant's connection."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self.engine.begin() as conn:
            conn.execute(
                connect_links.insert().values(
                    token_hash=token_digest(token),
                    tenant_id=tenant_id,
                    connector_id=connector_id,
                    profile_path=profile_path,
                    csrf=secrets.token_urlsafe(24),
                    created_at=utc(now or utcnow()),
                    expires_at=utc(expires_at),
                    opened_count=0,
                    fetched_count=0,
                    mint_count=0,
                )
            )
        return token

    @reconnecting
    def find_connect_link(self, token: str) -> ConnectLink | None:
        query = select(connect_links).where(connect_links.c.token_hash == token_digest(token))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return ConnectLink.from_row(row) if row is not None else None

    @reconnecting
    def note_link_fetched(self, link: ConnectLink, at: datetime | None = None) -> None:
        """The link's page was fetched (a GET: a person's browser or a mail scanner, which
        fetch every link of a message within seconds of its delivery): counted apart, the
        tenant's status untouched."""
        when = utc(at or utcnow())
        with self.engine.begin() as conn:
            conn.execute(
                connect_links.update()
                .where(connect_links.c.token_hash == link.token_hash)
                .values(**_counted("fetched", when))
            )

    @reconnecting
    def note_link_opened(self, link: ConnectLink, at: datetime | None = None) -> bool:
        """A person opened the link (its page's own script reported it was shown, or its
        button was pressed): its open counts, and the tenant's status `opened` when it was
        waiting for the admin (link made, sent, delivered, reminded). True when that status
        changed (an `opened` event is due)."""
        when = utc(at or utcnow())
        waiting = [s.value for s in WAITING_STATUSES]
        with self.engine.begin() as conn:
            conn.execute(
                connect_links.update()
                .where(connect_links.c.token_hash == link.token_hash)
                .values(**_counted("opened", when))
            )
            done = conn.execute(
                records.update()
                .where(
                    *tenant_row(link.tenant_id, link.connector_id), records.c.status.in_(waiting)
                )
                .values(status=Status.OPENED.value, updated_at=utcnow())
            )
        return bool(done.rowcount)

    @reconnecting
    def take_mint(
        self, link: ConnectLink, limit: int, window: timedelta, at: datetime | None = None
    ) -> bool:
        """Count one mint against the link's limit (`limit` in a fixed `window` that starts
        with its first mint), and the press as an open; False, and nothing counted, past it.
        One conditional UPDATE: two replicas pressing the same link's button at once never
        mint past the limit."""
        when = utc(at or utcnow())
        fresh = or_(
            connect_links.c.mint_window_at.is_(None),
            connect_links.c.mint_window_at <= when - window,
        )
        done: Any
        with self.engine.begin() as conn:
            done = conn.execute(
                connect_links.update()
                .where(
                    connect_links.c.token_hash == link.token_hash,
                    or_(fresh, connect_links.c.mint_count < limit),
                )
                .values(
                    mint_count=case((fresh, 1), else_=connect_links.c.mint_count + 1),
                    mint_window_at=case((fresh, when), else_=connect_links.c.mint_window_at),
                    minted_at=when,
                    # A press is a person: it counts as an open (a browser that ran no script).
                    **_counted("opened", when),
                )
            )
        return bool(done.rowcount)

    @reconnecting
    def record_minted_link(
        self,
        *,
        tenant_id: str,
        connector_id: str,
        url: str,
        state: str,
        created_at: datetime,
        expires_at: datetime,
        link_hash: str | None = None,
        browser_hash: str | None = None,
    ) -> bool:
        """The state a connect link's button just made: it becomes the tenant's current one
        (status `opened`), and the state it replaces goes to the history, as a re-issue does.
        Unlike record_link, what the tenant was sent (delivered_at, channel, reminders) stays.
        With `link_hash`, in the same transaction, the state is bound to the link that minted
        it and the browser that pressed it (`browser_hash`, see connect_states.py).
        False, and the new state put straight in the history, when the tenant is connected."""
        created, updated = utc(created_at), utcnow()
        digest = state_digest(state)
        minted = self._click_sql.minted
        if minted is not None and link_hash is not None:
            values = {
                "p_lock_key": lock_key(tenant_id, connector_id),
                "p_tenant_id": tenant_id,
                "p_connector_id": connector_id,
                "p_url": url,
                "p_state": state,
                "p_state_hash": digest,
                "p_created_at": created,
                "p_expires_at": utc(expires_at),
                "p_updated_at": updated,
                "p_link_hash": link_hash,
                "p_browser_hash": browser_hash,
            }
            with self.db.single.connect() as conn:
                row = minted.fetch_one(conn, values)
            return row is not None and bool(row["written"])
        supersede, _ = self.db.link_sql
        with self.engine.begin() as conn:
            lock_tenants(conn, [(tenant_id, connector_id)])
            conn.execute(
                supersede,
                {
                    "tenant_id": tenant_id,
                    "connector_id": connector_id,
                    "state": state,
                    "state_hash": digest,
                    "created_at": created,
                    "updated_at": updated,
                },
            )
            done = conn.execute(
                records.update()
                .where(*tenant_row(tenant_id, connector_id), records.c.status.not_in(HELD))
                .values(
                    status=Status.OPENED.value,
                    url=url,
                    state=state,
                    state_hash=digest,
                    created_at=created,
                    expires_at=utc(expires_at),
                    attempts=records.c.attempts + 1,
                    error_code=None,
                    error_message=None,
                    updated_at=updated,
                )
            )
            if link_hash is not None:
                conn.execute(
                    self.db.insert(connect_states)
                    .values(
                        state_hash=digest,
                        tenant_id=tenant_id,
                        connector_id=connector_id,
                        link_hash=link_hash,
                        browser_hash=browser_hash,
                        minted_at=created,
                    )
                    .on_conflict_do_nothing()
                )
        return bool(done.rowcount)

    @reconnecting
    def note_connect_error(
        self, tenant_id: str, connector_id: str, code: str, message: str
    ) -> None:
        """The button pressed, but no new state could be made (Versori failing, a URL failing
        the checks): kept as the row's last error; a tenant waiting for the admin becomes
        `opened` (a person pressed it), any other status stays (the link still works)."""
        waiting = [s.value for s in WAITING_STATUSES]
        with self.engine.begin() as conn:
            conn.execute(
                records.update()
                .where(*tenant_row(tenant_id, connector_id), records.c.status.not_in(HELD))
                .values(
                    status=case(
                        (records.c.status.in_(waiting), Status.OPENED.value),
                        else_=records.c.status,
                    ),
                    error_code=code[:100],
                    error_message=message,
                    updated_at=utcnow(),
                )
            )

    @reconnecting
    def revoke_connect_links(
        self, tenant_id: str, connector_id: str | None = None, at: datetime | None = None
    ) -> int:
        """Revoke every live connect link of the tenant (for one connector, or all): how many."""
        where = [connect_links.c.tenant_id == tenant_id, connect_links.c.revoked_at.is_(None)]
        if connector_id is not None:
            where.append(connect_links.c.connector_id == connector_id)
        with self.engine.begin() as conn:
            done = conn.execute(
                connect_links.update().where(*where).values(revoked_at=utc(at or utcnow()))
            )
        return int(done.rowcount or 0)

    @reconnecting
    def record_declined(
        self, state: str, error_code: str, at: datetime | None = None
    ) -> Record | None:
        """The provider sent the admin back with an error (access_denied: they declined) for
        the tenant's current, unexpired state: status `declined`, the provider's code kept.
        None, and nothing written, for any other state (unknown, superseded, expired, used)."""
        digest = state_digest(state)
        when = utc(at or utcnow())
        with self.engine.begin() as conn:
            done = conn.execute(
                records.update()
                .where(
                    records.c.state_hash == digest,
                    records.c.status.not_in([*HELD, Status.EXPIRED.value]),
                    records.c.expires_at > when,
                )
                .values(
                    status=Status.DECLINED.value,
                    error_code=error_code[:100],
                    error_message="the provider answered the authorization with an error",
                    updated_at=utcnow(),
                )
            )
            if not done.rowcount:
                return None
            row = conn.execute(select(records).where(records.c.state_hash == digest)).first()
        return Record.from_row(row) if row is not None else None

    @reconnecting
    def latest_profile_path(self, tenant_id: str, connector_id: str) -> str | None:
        """The profile of the tenant's most recently used (or issued) connect link."""
        query = (
            select(connect_links.c.profile_path)
            .where(
                connect_links.c.tenant_id == tenant_id,
                connect_links.c.connector_id == connector_id,
            )
            .order_by(func.coalesce(connect_links.c.minted_at, connect_links.c.created_at).desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            path = conn.execute(query).scalar_one_or_none()
        return str(path) if path is not None else None

    @reconnecting
    def connect_opens(
        self, connector_id: str, tenant_ids: list[str] | None = None
    ) -> dict[str, LinkOpens]:
        """For the reminder text: each tenant (of these) whose connect links were opened, with
        how often and when, summed over its links for this connector."""
        query = (
            select(
                connect_links.c.tenant_id,
                func.sum(connect_links.c.opened_count),
                func.min(connect_links.c.opened_first_at),
                func.max(connect_links.c.opened_last_at),
            )
            .where(connect_links.c.connector_id == connector_id, connect_links.c.opened_count > 0)
            .group_by(connect_links.c.tenant_id)
        )
        if tenant_ids is not None:
            query = query.where(connect_links.c.tenant_id.in_(tenant_ids))
        with self.engine.connect() as conn:
            return {
                tenant: LinkOpens(int(count), aware(first), aware(last))
                for tenant, count, first, last in conn.execute(query)
            }

    @reconnecting
    def funnel(self, connector_ids: list[str] | None = None) -> dict[str, Funnel]:
        """Per connector: how many tenants were linked, delivered, opened, connected; and how
        many are declined or failed now. One statement over the records (and, for opened,
        whether any of the tenant's connect links was opened)."""

        def of_tenant(table: Any) -> tuple[Any, Any]:
            return (
                table.c.tenant_id == records.c.tenant_id,
                table.c.connector_id == records.c.connector_id,
            )

        opened_link = exists().where(*of_tenant(connect_links), connect_links.c.opened_count > 0)
        fetched_link = exists().where(*of_tenant(connect_links), connect_links.c.fetched_count > 0)
        started_state = exists().where(
            *of_tenant(connect_states),
            or_(connect_states.c.link_hash.is_not(None), connect_states.c.claimed_at.is_not(None)),
        )
        connected = or_(records.c.status.in_(HELD), records.c.connected_at.is_not(None))
        activated = or_(
            records.c.status == Status.ACTIVATED.value, records.c.activated_at.is_not(None)
        )
        linked = or_(records.c.url.is_not(None), records.c.state_hash.is_not(None), connected)
        delivered = or_(
            records.c.delivered_at.is_not(None), records.c.last_sent_at.is_not(None), connected
        )
        started = or_(
            started_state, and_(or_(connected, records.c.status == Status.DECLINED.value), linked)
        )
        opened = or_(opened_link, started)
        query = select(
            records.c.connector_id,
            count_where(linked),
            count_where(delivered),
            count_where(opened),
            count_where(started),
            count_where(connected),
            count_where(records.c.status == Status.DECLINED.value),
            count_where(records.c.status == Status.FAILED.value),
            count_where(and_(fetched_link, ~opened)),
            count_where(activated),
            count_where(records.c.status == Status.BROKEN.value),
            count_where(records.c.status == Status.DISCONNECTED.value),
        ).group_by(records.c.connector_id)
        if connector_ids:
            query = query.where(records.c.connector_id.in_(list(connector_ids)))
        with self.engine.connect() as conn:
            return {
                cid: Funnel(*(int(n) for n in numbers))
                for cid, *numbers in conn.execute(query.order_by(records.c.connector_id))
            }


def _counted(what: str, when: datetime | ColumnElement[Any]) -> dict[str, Any]:
    """A link's `<what>_count` one more, `<what>_last_at` now, `<what>_first_at` kept (or now):
    the values of an open or a fetch."""
    columns = connect_links.c
    return {
        f"{what}_count": columns[f"{what}_count"] + 1,
        f"{what}_last_at": when,
        f"{what}_first_at": func.coalesce(columns[f"{what}_first_at"], when),
    }


STAMP = DateTime(timezone=True)


def unfinished_claim(tenant_id: Any, connector_id: Any) -> Any:
    """Whether the tenant has a claim not finished (a callback in flight, or one a crash
    left)."""
    states = connect_states.alias("s")
    return exists().where(
        states.c.tenant_id == tenant_id,
        states.c.connector_id == connector_id,
        states.c.claimed_at.is_not(None),
        states.c.finished_at.is_(None),
    )


class DriverStatement:
    """A hot statement of the connect service, compiled once for the ledger's dialect and sent
    on the driver's own cursor (`fetch_one`): SQLAlchemy's execution layer (its cache
    lookup, execution context and result set, psycopg's description of every column) cost
    about twice what the statement itself costs the driver, on each of a click's six
    statements. What SQLAlchemy does for any statement stays: the same pooled connection
    (in autocommit, from `Database.single`), its statement events, and its error handling
    (`Connection._cursor_execute`: a DBAPIError with hidden parameters, a lost connection
    invalidated for `reconnecting`, the `handle_error` hooks).

    `usable` is False where the compiled statement needs what only SQLAlchemy's execution
    does (bind or result processing, parameters expanded per call): it is then run as
    before, through `Connection.execute`."""

    def __init__(self, statement: Any, dialect: Any) -> None:
        self.statement = statement
        self.dialect = dialect

    @cached_property
    def compiled(self) -> _Compiled:
        """Compiled on first use (PostgreSQL's statements are never compiled for SQLite)."""
        dialect = self.dialect
        compiled = self.statement.compile(dialect=dialect)
        binds = compiled.binds
        processed = any(
            column.type._cached_result_processor(dialect, None) is not None
            for column in compiled._result_columns
        )
        usable = not (
            processed
            or compiled._bind_processors
            or compiled.escaped_bind_names
            or compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.positional
        )
        return _Compiled(
            str(compiled),
            # Constants SQLAlchemy bound itself (`literal(...)`, a `1` in a CASE): their
            # values, sent with every call's own.
            {
                name: value
                for name, value in compiled.construct_params(_check=False).items()
                if not binds[name].required
            },
            tuple(column.keyname for column in compiled._result_columns),
            usable,
        )

    def fetch_one(self, conn: Connection, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The statement's first row, by column (None: no row)."""
        sql, constants, keys, usable = self.compiled
        if not usable:
            row = conn.execute(self.statement, params).first()
            return dict(row._mapping) if row is not None else None
        values = {**constants, **params}
        cursor = conn.connection.cursor()
        try:
            conn._cursor_execute(cursor, sql, values)
            try:
                found = cursor.fetchone()
            except Exception as err:  # as SQLAlchemy's own fetch: wrapped, never raw
                conn._handle_dbapi_exception(err, sql, values, cursor, None)
        finally:
            cursor.close()
        return dict(zip(keys, found, strict=True)) if found is not None else None


class _Compiled(NamedTuple):
    sql: str
    constants: dict[str, Any]
    keys: tuple[str, ...]
    usable: bool


class LinkStatements:
    """The connect service's statements for a link's page, its beacon and its button, built
    once per ledger (as link_sql's): each request binds its values to them, so none is built,
    hashed or compiled again. On PostgreSQL each request's reads and writes are one statement
    (a writable CTE); on SQLite, whose CTEs cannot write, the write then the read, in one
    transaction."""

    def __init__(self, db: Database) -> None:
        self.postgres = db.postgres
        link, record = connect_links.c, records.c
        now = bindparam("p_now", type_=STAMP)
        token = bindparam("p_token_hash", type_=String)
        csrf = bindparam("p_csrf", type_=String)
        same_tenant = and_(
            record.tenant_id == link.tenant_id, record.connector_id == link.connector_id
        )
        unfinished = unfinished_claim(link.tenant_id, link.connector_id)
        live = and_(link.revoked_at.is_(None), link.expires_at > now)
        # What the page and the button need before they count anything: a live link of a
        # tenant with a record, not connected, with no claim unfinished.
        ready = and_(
            live, exists().where(same_tenant, record.status.not_in(among(HELD))), ~unfinished
        )
        # The read, its tables under short names: a statement psycopg caches (at most 4 KiB).
        la, ra = connect_links.alias("l"), records.alias("r")
        self.read: Select[Any] = (
            select(
                *(c.label(f"l_{c.name}") for c in la.c),
                *(c.label(f"r_{c.name}") for c in ra.c),
                unfinished_claim(la.c.tenant_id, la.c.connector_id).label("unfinished"),
            )
            .select_from(
                la.outerjoin(
                    ra,
                    and_(ra.c.tenant_id == la.c.tenant_id, ra.c.connector_id == la.c.connector_id),
                )
            )
            .where(la.c.token_hash == token)
        )
        self.fetch = (
            connect_links.update()
            .where(link.token_hash == token, ready)
            .values(**_counted("fetched", now))
        )
        window_start = bindparam("p_window_start", type_=STAMP)
        fresh = or_(link.mint_window_at.is_(None), link.mint_window_at <= window_start)
        self.mint = (
            connect_links.update()
            .where(
                link.token_hash == token,
                link.csrf == csrf,
                ready,
                or_(fresh, link.mint_count < bindparam("p_limit", type_=Integer)),
            )
            .values(
                mint_count=case((fresh, 1), else_=link.mint_count + 1),
                mint_window_at=case((fresh, now), else_=link.mint_window_at),
                minted_at=now,
                # A press is a person: it counts as an open (a browser that ran no script).
                **_counted("opened", now),
            )
        )
        # PostgreSQL: the read with the write, in one statement (the read sees the row as it
        # was before the write).
        dialect = db.engine.dialect
        self.read_after: dict[Any, DriverStatement] = {}
        for write in (self.fetch, self.mint):
            done = write.returning(link.token_hash).cte(name="counted")
            self.read_after[write] = DriverStatement(
                self.read.add_columns(select(done.c.token_hash).exists().label("counted")),
                dialect,
            )
        # The beacon: the open counted, and the tenant `opened` if it was waiting.
        self.open = (
            connect_links.update()
            .where(link.token_hash == token, link.csrf == csrf, live)
            .values(**_counted("opened", now))
            .returning(link.tenant_id, link.connector_id, link.profile_path)
        )
        to_opened = {
            "status": literal(Status.OPENED.value, String),
            "updated_at": bindparam("p_updated_at", type_=STAMP),
        }
        waiting = record.status.in_(among(s.value for s in WAITING_STATUSES))
        self.move = (
            records.update()
            .where(
                record.tenant_id == bindparam("p_tenant_id", type_=String),
                record.connector_id == bindparam("p_connector_id", type_=String),
                waiting,
            )
            .values(**to_opened)
        )
        opened = self.open.cte(name="opened")
        moved = (
            records.update()
            .where(
                record.tenant_id == opened.c.tenant_id,
                record.connector_id == opened.c.connector_id,
                waiting,
            )
            .values(**to_opened)
            .returning(record.tenant_id)
            .cte(name="moved")
        )
        self.seen = DriverStatement(
            select(
                opened.c.tenant_id,
                opened.c.connector_id,
                opened.c.profile_path,
                select(moved.c.tenant_id).exists().label("moved"),
            ),
            dialect,
        )
        self.minted: DriverStatement | None = (
            DriverStatement(_minted_statement(db), dialect) if db.postgres else None
        )


def _minted_statement(db: Database) -> Select[bool, bool, bool]:
    """record_minted_link on PostgreSQL, in one statement: the tenant's advisory lock (the
    one record_link, reset and connect_state take), its row locked and read as it is now
    (FOR UPDATE reads the newest version, whatever the statement's snapshot), its current
    state to the history (the new one, for a connected tenant), the row given the new
    state, and the state bound to its link and browser. Its value: whether the row was
    written."""
    record = records.c
    state = bindparam("p_state", type_=String)
    state_hash = bindparam("p_state_hash", type_=String)
    created = bindparam("p_created_at", type_=STAMP)
    updated = bindparam("p_updated_at", type_=STAMP)
    locked = (
        select(func.pg_advisory_xact_lock(bindparam("p_lock_key", type_=BigInteger)).label("k"))
        .cte(name="locked")
        .prefix_with("MATERIALIZED")
    )
    current = (
        select(
            record.tenant_id,
            record.connector_id,
            record.status,
            record.state,
            record.state_hash,
            record.created_at,
        )
        .select_from(records.join(locked, true()))
        .where(
            record.tenant_id == bindparam("p_tenant_id", type_=String),
            record.connector_id == bindparam("p_connector_id", type_=String),
        )
        .with_for_update(of=records)
        .cte(name="current")
    )
    connected = current.c.status.in_(among(HELD))
    leaving = (
        db.insert(superseded_links)
        .from_select(
            ["state", "state_hash", "tenant_id", "connector_id", "created_at", "superseded_at"],
            select(
                case((connected, state), else_=current.c.state),
                case((connected, state_hash), else_=current.c.state_hash),
                current.c.tenant_id,
                current.c.connector_id,
                case((connected, created), else_=current.c.created_at),
                updated,
            ).where(current.c.state.is_not(None), current.c.state != state),
        )
        .on_conflict_do_nothing()
        .returning(superseded_links.c.state)
        .cte(name="leaving")
    )
    written = (
        records.update()
        .where(
            record.tenant_id == current.c.tenant_id,
            record.connector_id == current.c.connector_id,
            record.status.not_in(among(HELD)),
        )
        .values(
            status=literal(Status.OPENED.value, String),
            url=bindparam("p_url", type_=Text),
            state=state,
            state_hash=state_hash,
            created_at=created,
            expires_at=bindparam("p_expires_at", type_=STAMP),
            attempts=record.attempts + 1,
            error_code=null(),
            error_message=null(),
            updated_at=updated,
        )
        .returning(record.tenant_id)
        .cte(name="written")
    )
    bound = (
        db.insert(connect_states)
        .values(
            state_hash=state_hash,
            tenant_id=bindparam("p_tenant_id", type_=String),
            connector_id=bindparam("p_connector_id", type_=String),
            link_hash=bindparam("p_link_hash", type_=String),
            browser_hash=bindparam("p_browser_hash", type_=String),
            minted_at=created,
        )
        .on_conflict_do_nothing()
        .returning(connect_states.c.state_hash)
        .cte(name="bound")
    )
    return select(
        select(written.c.tenant_id).exists().label("written"),
        select(leaving.c.state).exists().label("left"),
        select(bound.c.state_hash).exists().label("bound"),
    )


def prefixed(mapping: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    """The values of a row's columns labelled `<prefix><column>`, by column, datetimes
    aware."""
    size = len(prefix)
    return {
        key[size:]: aware(value) if isinstance(value, datetime) else value
        for key, value in mapping.items()
        if key.startswith(prefix)
    }


def funnel_lines(funnel: Funnel) -> str:
    """A funnel in one line: `linked 25 → delivered 23 (92%) → opened 3 (12%) → started 2 (8%)
    → connected 1 (4%) → activated 1 (4%); declined 0, failed 2; broken 0, disconnected 1;
    fetched by a scanner only 5` (broken and disconnected only when there are some)."""
    parts = [f"linked {funnel.linked}"]
    for stage in Funnel.STAGES[1:]:
        parts.append(f"{stage} {getattr(funnel, stage)} ({funnel.share(stage):.0%})")
    line = " → ".join(parts) + f"; declined {funnel.declined}, failed {funnel.failed}"
    if funnel.broken or funnel.disconnected:
        line += f"; broken {funnel.broken}, disconnected {funnel.disconnected}"
    if funnel.fetched:
        line += f"; fetched, not opened {funnel.fetched} (a mail scanner, or no script)"
    return line
