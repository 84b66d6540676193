"""The store: SQLAlchemy 2 tables, named queries and Alembic migrations."""

from .db import Store, open_store
from .tables import DeliveryStatus, RunStatus

__all__ = ["DeliveryStatus", "RunStatus", "Store", "open_store"]
