"""baseline: the ledger as it was when it was first versioned

A new ledger gets these tables. A ledger written before the ledger was versioned (its tables
there, no version table) is completed in place, as the unversioned code did on every start:
missing tables created, missing columns and indexes added (to every table), and the state
hashes filled in for rows written without them. Its rows are kept.

The tables are spelled out here, frozen as they were at this revision: the live ones (schema.py
and the other ledger modules) move on with later revisions.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from onboarding.ledger.migrations.steps import create_or_complete, hash_old_states

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

tables = MetaData()

records = Table(
    "onboarding_records",
    tables,
    Column("tenant_id", String(128), primary_key=True),
    Column("connector_id", String(26), primary_key=True),
    Column("profile", String(200), nullable=False),
    Column("tenant_name", Text, nullable=False),
    Column("admin_email", String(320), nullable=False),
    Column("status", String(20), nullable=False),
    Column("url", Text),
    Column("state", String(256)),
    Column("created_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    Column("connected_at", DateTime(timezone=True)),
    Column("delivery_channel", String(20)),
    Column("attempts", Integer, nullable=False),
    Column("error_code", String(100)),
    Column("error_message", Text),
    Column("run_id", String(64)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("tenant_fields", JSON),
    Column("message_id", String(200)),
    Column("last_sent_at", DateTime(timezone=True)),
    Column("reminders", Integer, nullable=False, server_default=text("0")),
    Column("connection_id", String(200)),
    Column("state_hash", String(64), index=True),
)

superseded_links = Table(
    "onboarding_superseded_links",
    tables,
    Column("state", String(256), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("superseded_at", DateTime(timezone=True), nullable=False),
    Column("state_hash", String(64), index=True),
)

Table(
    "onboarding_batch_chunks",
    tables,
    Column("batch_id", String(64), primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("flow_run_id", String(64)),
    Column("summary", JSON, nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
)

Table(
    "onboarding_claims",
    tables,
    Column("tenant_id", String(128), primary_key=True),
    Column("connector_id", String(26), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)

Table(
    "onboarding_run_leases",
    tables,
    Column("run_id", String(64), primary_key=True),
    Column("alive_until", DateTime(timezone=True), nullable=False),
)

Table(
    "onboarding_paces",
    tables,
    Column("name", String(200), primary_key=True),
    Column("next_at", Float, nullable=False),
)

Table(
    "onboarding_connect_links",
    tables,
    Column("token_hash", String(64), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    Column("profile_path", Text, nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("opened_first_at", DateTime(timezone=True)),
    Column("opened_last_at", DateTime(timezone=True)),
    Column("opened_count", Integer, nullable=False, server_default=text("0")),
    Column("mint_window_at", DateTime(timezone=True)),
    Column("mint_count", Integer, nullable=False, server_default=text("0")),
    Column("minted_at", DateTime(timezone=True)),
    Index("ix_onboarding_connect_links_tenant", "tenant_id", "connector_id"),
)

Table(
    "onboarding_callback_states",
    tables,
    Column("state_hash", String(64), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("connector_id", String(26), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)


def upgrade() -> None:
    conn = op.get_bind()
    create_or_complete(conn, tables)
    hash_old_states(conn, records, superseded_links)


def downgrade() -> None:
    raise NotImplementedError("the ledger's schema is never downgraded: restore a backup")
