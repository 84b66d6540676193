"""Tables of subscribers and consent (SQLAlchemy Core); created by migration 0002.

They share `metadata` with the ledger tables so Alembic sees one schema.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from .tables import Id, metadata


class MemberStatus(enum.StrEnum):
    PENDING = "pending"  # asked to join (or imported without proof), not confirmed yet
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


class ConsentEvent(enum.StrEnum):
    SUBSCRIBED = "subscribed"  # the form was sent (first half of the double opt-in)
    CONFIRMED = "confirmed"  # the link in the confirmation mail was opened
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    ERASED = "erased"
    IMPORTED = "imported"
    PREFERENCES = "preferences"  # language or list choice changed on the preferences page


subscribers = Table(
    "subscribers",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email", String(320), nullable=False),
    Column("email_key", String(320), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("language", String(16), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("email_key", name="uq_subscribers_key"),
)

memberships = Table(
    "memberships",
    metadata,
    Column("subscriber_id", Id, ForeignKey("subscribers.id", ondelete="CASCADE"),
           primary_key=True),
    Column("list_name", String(80), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("proof", String(16), nullable=False, default="web"),  # web | import | unconfirmed
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_memberships_list", "list_name", "status", "subscriber_id"),
)

# Append-only proof of consent (DSG-EKD §§ 6, 11 as GDPR Art. 7(1); BGH I ZR 164/09): who, when,
# from which form text, from which IP, when confirmed. On erasure the key becomes "sha256:…" and
# the IP and user agent are blanked; the events themselves stay as proof of what happened.
consent_events = Table(
    "consent_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email_key", String(320), nullable=False),
    Column("event", String(16), nullable=False),
    Column("list_name", String(80), nullable=False, default=""),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("source", String(120), nullable=False, default=""),  # web | import:… | cli | one-click
    Column("form_version", String(40), nullable=False, default=""),
    Column("form_text", Text, nullable=False, default=""),
    Column("ip", String(64), nullable=False, default=""),
    Column("user_agent", String(300), nullable=False, default=""),
    Column("detail", String(500), nullable=False, default=""),
    Index("ix_consent_events_key", "email_key", "id"),
)

# One row per confirmation mail: the nonce makes each confirmation link single use, and the
# rows of the last day bound how many confirmation mails one address can be sent.
confirm_nonces = Table(
    "confirm_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("email_key", String(320), nullable=False),
    Column("lists", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    Index("ix_confirm_nonces_key", "email_key", "created_at"),
)
