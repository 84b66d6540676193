"""Subscribers, list memberships, the consent log and confirmation nonces.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "subscribers",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("email_key", name="uq_subscribers_key"),
    )
    op.create_table(
        "memberships",
        sa.Column("subscriber_id", Id, sa.ForeignKey("subscribers.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("list_name", sa.String(80), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("proof", sa.String(16), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_memberships_list", "memberships", ["list_name", "status", "subscriber_id"])
    op.create_table(
        "consent_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("list_name", sa.String(80), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("source", sa.String(120), nullable=False),
        sa.Column("form_version", sa.String(40), nullable=False),
        sa.Column("form_text", sa.Text, nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(300), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
    )
    op.create_index("ix_consent_events_key", "consent_events", ["email_key", "id"])
    op.create_table(
        "confirm_nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("lists", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("used_at", TS),
    )
    op.create_index("ix_confirm_nonces_key", "confirm_nonces", ["email_key", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_confirm_nonces_key", "confirm_nonces")
    op.drop_table("confirm_nonces")
    op.drop_index("ix_consent_events_key", "consent_events")
    op.drop_table("consent_events")
    op.drop_index("ix_memberships_list", "memberships")
    op.drop_table("memberships")
    op.drop_table("subscribers")
