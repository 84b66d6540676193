"""Alembic environment: runs on the connection the store hands over (never its own URL)."""

from typing import Any

from alembic import context

from mailer.store import ops_tables, subscriber_tables  # noqa: F401  (register their tables)
from mailer.store.tables import metadata

# APScheduler creates and owns its job table; autogenerate must not try to drop it.
FOREIGN_TABLES = {"scheduler_jobs"}


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
                   ) -> bool:
    return not (type_ == "table" and name in FOREIGN_TABLES)


connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  include_object=include_object)
with context.begin_transaction():
    context.run_migrations()
