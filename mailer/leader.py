"""Leader election for `mailer run`: one scheduler per database.

A PostgreSQL session advisory lock on a dedicated connection, or an exclusive `flock` on
`<var>/scheduler.lock` for SQLite. The follower polls and takes over (scheduler.serve).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from .config import Settings
from .files import private_dir
from .logs import log_event
from .store import Store

LOCK_KEYS = (0x494D4147, 1)  # pg_try_advisory_lock(int, int): "IMAG", scheduler


class Leadership(Protocol):
    def try_acquire(self) -> bool: ...
    def held(self) -> bool: ...
    def release(self) -> None: ...


class FileLeader:
    """SQLite: an exclusive flock; the kernel drops it when the process dies, even on kill -9."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class PostgresLeader:
    """PostgreSQL: a session advisory lock on a connection held for as long as we lead.

    The server releases it when that session ends, so a killed leader frees it at once.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is not None:
            return self.held()
        try:
            conn = self.engine.connect()
        except DBAPIError as exc:  # the database is down or restarting: stand by, try again
            log_event("leader-acquire-failed", level=logging.WARNING, error=type(exc).__name__)
            return False
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                                    {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]}).scalar())
            conn.commit()  # the lock is session-level; do not sit idle in a transaction
        except DBAPIError as exc:
            log_event("leader-acquire-failed", level=logging.WARNING, error=type(exc).__name__)
            with contextlib.suppress(Exception):
                conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        if self._conn is None:
            return False
        try:
            count = self._conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND classid = :a AND objid = :b AND objsubid = 2"),
                {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]}).scalar()
            self._conn.commit()
        except Exception as exc:  # the session is gone, and the lock with it
            log_event("leader-check-failed", level=logging.WARNING, error=type(exc).__name__)
            self._drop()
            return False
        if not count:
            self._drop()
        return bool(count)

    def release(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(Exception):
            self._conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"),
                               {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]})
            self._conn.commit()
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def leader_for(store: Store, settings: Settings) -> Leadership:
    if store.is_postgres:
        return PostgresLeader(store.engine)
    return FileLeader(settings.var_dir / "scheduler.lock")
