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
