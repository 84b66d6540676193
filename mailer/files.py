"""Private files under var/: the key, the database, the outbox are the operator's alone."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: it holds addresses, mail and the key."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path, *, own_parent: bool = False) -> Path:
    """Create `path` empty if missing, 0600 either way (SQLite gives its -wal/-shm files the
    database file's mode, so they follow). Its folder is made 0700 when this creates it, or
    when it is the mailer's own (`own_parent`, var/); a folder the administrator chose (/srv,
    a home directory, /tmp) keeps its mode."""
    if own_parent or not path.parent.exists():
        private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path
