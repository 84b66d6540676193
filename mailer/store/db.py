"""Opening the store: engine, SQLite pragmas, automatic migrations."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import ArgumentError, OperationalError

from ..errors import ConfigError
from ..files import private_file

MIGRATIONS = Path(__file__).parent / "migrations"
_migrated: set[str] = set()
_lock = threading.Lock()


class Store:
    """The database behind ledger, suppressions and subscribers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Worker ids of the dispatchers of this process running on this store: their ledger
        # claims are never taken over by another dispatcher of the process (dispatch.py).
        self.workers: set[str] = set()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; NORMAL is durable across process crashes in WAL
    # mode (only an OS crash can lose the last commits).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                private_file(Path(path))
            # A pool keeps connections open: a new SQLite connection per ledger write costs its
            # pragmas plus a WAL checkpoint on close (~1.7 ms against ~0.1 ms for the commit).
            engine = create_engine(url, pool_size=8, max_overflow=8)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"database_url '{_redact(url)}' is not usable: {exc}") from None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://…@{rest.rsplit('@', 1)[1]}"
    return url


def migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_store(url: str, *, upgrade: bool = True) -> Store:
    """Open the database and bring its schema up to date (once per process and URL)."""
    engine = make_engine(url)
    try:
        if upgrade:
            with _lock:
                if url not in _migrated:
                    migrate(engine)
                    _migrated.add(url)
        else:
            inspect(engine).get_table_names()
    except OperationalError as exc:
        raise ConfigError(
            f"cannot open the database {_redact(url)}: {str(exc.orig).strip()} "
            "(check database_url / MAILER_DATABASE_URL)"
        ) from None
    return Store(engine)
