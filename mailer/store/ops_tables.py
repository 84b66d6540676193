"""Tables for running the mailer (SQLAlchemy Core); created by migration 0003.

`heartbeats`: the last sign of life of each long-running role (`mailer run` writes
"scheduler" while it leads), read by `/metrics` in `mailer serve` — possibly on another machine,
hence the database and not a file. Host and pid only: no personal data.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, String, Table

from .tables import metadata

heartbeats = Table(
    "heartbeats",
    metadata,
    Column("name", String(40), primary_key=True),  # the role: "scheduler"
    Column("host", String(120), nullable=False, default=""),
    Column("pid", Integer, nullable=False, default=0),
    Column("beat_at", Float, nullable=False),  # Unix time (seconds), as Prometheus wants it
)

# The relay's rate limits as token buckets shared by every process that sends through this
# database (mailer/quota.py): a provider's quota is per account, not per process. One row per
# bucket; `tokens` may go negative - that is the debt the callers are sleeping off.
send_quota = Table(
    "send_quota",
    metadata,
    Column("name", String(40), primary_key=True),  # "second" or "hour"
    Column("tokens", Float, nullable=False),
    Column("stamp", Float, nullable=False),  # Unix time of the last refill
)
