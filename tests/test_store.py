"""The store: migrations match the tables, snapshots are idempotent, claims never overlap."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mailer.audience import Recipient
from mailer.dispatch import start_run
from mailer.store import Store, open_store, subscriber_tables  # noqa: F401  (its tables)
from mailer.store import db as store_db
from mailer.store import queries as q
from mailer.store.tables import metadata
from tests.conftest import Project, both_databases


def people(n: int) -> list[Recipient]:
    return [Recipient(email=f"p{i}@example.org", list="crowd") for i in range(n)]


@both_databases
def test_migrations_create_exactly_the_declared_tables(project: Project) -> None:
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "include_object": lambda o, name, type_, r, c: name != "scheduler_jobs"})
        assert compare_metadata(context, metadata) == []


@both_databases
def test_snapshot_is_one_transaction_and_idempotent(project: Project) -> None:
    store = open_store(project.settings().database_url)
    run, created = start_run(store, campaign_id="c", occurrence="once", trigger="send",
                             recipients=people(500))
    assert created and run.total == 500
    again, created_again = start_run(store, campaign_id="c", occurrence="once", trigger="send",
                                     recipients=people(600))
    assert not created_again and again.id == run.id
    with store.engine.connect() as conn:
        assert sum(q.status_counts(conn, run.id).values()) == 500


@both_databases
def test_concurrent_claims_never_hand_out_a_row_twice(project: Project) -> None:
    store = open_store(project.settings().database_url)
    run, _ = start_run(store, campaign_id="c", occurrence="once", trigger="send",
                       recipients=people(2000))
    claimed: list[list[int]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        while True:
            with store.engine.begin() as conn:
                rows = q.claim(conn, run.id, worker=f"w{i}", limit=50, now=q.utcnow())
            if not rows:
                return
            claimed[i].extend(r.id for r in rows)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [row for part in claimed for row in part]
    assert len(every) == 2000 and len(set(every)) == 2000
    assert sum(1 for part in claimed if part) >= 2  # the work was really shared


def test_erased_addresses_stay_suppressed_by_hash(project: Project) -> None:
    store = open_store(project.settings().database_url)
    with store.engine.begin() as conn:
        q.suppress(conn, q.hashed_key("gone@example.org"), reason="erased")
        assert q.suppressed_among(conn, [("gone@example.org", "crowd"),
                                         ("here@example.org", "crowd")]) == {"gone@example.org"}


# --- migrations: down and up again; whether a database is migrated is asked of it --------------

# What each migration creates; a downgrade must take exactly that away again.
CREATED = {
    "0001": {"runs", "deliveries", "suppressions"},
    "0002": {"subscribers", "memberships", "consent_events", "confirm_nonces"},
    "0005": {"send_quota"},
}


def alembic_to(store: Store, revision: str, *, down: bool) -> None:
    from alembic import command

    cfg = store_db._config()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def tables(store: Store) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(store.engine).get_table_names()) - {"alembic_version"}


def revisions() -> list[str]:
    """Every migration, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(store_db._config())
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def test_the_no_wait_connection_fails_at_once_where_the_store_waits(
        project: Project, tmp_path: Path) -> None:
    import sqlite3
    import time

    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = open_store(url)
    nowait = store_db.nowait_engine(store.engine)
    assert nowait is not None
    assert store_db.nowait_engine(create_engine("sqlite://")) is None  # another database
    holder = sqlite3.connect(tmp_path / "l.db")
    holder.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        with pytest.raises(OperationalError) as refused, nowait.begin() as conn:
            conn.exec_driver_sql("INSERT INTO suppressions (email_key, list_name, reason, "
                                 "source, detail, created_at) VALUES ('a', '*', 'x', '', '', 0)")
        assert time.monotonic() - start < 1.0 and store_db.is_busy(refused.value)
        with store.engine.connect() as conn:  # the store itself would wait for the lock
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        holder.rollback()
        holder.close()
        nowait.dispose()
        store.dispose()


