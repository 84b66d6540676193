"""The store's tables (SQLAlchemy Core). Changes go through an Alembic migration."""

from __future__ import annotations

import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    MISSED = "missed"
    FAILED = "failed"  # a scheduled fire that could not start its run; the note says why


# The occurrence of a one-off campaign's run (`mailer send` and the scheduler share it), and
# the two the scheduler records instead when a one-off was missed or its fire failed before
# its run existed (both leave "once" free for `mailer send`).
ONCE = "once"
MISSED_ONCE = "once-missed"
FAILED_ONCE = "once-failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    BOUNCED = "bounced"  # sent, then returned as a hard bounce (mailbox.py); final


class ReturnedKind(enum.StrEnum):
    """What a mail in the bounce mailbox is (bounces.py)."""

    HARD_BOUNCE = "hard_bounce"  # RFC 3464 Action: failed, status 5.x.x; a permanent text bounce
    SOFT_BOUNCE = "soft_bounce"  # Action: delayed, or a 4.x.x status; a temporary text bounce
    COMPLAINT = "complaint"  # RFC 5965 ARF feedback report (abuse, fraud)
    UNSUBSCRIBE = "unsubscribe"  # to the List-Unsubscribe mailto: address, with our token
    AUTO_REPLY = "auto_reply"  # out of office and the like (RFC 3834): left alone
    REPLY = "reply"  # anything else, a person writing back: left alone
    REPORT = "report"  # another report (not-spam, auth-failure, …): left alone


runs = Table(
    "runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("campaign_id", String(80), nullable=False),
    Column("occurrence", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("trigger", String(16), nullable=False),  # send | scheduler
    Column("scheduled_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("late_s", Float),
    Column("total", Integer, nullable=False, default=0),
    Column("in_flight_recovered", Integer, nullable=False, default=0),
    Column("note", Text),
    UniqueConstraint("campaign_id", "occurrence", name="uq_runs_occurrence"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", Id, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("email", String(320), nullable=False),
    Column("email_key", String(320), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("language", String(16), nullable=False, default=""),
    Column("list_name", String(80), nullable=False, default=""),
    Column("fields", JSON, nullable=False, default=dict),
    Column("status", String(10), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("claimed_by", String(120)),
    Column("claimed_at", DateTime(timezone=True)),
    Column("sent_by", String(120)),  # the worker (host:pid:tag) that made the last attempt
    Column("smtp_code", Integer),
    Column("smtp_text", String(500)),
    Column("message_id", String(200)),
    Column("sent_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    UniqueConstraint("run_id", "email_key", name="uq_deliveries_recipient"),
    Index("ix_deliveries_claim", "run_id", "status", "next_attempt_at", "id"),
    Index("ix_deliveries_message_id", "message_id"),  # migration 0004: matching returned mail
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email_key", String(320), nullable=False),  # address, or "sha256:…" once erased
    Column("list_name", String(80), nullable=False, default="*"),  # "*" = every list
    Column("reason", String(32), nullable=False),
    Column("source", String(120), nullable=False, default=""),
    Column("detail", String(500), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("email_key", "list_name", name="uq_suppressions_key"),
)

# One row per mail read from the bounce mailbox: makes reading it again change nothing
# (`mail_key`: sha256 of its Message-ID, or of its bytes when it has none) and is what
# `mailer bounces list` and `mailer report` show. No address: the delivery row holds it, and
# `forget` re-keys that one.
returned_mails = Table(
    "returned_mails",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("mail_key", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source", String(16), nullable=False, default=""),  # maildir | mbox | imap
    Column("kind", String(16), nullable=False),  # ReturnedKind
    Column("matched_by", String(16), nullable=False, default=""),  # verp | message-id | …
    Column("run_id", Id, ForeignKey("runs.id", ondelete="SET NULL")),
    Column("delivery_id", Id, ForeignKey("deliveries.id", ondelete="SET NULL")),
    Column("list_name", String(80), nullable=False, default=""),
    Column("action", String(32), nullable=False, default=""),  # what was done
    Column("detail", String(500), nullable=False, default=""),  # the evidence, no address
    UniqueConstraint("mail_key", name="uq_returned_mails_key"),
    Index("ix_returned_mails_delivery", "delivery_id", "kind"),
    Index("ix_returned_mails_run", "run_id", "kind"),
)
