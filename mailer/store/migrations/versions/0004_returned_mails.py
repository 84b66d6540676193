"""Returned mail read from the bounce mailbox (bounces, complaints, mailto unsubscribes).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "returned_mails",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("mail_key", sa.String(64), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("matched_by", sa.String(16), nullable=False),
        sa.Column("run_id", Id, sa.ForeignKey("runs.id", ondelete="SET NULL")),
        sa.Column("delivery_id", Id, sa.ForeignKey("deliveries.id", ondelete="SET NULL")),
        sa.Column("list_name", sa.String(80), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.UniqueConstraint("mail_key", name="uq_returned_mails_key"),
    )
    op.create_index("ix_returned_mails_delivery", "returned_mails", ["delivery_id", "kind"])
    op.create_index("ix_returned_mails_run", "returned_mails", ["run_id", "kind"])
    # Matching a returned mail by the Message-ID it quotes (the ledger keeps each row's).
    op.create_index("ix_deliveries_message_id", "deliveries", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_message_id", "deliveries")
    op.drop_index("ix_returned_mails_run", "returned_mails")
    op.drop_index("ix_returned_mails_delivery", "returned_mails")
    op.drop_table("returned_mails")
    # Rows marked `bounced` go back to `sent`, the state the older code knows them by.
    op.execute("UPDATE deliveries SET status = 'sent' WHERE status = 'bounced'")
