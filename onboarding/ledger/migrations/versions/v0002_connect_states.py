"""connect states and fetched links

Each OAuth state the connect service hands a browser (onboarding_connect_states), and each
connect link's page fetches, counted apart from its opens (a mail scanner fetches every link
of a message): the tables of onboarding/ledger/connect_states.py and connect_links.py.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, DateTime, Integer, String, inspect, text

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATES = "onboarding_connect_states"
LINKS = "onboarding_connect_links"


def upgrade() -> None:
    # Commit 4f696e6 added these before the ledger was versioned: its code created the table
    # on an unversioned ledger, and made connect links with the new columns on a new one (it
    # did not add them to an existing one). Whatever of it is there already is kept.
    if not inspect(op.get_bind()).has_table(STATES):
        op.create_table(
            STATES,
            Column("state_hash", String(64), primary_key=True),
            Column("tenant_id", String(128), nullable=False),
            Column("connector_id", String(26), nullable=False),
            Column("link_hash", String(64)),
            Column("browser_hash", String(64)),
            Column("minted_at", DateTime(timezone=True), nullable=False),
            Column("claimed_at", DateTime(timezone=True)),
            Column("claimed_by", String(200)),
            Column("finished_at", DateTime(timezone=True)),
            Column("outcome", String(20)),
            Column("connection_id", String(200)),
        )
    indexes = {i["name"] for i in inspect(op.get_bind()).get_indexes(STATES)}
    if "ix_onboarding_connect_states_tenant" not in indexes:
        op.create_index(
            "ix_onboarding_connect_states_tenant", STATES, ["tenant_id", "connector_id"]
        )
    columns = {c["name"] for c in inspect(op.get_bind()).get_columns(LINKS)}
    for column in (
        Column("fetched_count", Integer, nullable=False, server_default=text("0")),
        Column("fetched_first_at", DateTime(timezone=True)),
        Column("fetched_last_at", DateTime(timezone=True)),
    ):
        if column.name not in columns:
            op.add_column(LINKS, column)


def downgrade() -> None:
    raise NotImplementedError("the ledger's schema is never downgraded: restore a backup")
