"""Opening the store: engine, SQLite pragmas, automatic migrations."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import ArgumentError, OperationalError

from ..errors import ConfigError
from ..files import private_file

MIGRATIONS = Path(__file__).parent / "migrations"
_lock = threading.Lock()  # one migration at a time in this process (threads share engines)
MIGRATION_LOCK = (0x494D4147, 2)  # pg_advisory_xact_lock(int, int): "IMAG", migrations


# Worker ids of the dispatchers running in this process: their ledger claims are never taken
# over by another dispatcher of the process (dispatch.py). Process-wide on purpose, not per
# Store: a second Store on the same database in this process (two fires, a fire beside a
# resume) must see them alive too, or it would send their rows again. Ids are unique.
RUNNING_DISPATCHERS: set[str] = set()


class Store:
    """The database behind ledger, suppressions and subscribers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.workers = RUNNING_DISPATCHERS

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # WAL: readers never block the writer; NORMAL is durable across process crashes in WAL
    # mode (only an OS crash can lose the last commits).
    _wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _wal(cur: Any, *, patience_s: float = 30.0) -> None:
    """Switch a new database file to WAL. Processes opening it at the same moment each try; the
    switch needs the file to themselves, and SQLite refuses it at once, without waiting, while
    another holds a lock (seen with four processes starting together). So: try again."""
    import sqlite3

    deadline = time.monotonic() + patience_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def nowait_engine(engine: Engine) -> Engine | None:
    """For a SQLite file: one more connection to it that never waits for another writer's
    lock (busy_timeout 0), for writes short enough to run on the event loop's own thread; a
    write that finds the file locked fails at once (`is_busy`) and goes the usual way, off the
    loop. Its commits never checkpoint the WAL either (its user calls `checkpoint` in a thread).
    None for PostgreSQL and in-memory databases."""
    url = engine.url.render_as_string(hide_password=False)
    if sqlite_file(url) is None:
        return None
    nowait = create_engine(url, pool_size=1, max_overflow=0)
    event.listen(nowait, "connect", _nowait_pragmas)
    return nowait


def _nowait_pragmas(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    # The commit that takes the WAL past 1,000 pages copies them into the database file and
    # syncs both: 5-40 ms in which the event loop, and every SMTP session on it, would stand.
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


def checkpoint(engine: Engine) -> None:
    """Copy the WAL's committed pages into the SQLite file (PASSIVE: waits for no reader or
    writer), so the WAL is written from its start again; blocking, for a worker thread."""
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def is_busy(exc: OperationalError) -> bool:
    """Did SQLite refuse because another connection holds the lock (SQLITE_BUSY / LOCKED)?"""
    return getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF in (5, 6)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL and in-memory databases."""
    if not url.startswith("sqlite") or "///" not in url:  # "sqlite://" is in memory
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def make_engine(url: str, *, var_dir: Path | None = None) -> Engine:
    """`var_dir`: the project's own folder; a SQLite file in it makes it private too."""
    try:
        if url.startswith("sqlite"):
            path = sqlite_file(url)
            if path is not None:
                own = var_dir is not None and path.parent.resolve() == var_dir.resolve()
                private_file(path, own_parent=own)
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


VERSION_TABLE = "alembic_version"  # alembic's default name, which env.py keeps


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


# The newest migration in migrations/versions. Kept here rather than asked of alembic: reading
# the scripts costs every command ~90 ms. tests/test_store.py checks it against alembic's head.
HEAD_REVISION = "0005"


def at_head(engine: Engine) -> bool:
    """Is this database's schema the newest? One query on alembic's version table."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return False
        return set(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()) \
            == {HEAD_REVISION}


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade to `revision`; on PostgreSQL, processes starting at once migrate one by one."""
    from alembic import command

    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"),
                         {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@contextlib.contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """One migration at a time: threads of this process, and every process on this machine
    for a SQLite file (an flock beside it). PostgreSQL adds its advisory lock in migrate()."""
    with _lock:
        path = sqlite_file(url)
        if path is None:
            yield
            return
        fd = os.open(path.with_name(path.name + ".migrate-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or we die
            yield
        finally:
            os.close(fd)


def open_store(url: str, *, upgrade: bool = True, var_dir: Path | None = None) -> Store:
    """Open the database and bring its schema up to date (`var_dir`: see make_engine).

    Whether it is up to date is asked of the database itself (alembic's version table), not
    remembered per process: a database dropped and created again, or migrated by another
    process, is judged by what it holds.
    """
    engine = make_engine(url, var_dir=var_dir)
    try:
        if upgrade:
            if not at_head(engine):
                with migration_lock(url):
                    if not at_head(engine):  # another process may have done it meanwhile
                        migrate(engine)
        else:
            inspect(engine).get_table_names()
    except OperationalError as exc:
        raise ConfigError(
            f"cannot open the database {_redact(url)}: {' '.join(str(exc.orig).split())} "
            "(check database_url / MAILER_DATABASE_URL)"
        ) from None
    return Store(engine)
