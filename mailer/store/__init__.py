"""The store: SQLAlchemy 2 tables, named queries and Alembic migrations."""

from .db import Store, open_store
from .tables import FAILED_ONCE, MISSED_ONCE, ONCE, DeliveryStatus, RunStatus

__all__ = ["FAILED_ONCE", "MISSED_ONCE", "ONCE", "DeliveryStatus", "RunStatus", "Store",
           "open_store"]
