"""sync, activation and reconnect

What `onboard sync` reads back from Versori, per tenant record: the end user's Versori id, the
tenant's activation on the profile's environment and when it was made, why the tenant is asked
to connect again (`broken`, `disconnected`), and when sync last read it. Statuses `activated`,
`broken` and `disconnected` fit the status column as it is.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, DateTime, String

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RECORDS = "onboarding_records"


def upgrade() -> None:
    for column in (
        Column("end_user_id", String(200)),
        Column("activation_id", String(200)),
        Column("activated_at", DateTime(timezone=True)),
        Column("reconnect_of", String(20)),
        Column("checked_at", DateTime(timezone=True)),
    ):
        op.add_column(RECORDS, column)


def downgrade() -> None:
    raise NotImplementedError("the ledger's schema is never downgraded: restore a backup")
