"""Runs, the delivery ledger and suppressions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("campaign_id", sa.String(80), nullable=False),
        sa.Column("occurrence", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("scheduled_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("late_s", sa.Float),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("in_flight_recovered", sa.Integer, nullable=False),
        sa.Column("note", sa.Text),
        sa.UniqueConstraint("campaign_id", "occurrence", name="uq_runs_occurrence"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("run_id", Id, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("list_name", sa.String(80), nullable=False),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", TS),
        sa.Column("claimed_by", sa.String(120)),
        sa.Column("claimed_at", TS),
        sa.Column("smtp_code", sa.Integer),
        sa.Column("smtp_text", sa.String(500)),
        sa.Column("message_id", sa.String(200)),
        sa.Column("sent_at", TS),
        sa.Column("updated_at", TS),
        sa.UniqueConstraint("run_id", "email_key", name="uq_deliveries_recipient"),
    )
    op.create_index("ix_deliveries_claim", "deliveries",
                    ["run_id", "status", "next_attempt_at", "id"])
    op.create_table(
        "suppressions",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("list_name", sa.String(80), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("source", sa.String(120), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("email_key", "list_name", name="uq_suppressions_key"),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    op.drop_index("ix_deliveries_claim", "deliveries")
    op.drop_table("deliveries")
    op.drop_table("runs")