def test_the_head_revision_is_the_newest_migration_script() -> None:
    assert revisions()[-1] == store_db.HEAD_REVISION


@both_databases
def test_every_migration_downgrades_and_upgrades_again(project: Project) -> None:
    store = open_store(project.settings().database_url)
    order = revisions()
    assert order[:2] == ["0001", "0002"] and order[-1] == store_db.HEAD_REVISION
    at_head = tables(store)
    steps: dict[str, set[str]] = {}
    for revision in reversed(order):  # head down to nothing, one migration at a time
        before = tables(store)
        alembic_to(store, "-1", down=True)
        after = tables(store)
        assert after < before or revision not in CREATED, f"{revision} dropped nothing"
        steps[revision] = before - after
    assert tables(store) == set()
    for revision, created in CREATED.items():
        assert steps[revision] == created, f"downgrade of {revision} dropped {steps[revision]}"
    assert not store_db.at_head(store.engine)
    for revision in order:  # and up again, one at a time
        alembic_to(store, revision, down=False)
        assert steps[revision] <= tables(store)
    assert tables(store) == at_head and store_db.at_head(store.engine)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "include_object": lambda o, name, type_, r, c: name != "scheduler_jobs"})
        assert compare_metadata(context, metadata) == []


def test_a_database_made_anew_at_the_same_url_is_migrated_again(project: Project) -> None:
    """Nothing per process remembers a URL as migrated: the database itself is asked."""
    url = project.settings().database_url
    store = open_store(url)
    assert "runs" in tables(store)
    store.dispose()
    path = Path(url.split("///", 1)[1])
    for leftover in path.parent.glob(path.name + "*"):  # the file, its -wal and -shm
        leftover.unlink()
    again = open_store(url)
    assert "runs" in tables(again) and store_db.at_head(again.engine)


@both_databases
def test_a_database_another_process_downgraded_is_brought_up_again(project: Project) -> None:
    url = project.settings().database_url
    store = open_store(url)
    alembic_to(store, "0001", down=True)  # as an older version's `mailer db upgrade` left it
    assert "subscribers" not in tables(store)
    assert "subscribers" in tables(open_store(url))


def test_open_store_on_a_current_database_runs_no_migration(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is one query: a database at head is not handed to alembic's upgrade."""
    url = project.settings().database_url
    open_store(url)
    calls: list[object] = []
    monkeypatch.setattr(store_db, "migrate", lambda *a, **k: calls.append(a))
    open_store(url)
    assert calls == []


# Started at one instant (argv[2], a time.time() value), as a process manager starts services.
_TOGETHER = """
import sys, time
from mailer.config import load_settings
from mailer.store import open_store
settings = load_settings(sys.argv[1], env={"MAILER_DATABASE_URL": sys.argv[3]})
while time.time() < float(sys.argv[2]):
    pass
open_store(settings.database_url).dispose()
print(settings.secret())
"""


@both_databases
def test_processes_starting_together_on_an_empty_database_all_start(project: Project) -> None:
    """Migrations and the key file are made once, whoever comes first; nobody fails."""
    import subprocess
    import sys
    import time

    pg = project.env.get("MAILER_DATABASE_URL")
    rounds = 1 if pg else 6
    for i in range(rounds):
        url = pg or f"sqlite:///{project.root / 'var' / f'round{i}.db'}"
        key = project.root / "var" / "secret.key"
        key.unlink(missing_ok=True)
        at = f"{time.time() + 1.5:.3f}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        children = [subprocess.Popen([sys.executable, "-c", _TOGETHER, str(project.config), at,
                                      url], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [child.communicate(timeout=60) for child in children]
        problems = [err.strip().splitlines()[-1:] for (_, err), child in zip(
            outputs, children, strict=True) if child.returncode != 0]
        assert problems == [], f"round {i}: {problems}"
        keys = {out.strip() for out, _ in outputs}
        assert keys == {key.read_text().strip()} and len(keys.pop()) >= 32
        store = open_store(url)
        assert store_db.at_head(store.engine) and "runs" in tables(store)
        store.dispose()
