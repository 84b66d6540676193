"""The store: migrations match the tables, snapshots are idempotent, claims never overlap."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mailer.audience import Recipient
from mailer.dispatch import start_run
from mailer.store import open_store, subscriber_tables  # noqa: F401  (its tables)
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
