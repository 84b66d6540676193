"""Secrets: no weak signing key, a key file made race-free, var/ and the database private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailer.config import load_settings
from mailer.errors import ConfigError
from tests.conftest import Project


def without_env_key(project: Project) -> dict[str, str]:
    return {k: v for k, v in project.env.items() if k != "MAILER_SECRET_KEY"}


@pytest.mark.parametrize("key", ["short", "x" * 64, "0123456789abcdef0123456789abcde"])
def test_weak_environment_key_is_refused(project: Project, key: str) -> None:
    with pytest.raises(ConfigError, match="MAILER_SECRET_KEY .*links could be forged"):
        load_settings(project.config, env={**project.env, "MAILER_SECRET_KEY": key})


@pytest.mark.parametrize("content", ["", "\n", "abc", "a" * 40])
def test_empty_or_weak_key_file_is_refused(project: Project, content: str) -> None:
    settings = load_settings(project.config, env=without_env_key(project))
    settings.var_dir.mkdir(mode=0o700)
    key = settings.var_dir / "secret.key"
    key.write_text(content)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="secret.key: the signing key .*could be forged"):
        settings.secret()


def test_key_file_readable_by_others_is_refused(project: Project) -> None:
    settings = load_settings(project.config, env=without_env_key(project))
    first = settings.secret()
    assert len(first) >= 32 and settings.secret() == first
    key = settings.var_dir / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert settings.var_dir.stat().st_mode & 0o777 == 0o700
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        settings.secret()


RACE = """
import os, sys, time
from mailer.config import load_settings
settings = load_settings(sys.argv[1], env={})
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
print(settings.secret())
"""


def test_processes_starting_at_once_share_one_key(project: Project) -> None:
    go = project.root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(project.config), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(12)]
    time.sleep(1.0)  # every process imported and is waiting
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [err for _, err in results]
    keys = {out.strip() for out, _ in results}
    assert len(keys) == 1 and len(keys.pop()) >= 32
    assert sorted(p.name for p in (project.root / "var").iterdir()) == ["secret.key"]


def test_var_and_sqlite_database_are_private(project: Project) -> None:
    from mailer.store import open_store

    os.umask(0o022)
    settings = project.settings()
    store = open_store(settings.database_url)
    store.dispose()
    db = Path(settings.database_url.removeprefix("sqlite:///"))
    assert db.stat().st_mode & 0o777 == 0o600
    assert db.parent.stat().st_mode & 0o777 == 0o700
    for extra in db.parent.glob(db.name + "-*"):
        assert extra.stat().st_mode & 0o077 == 0, extra


def test_existing_world_readable_var_is_tightened(project: Project) -> None:
    from mailer.store import open_store

    var = project.root / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    db = var / "mailer.db"
    db.touch()
    db.chmod(0o644)
    settings = project.settings()
    open_store(settings.database_url, var_dir=settings.var_dir).dispose()
    assert var.stat().st_mode & 0o777 == 0o700 and db.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o755, 0o1777])
def test_a_database_in_a_folder_of_the_administrators_leaves_the_folder_alone(
        tmp_path: Path, mode: int) -> None:
    """A shared folder (/tmp, /srv, a home directory) keeps its mode: once a database at
    /tmp/x.db made /tmp 0700, and every other user's program lost /tmp."""
    from mailer.store import open_store

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    db = shared / "mailer.db"
    open_store(f"sqlite:///{db}", var_dir=tmp_path / "var").dispose()
    assert stat.S_IMODE(shared.stat().st_mode) == mode
    assert db.stat().st_mode & 0o777 == 0o600
    new = tmp_path / "new" / "mailer.db"  # a folder it makes itself is private
    open_store(f"sqlite:///{new}").dispose()
    assert new.parent.stat().st_mode & 0o777 == 0o700
