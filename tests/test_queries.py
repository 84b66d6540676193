"""Every function of mailer/store/queries.py, called directly on a real ledger.

Pinned: which rows each query reads or changes and which it leaves alone (another run,
another campaign, another list, another status), its boundaries (`<=` against `now`,
`>= since`, `> after_id`, a 5xx code from 500 on, every `limit` and its default), the order
it promises, the values it writes (claims, outcomes, truncated texts, defaults), and that every
datetime it hands back is aware UTC, though SQLite stores them naive (`as_utc`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from mailer.audience import Recipient
from mailer.dispatch import start_run
from mailer.store import Store, open_store
from mailer.store import queries as q
from mailer.store.tables import (
    DeliveryStatus,
    ReturnedKind,
    RunStatus,
    deliveries,
    returned_mails,
    suppressions,
)
from tests.conftest import Project, both_databases
from tests.test_store import people

# In the future, so that a row stamped by the code's own clock (utcnow) never passes for one
# of these by accident.
NOW = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
US = timedelta(microseconds=1)
MINUTE = timedelta(minutes=1)
PENDING, SENT, FAILED, BOUNCED = (
    DeliveryStatus.PENDING, DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.BOUNCED)
only_postgres = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pytest.fixture
def store(project: Project) -> Iterator[Store]:
    opened = open_store(project.settings().database_url)
    yield opened
    opened.dispose()


def on(list_name: str, *names: str) -> list[Recipient]:
    """Recipients name@example.org taken from `list_name`."""
    return [Recipient(email=f"{n}@example.org", list=list_name) for n in names]


def ledger(store: Store, recipients: list[Recipient], *, campaign: str = "c",
           occurrence: str = "1") -> tuple[q.Run, list[int]]:
    """A run with one pending row per recipient; the run and its row ids, in list order."""
    run, _ = start_run(store, campaign_id=campaign, occurrence=occurrence, trigger="send",
                       recipients=recipients)
    with store.engine.connect() as conn:
        ids = list(conn.execute(select(deliveries.c.id).where(deliveries.c.run_id == run.id)
                                .order_by(deliveries.c.id)).scalars())
    return run, ids


def row(conn: Connection, delivery_id: int) -> dict[str, Any]:
    """One ledger row as stored, its datetimes made aware the way the queries do it."""
    found = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).one()
    return {k: q.as_utc(v) if isinstance(v, datetime) else v for k, v in found._mapping.items()}


def states(conn: Connection, ids: list[int], *columns: str) -> list[tuple[Any, ...]]:
    return [tuple(row(conn, i)[c] for c in columns) for i in ids]


def new_run(conn: Connection, campaign: str, occurrence: str, **values: Any) -> q.Run:
    return q.insert_run(conn, campaign_id=campaign, occurrence=occurrence, trigger="send",
                        **values)[0]


# --- helpers, and a transaction off the event loop ----------------------------------------


def test_as_utc_marks_naive_values_as_utc_and_leaves_aware_ones_alone() -> None:
    assert q.as_utc(None) is None
    naive = q.as_utc(datetime(2030, 1, 2, 3, 4, 5, 6))
    assert naive == datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC) and naive.tzinfo is UTC
    # An aware value is already exact: neither converted nor re-labelled.
    plus_two = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert q.as_utc(plus_two) is plus_two


def suppressed_keys(conn: Connection) -> dict[str, set[str]]:
    """The suppression table as {email_key: its lists}."""
    from mailer.store.tables import suppressions

    out: dict[str, set[str]] = {}
    for key, list_name in conn.execute(select(suppressions.c.email_key, suppressions.c.list_name)):
        out.setdefault(key, set()).add(list_name)
    return out


def test_utcnow_is_aware_utc_and_current() -> None:
    before = datetime.now(UTC)
    now = q.utcnow()
    assert now.tzinfo is UTC and before <= now <= datetime.now(UTC)


def test_hashed_key_is_a_prefixed_sha256_of_the_utf8_address() -> None:
    assert q.hashed_key("gone@example.org") == (
        "sha256:623465a03597bc5e82ec2293361902ff9f0f6b90ae3aeb5e1740570cdc3adfb3")


def test_is_suppressed_by_key_on_its_list_or_all_lists_and_by_hash_once_erased() -> None:
    table = {"a@example.org": {"crowd"}, "b@example.org": {"*"},
             q.hashed_key("gone@example.org"): {"crowd"}}
    assert q.is_suppressed(table, "a@example.org", "crowd")
    assert not q.is_suppressed(table, "a@example.org", "news")
    assert q.is_suppressed(table, "b@example.org", "news")
    assert not q.is_suppressed(table, "x@example.org", "crowd")
    assert q.is_suppressed(table, "gone@example.org", "crowd")
    assert not q.is_suppressed(table, "gone@example.org", "news")


@both_databases
async def test_in_transaction_runs_off_the_loop_and_commits_only_on_return(store: Store) -> None:
    def add(conn: Connection) -> tuple[bool, int]:
        return q.suppress(conn, "a@example.org", reason="manual"), threading.get_ident()

    def add_and_fail(conn: Connection) -> None:
        q.suppress(conn, "b@example.org", reason="manual")
        raise RuntimeError("after the write")

    added, thread = await q.in_transaction(store.engine, add)
    assert added and thread != threading.get_ident()
    with pytest.raises(RuntimeError):
        await q.in_transaction(store.engine, add_and_fail)
    with store.engine.connect() as conn:
        assert suppressed_keys(conn) == {"a@example.org": {"*"}}


# --- runs ---------------------------------------------------------------------------------


@both_databases
def test_insert_run_creates_a_run_once_and_then_returns_it_unchanged(store: Store) -> None:
    with store.engine.begin() as conn:
        before = q.utcnow()
        run, created = q.insert_run(conn, campaign_id="c", occurrence="2030-05-06",
                                    trigger="scheduler", scheduled_at=NOW, late_s=1.5,
                                    note="late")
        after = q.utcnow()
        again, created_again = q.insert_run(conn, campaign_id="c", occurrence="2030-05-06",
                                            trigger="send", status=RunStatus.MISSED, note="x")
        missed, _ = q.insert_run(conn, campaign_id="c", occurrence="2030-05-07",
                                 trigger="scheduler", status=RunStatus.MISSED)
    assert created and not created_again and again == run
    assert before <= run.created_at <= after and run.started_at == run.created_at
    assert (run.campaign_id, run.occurrence, run.status, run.trigger, run.scheduled_at,
            run.finished_at, run.late_s, run.total, run.in_flight_recovered, run.note) == (
        "c", "2030-05-06", "running", "scheduler", NOW, None, 1.5, 0, 0, "late")
    # Only a run that starts running has started.
    assert (missed.status, missed.started_at, missed.scheduled_at, missed.late_s,
            missed.note) == ("missed", None, None, None, None)


@both_databases
def test_runs_are_found_by_campaign_and_occurrence_and_listed_in_id_order(store: Store) -> None:
    with store.engine.begin() as conn:
        # Ids rise b, a, c; the (campaign, occurrence) index reads a, b, c: the order asked for
        # must come from the query.
        b, a, c = (new_run(conn, "c", occurrence) for occurrence in ("b", "a", "c"))
        other = new_run(conn, "d", "a")
        assert q.find_run(conn, "c", "b") == b and q.find_run(conn, "c", "c") == c
        assert q.find_run(conn, "d", "a") == other
        assert q.find_run(conn, "d", "b") is None
        assert q.get_run(conn, a.id) == a
        assert q.runs_of(conn, "c") == [b, a, c]
        assert q.runs_of(conn, "e") == []
        assert q.last_run(conn, "c") == c and q.last_run(conn, "d") == other
        assert q.last_run(conn, "e") is None


@both_databases
def test_runs_with_status_are_the_newest_first_and_twenty_by_default(store: Store) -> None:
    with store.engine.begin() as conn:
        failed = [new_run(conn, "c", f"f{i:02d}", status=RunStatus.FAILED) for i in range(21)]
        missed = new_run(conn, "c", "m", status=RunStatus.MISSED)
        new_run(conn, "d", "f", status=RunStatus.FAILED)
        newest_first = failed[::-1]
        assert q.runs_with_status(conn, "c", RunStatus.FAILED) == newest_first[:20]
        assert q.runs_with_status(conn, "c", RunStatus.FAILED, limit=2) == newest_first[:2]
        assert q.runs_with_status(conn, "c", RunStatus.MISSED) == [missed]
        assert q.runs_with_status(conn, "e", RunStatus.FAILED) == []


@both_databases
def test_latest_scheduled_is_the_campaigns_latest_scheduled_time(store: Store) -> None:
    with store.engine.begin() as conn:
        assert q.latest_scheduled(conn, "c") is None
        for occurrence, at in (("1", NOW), ("3", NOW + 2 * MINUTE), ("2", NOW + MINUTE),
                               ("send", None)):
            new_run(conn, "c", occurrence, scheduled_at=at)
        new_run(conn, "d", "4", scheduled_at=NOW + 3 * MINUTE)
        assert q.latest_scheduled(conn, "c") == NOW + 2 * MINUTE


@both_databases
def test_unfinished_runs_are_the_running_ones_of_every_campaign_in_id_order(store: Store
                                                                            ) -> None:
    with store.engine.begin() as conn:
        first, done = new_run(conn, "c", "1"), new_run(conn, "c", "2")
        second = new_run(conn, "d", "1")
        new_run(conn, "d", "2", status=RunStatus.MISSED)
        q.set_run_status(conn, done.id, RunStatus.FINISHED)
        # PostgreSQL writes an updated row after the others: table order is not id order.
        q.set_run_status(conn, first.id, RunStatus.RUNNING)
        assert q.unfinished_runs(conn) == [first, second]


@both_databases
def test_set_run_status_stamps_finished_at_on_finishing_and_clears_it_on_resuming(
        store: Store) -> None:
    with store.engine.begin() as conn:
        run, other = new_run(conn, "c", "1"), new_run(conn, "c", "2")
        before = q.utcnow()
        q.set_run_status(conn, run.id, RunStatus.FINISHED)
        after = q.utcnow()
        finished = q.get_run(conn, run.id)
        q.set_run_status(conn, run.id, RunStatus.MISSED)
        missed = q.get_run(conn, run.id)
        q.set_run_status(conn, run.id, RunStatus.RUNNING)
        resumed = q.get_run(conn, run.id)
        assert q.get_run(conn, other.id) == other
    assert finished.status == "finished" and finished.finished_at is not None
    assert before <= finished.finished_at <= after
    assert (missed.status, missed.finished_at) == ("missed", finished.finished_at)
    assert (resumed.status, resumed.finished_at) == ("running", None)


@both_databases
def test_add_recovered_adds_up_on_its_run_only(store: Store) -> None:
    with store.engine.begin() as conn:
        run, other = new_run(conn, "c", "1"), new_run(conn, "c", "2")
        q.add_recovered(conn, run.id, 3)
        q.add_recovered(conn, run.id, 2)
        assert q.get_run(conn, run.id).in_flight_recovered == 5
        assert q.get_run(conn, other.id).in_flight_recovered == 0


@both_databases
def test_snapshot_inserts_pending_rows_chunk_by_chunk_and_sets_the_runs_total(
        store: Store) -> None:
    ledger(store, people(3), occurrence="earlier")
    offered = [{"email": f"p{i}@example.org", "email_key": f"p{i}@example.org", "name": "",
                "language": "", "list_name": "crowd", "fields": {}}
               for i in range(2 * q.INSERT_CHUNK + 1)]  # two full chunks and a rest
    with store.engine.begin() as conn:
        run = new_run(conn, "c", "1")
        assert q.snapshot(conn, run.id, offered) == 2 * q.INSERT_CHUNK + 1
        assert q.get_run(conn, run.id).total == 2 * q.INSERT_CHUNK + 1
        assert q.status_counts(conn, run.id)["pending"] == 2 * q.INSERT_CHUNK + 1
        assert set(conn.execute(select(deliveries.c.attempts)
                                .where(deliveries.c.run_id == run.id)).scalars()) == {0}
        # Started again: rows already there stay as they are; the total counts the table.
        q.snapshot(conn, run.id, [*offered[:2], {**offered[0], "email_key": "new@example.org"}])
        assert q.get_run(conn, run.id).total == 2 * q.INSERT_CHUNK + 2
        assert q.find_run(conn, "c", "earlier").total == 3  # type: ignore[union-attr]


# --- the ledger ---------------------------------------------------------------------------


@both_databases
def test_claim_takes_the_due_pending_rows_of_its_run_oldest_first(store: Store) -> None:
    run, ids = ledger(store, people(6))
    other, _ = ledger(store, people(2), occurrence="2")
    with store.engine.begin() as conn:
        # ids[0] is due at NOW exactly, ids[1] a microsecond later, ids[2] is sent, the rest
        # were never tried (no time: due). Never-tried rows come first in the claim index:
        # the oldest-first order must come from the query.
        q.record(conn, [q.Outcome(ids[0], PENDING, 451, "later", next_attempt_at=NOW),
                        q.Outcome(ids[1], PENDING, 451, "later", next_attempt_at=NOW + US),
                        q.Outcome(ids[2], SENT, 250, "ok", sent_at=NOW)])
        first = q.claim(conn, run.id, worker="w1", limit=2, now=NOW)
        rest = q.claim(conn, run.id, worker="w2", limit=10, now=NOW)
        none_due = q.claim(conn, run.id, worker="w3", limit=10, now=NOW)
        later = q.claim(conn, run.id, worker="w3", limit=10, now=NOW + US)
        assert q.status_counts(conn, other.id)["pending"] == 2
    assert [c.id for c in first] == [ids[0], ids[3]]
    assert [c.id for c in rest] == [ids[4], ids[5]]
    assert none_due == []
    assert [c.id for c in later] == [ids[1]]


@both_databases
def test_claim_stamps_its_rows_and_hands_back_what_composing_needs(store: Store) -> None:
    # The fields come back as written, whatever they hold (JSON's quoting, non-ASCII).
    fields = {"city": "Köln", "quote": "\"a\\b' </x>", "empty": "", "ق": "شكرا"}
    ada = Recipient(email="Ada@Example.org", name="Ada", language="de",
                    fields=fields, list="crowd")
    run, ids = ledger(store, [ada, *on("news", "bo")])
    with store.engine.begin() as conn:
        # A retried row keeps the Message-ID it was first sent with.
        q.record(conn, [q.Outcome(ids[0], PENDING, 451, "later", message_id="<m@example.org>")])
        claimed = q.claim(conn, run.id, worker="w1", limit=5, now=NOW)
        stamped = states(conn, ids, "status", "claimed_by", "claimed_at", "updated_at",
                         "attempts")
    assert claimed == [
        q.Claimed(ids[0], "Ada@Example.org", "ada@example.org", "Ada", "de", "crowd",
                  fields, 1, "<m@example.org>"),
        q.Claimed(ids[1], "bo@example.org", "bo@example.org", "", "", "news", {}, 1, None)]
    assert stamped == [("sending", "w1", NOW, NOW, 1)] * 2


@only_postgres
def test_claim_on_postgres_skips_rows_another_transaction_holds(store: Store) -> None:
    run, ids = ledger(store, people(3))
    with store.engine.connect() as holder, holder.begin():
        holder.execute(select(deliveries.c.id).where(deliveries.c.id == ids[0])
                       .with_for_update())
        with store.engine.begin() as conn:
            # Waiting for the held row would be the bug: fail instead of hanging.
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            claimed = q.claim(conn, run.id, worker="w2", limit=2, now=NOW)
    assert [c.id for c in claimed] == ids[1:]


@both_databases
def test_claim_gives_each_row_without_one_a_message_id_before_its_first_attempt(
        store: Store) -> None:
    # Addresses in reverse order: the claim hands rows back in the ledger's order, not theirs.
    run, ids = ledger(store, on("news", "d", "c", "b", "a"))
    made = iter(["<1@example.org>", "<2@example.org>", "<3@example.org>"])
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(ids[1], PENDING, 451, "later", message_id="<b@example.org>")])
        claimed = q.claim(conn, run.id, worker="w1", limit=3, now=NOW,
                          new_message_id=lambda: next(made))
        # A row that has one keeps it: a retry goes out as the same message.
        assert [c.message_id for c in claimed] == [
            "<1@example.org>", "<b@example.org>", "<2@example.org>"]
        assert states(conn, ids, "message_id") == [
            ("<1@example.org>",), ("<b@example.org>",), ("<2@example.org>",), (None,)]
        # The result of an attempt leaves the row's Message-ID as the claim wrote it.
        q.record(conn, [q.Outcome(ids[0], SENT, 250, "ok", sent_at=NOW),
                        q.Outcome(ids[2], PENDING, 421, "later", next_attempt_at=NOW)])
        assert states(conn, ids[:3], "status", "message_id") == [
            ("sent", "<1@example.org>"), ("sending", "<b@example.org>"),
            ("pending", "<2@example.org>")]
        again = q.claim(conn, run.id, worker="w1", limit=3, now=NOW,
                        new_message_id=lambda: next(made))
    assert [(c.id, c.message_id) for c in again] == [
        (ids[2], "<2@example.org>"), (ids[3], "<3@example.org>")]


@both_databases
def test_record_writes_each_outcome_to_its_own_row_and_ends_the_claim(store: Store) -> None:
    run, ids = ledger(store, people(3))
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w1", limit=3, now=NOW)
        q.record(conn, [])  # no statement: SQLAlchemy refuses an empty parameter list
        before = q.utcnow()
        q.record(conn, [
            q.Outcome(ids[0], SENT, 250, "ok queued", sent_at=NOW, message_id="<a@example.org>"),
            q.Outcome(ids[1], PENDING, 451, "x" * 501, next_attempt_at=NOW + MINUTE)],
            worker="host:9:w")
        after = q.utcnow()
        written = [row(conn, i) for i in ids]
        # The timestamps are stored as SQLAlchemy stores them: the claim still compares them.
        assert q.claim(conn, run.id, worker="w2", limit=3, now=NOW + MINUTE / 2) == []
        assert [c.id for c in q.claim(conn, run.id, worker="w2", limit=3,
                                      now=NOW + 2 * MINUTE)] == [ids[1]]
    columns = ("status", "smtp_code", "smtp_text", "next_attempt_at", "sent_at", "message_id",
               "claimed_by", "sent_by")
    assert [tuple(r[c] for c in columns) for r in written] == [
        ("sent", 250, "ok queued", None, NOW, "<a@example.org>", None, "host:9:w"),
        ("pending", 451, "x" * 500, NOW + MINUTE, None, None, None, "host:9:w"),
        ("sending", None, None, None, None, None, "w1", None)]
    assert before <= written[0]["updated_at"] <= after
    assert before <= written[1]["updated_at"] <= after
    assert written[2]["updated_at"] == NOW


@both_databases
def test_record_stores_a_time_exactly_as_the_other_queries_do(store: Store) -> None:
    """`record` writes driver SQL: its timestamps must be stored in SQLAlchemy's own form
    (on SQLite a text the claim compares), like `claim` stores `claimed_at`."""
    run, ids = ledger(store, people(1))
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w1", limit=1, now=NOW)
        q.record(conn, [q.Outcome(ids[0], PENDING, 451, "later", next_attempt_at=NOW)])
        raw = conn.exec_driver_sql(
            f"SELECT next_attempt_at, claimed_at FROM deliveries WHERE id = {ids[0]}").one()
    assert raw[0] == raw[1]


@both_databases
def test_due_count_counts_pending_rows_of_the_run_whose_retry_time_has_come(
        store: Store) -> None:
    run, ids = ledger(store, people(6))
    other, _ = ledger(store, people(2), occurrence="2")  # another run's rows are not counted
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w1", limit=4, now=NOW)
        q.record(conn, [
            q.Outcome(ids[0], SENT, 250, "ok", sent_at=NOW),
            q.Outcome(ids[1], PENDING, 451, "later", next_attempt_at=NOW + MINUTE),
            q.Outcome(ids[2], PENDING, 451, "now", next_attempt_at=NOW)])
        # ids[3] is sending; ids[4], ids[5] are pending with no retry time
        assert q.due_count(conn, run.id, NOW) == 3  # ids[2] (at NOW), ids[4], ids[5]
        assert q.due_count(conn, run.id, NOW - MINUTE) == 2
        assert q.due_count(conn, run.id, NOW + MINUTE) == 4
        assert q.due_count(conn, other.id, NOW) == 2


@both_databases
def test_sent_by_counts_sent_and_bounced_rows_per_worker_busiest_first(store: Store) -> None:
    run, ids = ledger(store, people(7))
    other, other_ids = ledger(store, people(1), occurrence="2")
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w", limit=7, now=NOW)
        q.claim(conn, other.id, worker="w", limit=1, now=NOW)
        q.record(conn, [q.Outcome(i, SENT, 250, "ok", sent_at=NOW) for i in ids[:2]],
                 worker="host:2:b")
        q.record(conn, [q.Outcome(i, SENT, 250, "ok", sent_at=NOW) for i in ids[2:4]],
                 worker="host:1:a")
        q.record(conn, [q.Outcome(ids[4], SENT, 250, "ok", sent_at=NOW)], worker="host:3:c")
        q.record(conn, [q.Outcome(ids[5], FAILED, 550, "no")], worker="host:3:c")
        q.record(conn, [q.Outcome(ids[6], PENDING, 451, "later", next_attempt_at=NOW)],
                 worker="host:3:c")
        q.record(conn, [q.Outcome(other_ids[0], SENT, 250, "ok", sent_at=NOW)], worker="x")
        conn.execute(deliveries.update().where(deliveries.c.id == ids[0])
                     .values(status=BOUNCED))  # bounced later: it was sent
        # ties by name; failed and pending rows and other runs' rows are not counted
        assert list(q.sent_by(conn, run.id).items()) == [
            ("host:1:a", 2), ("host:2:b", 2), ("host:3:c", 1)]
        q.record(conn, [q.Outcome(ids[6], SENT, 250, "ok", sent_at=NOW)], worker="host:3:c")
        q.record(conn, [q.Outcome(ids[5], SENT, 250, "ok", sent_at=NOW)], worker="host:3:c")
        assert list(q.sent_by(conn, run.id).items()) == [
            ("host:3:c", 3), ("host:1:a", 2), ("host:2:b", 2)]


@both_databases
def test_suppression_digests_hold_one_digest_per_row_and_say_whether_any_is_erased(
        store: Store) -> None:
    from mailer.seen import digest

    with store.engine.begin() as conn:
        assert len(q.suppression_digests(conn)[0]) == 0
        assert q.suppression_digests(conn)[1] is False
        q.suppress(conn, "a@example.org", reason="unsubscribed", list_name="crowd")
        q.suppress(conn, "a@example.org", reason="unsubscribed", list_name="news")
        q.suppress(conn, "b@example.org", reason="hard_bounce")
        table, erased = q.suppression_digests(conn)
        assert len(table) == 3 and erased is False
        assert len(table.places(digest("a@example.org"))) == 2
        assert len(table.places(digest("b@example.org"))) == 1
        assert table.places(digest("c@example.org")) == []
        q.suppress(conn, q.hashed_key("gone@example.org"), reason="erased")
        table, erased = q.suppression_digests(conn)
        assert erased is True and table.places(digest(q.hashed_key("gone@example.org")))


@both_databases
def test_release_gives_back_the_attempt_of_rows_still_sending_only(store: Store) -> None:
    run, ids = ledger(store, people(4))
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w1", limit=4, now=NOW)
        q.record(conn, [q.Outcome(ids[1], SENT, 250, "ok", sent_at=NOW)])
        q.release(conn, [])
        q.release(conn, ids[:2])
        assert states(conn, ids, "status", "attempts", "claimed_by") == [
            ("pending", 0, None), ("sent", 1, None), ("sending", 1, "w1"), ("sending", 1, "w1")]


@both_databases
def test_stuck_rows_are_listed_and_requeued_with_their_attempt_counted(store: Store) -> None:
    run, ids = ledger(store, people(4))
    other, _ = ledger(store, people(1), occurrence="2")
    with store.engine.begin() as conn:
        # ids[0] waited for a retry, then was claimed: requeuing clears that time too.
        q.record(conn, [q.Outcome(ids[0], PENDING, 451, "later", next_attempt_at=NOW - MINUTE)])
        q.claim(conn, run.id, worker="w1", limit=3, now=NOW)
        q.claim(conn, other.id, worker="w9", limit=1, now=NOW)
        q.record(conn, [q.Outcome(ids[2], SENT, 250, "ok", sent_at=NOW)])
        stuck = q.stuck_sending(conn, run.id)
        assert q.requeue(conn, []) == 0
        # ids[1] listed as held by a worker that has gone, but w1 holds it now: left alone.
        assert q.requeue(conn, [(ids[0], "w1"), (ids[1], "gone"), (ids[2], "w1"),
                                (ids[3], None)]) == 1
        requeued = states(conn, ids, "status", "attempts", "claimed_by", "next_attempt_at")
        again = q.claim(conn, run.id, worker="w2", limit=1, now=NOW)
    assert sorted(stuck) == [(ids[0], "w1", NOW), (ids[1], "w1", NOW)]
    assert requeued == [("pending", 1, None, None), ("sending", 1, "w1", None),
                        ("sent", 1, None, None), ("pending", 0, None, None)]
    assert [(c.id, c.attempts) for c in again] == [(ids[0], 2)]


@both_databases
def test_next_attempt_is_the_earliest_retry_time_of_the_runs_pending_rows(store: Store) -> None:
    run, ids = ledger(store, people(4))
    _, others = ledger(store, people(1), occurrence="2")
    with store.engine.begin() as conn:
        assert q.next_attempt(conn, run.id) is None
        q.record(conn, [
            q.Outcome(ids[0], PENDING, 451, "", next_attempt_at=NOW + 2 * MINUTE),
            q.Outcome(ids[1], PENDING, 451, "", next_attempt_at=NOW + MINUTE),
            q.Outcome(ids[2], FAILED, 550, "", next_attempt_at=NOW),  # not pending any more
            q.Outcome(others[0], PENDING, 451, "", next_attempt_at=NOW - MINUTE)])
        assert q.next_attempt(conn, run.id) == NOW + MINUTE


@both_databases
def test_status_counts_name_every_status_of_the_run(store: Store) -> None:
    run, ids = ledger(store, people(4))
    ledger(store, people(2), occurrence="2")
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(ids[0], SENT, 250, "", sent_at=NOW),
                        q.Outcome(ids[1], SENT, 250, "", sent_at=NOW),
                        q.Outcome(ids[2], BOUNCED, 550, "")])
        assert q.status_counts(conn, run.id) == {
            "pending": 1, "sending": 0, "sent": 2, "failed": 0, "bounced": 1}


# (status, smtp code, suppressed on list, for reason, counted as bounced); every row on `crowd`.
BOUNCE_CASES = [
    (BOUNCED, 550, None, "", True),
    (FAILED, 500, "*", "hard_bounce", True),
    (FAILED, 550, "*", "hard_bounce", True),
    (FAILED, 550, "crowd", "soft_bounce", True),
    (FAILED, 551, "crowd", "hard_bounce", True),
    (FAILED, 550, "news", "hard_bounce", False),  # suppressed elsewhere only
    (FAILED, 550, "*", "unsubscribed", False),
    (FAILED, 499, "*", "hard_bounce", False),
    (FAILED, 550, None, "", False),
    (SENT, 250, "*", "hard_bounce", False),
    (PENDING, 550, "*", "hard_bounce", False),  # retried since (retry_failed keeps the code)
]


@both_databases
def test_bounced_count_counts_bounced_rows_and_5xx_refusals_suppressed_for_bouncing(
        store: Store) -> None:
    names = [f"b{i}" for i in range(len(BOUNCE_CASES))]
    run, ids = ledger(store, on("crowd", *names))
    other, others = ledger(store, on("crowd", "b0"), occurrence="2")
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(i, status, code, "") for i, (status, code, *_)
                        in zip(ids, BOUNCE_CASES, strict=True)])
        q.record(conn, [q.Outcome(others[0], BOUNCED, 550, "")])
        for name, (_, _, list_name, reason, _) in zip(names, BOUNCE_CASES, strict=True):
            if list_name:
                q.suppress(conn, f"{name}@example.org", reason=reason, list_name=list_name)
        assert q.bounced_count(conn, run.id) == sum(case[-1] for case in BOUNCE_CASES)
        assert q.bounced_count(conn, other.id) == 1


@both_databases
def test_send_window_is_the_first_and_last_sent_time_of_the_run(store: Store) -> None:
    run, ids = ledger(store, people(4))
    _, others = ledger(store, people(2), occurrence="2")
    with store.engine.begin() as conn:
        assert q.send_window(conn, run.id) == (None, None)
        q.record(conn, [q.Outcome(ids[0], SENT, 250, "", sent_at=NOW + MINUTE),
                        q.Outcome(ids[1], SENT, 250, "", sent_at=NOW),
                        q.Outcome(ids[2], SENT, 250, "", sent_at=NOW + 2 * MINUTE),
                        q.Outcome(others[0], SENT, 250, "", sent_at=NOW - MINUTE),
                        q.Outcome(others[1], SENT, 250, "", sent_at=NOW + 3 * MINUTE)])
        assert q.send_window(conn, run.id) == (NOW, NOW + 2 * MINUTE)


@both_databases
def test_first_deliveries_per_campaign_count_sent_and_bounced_rows_only(store: Store) -> None:
    # (campaign, occurrence, status, sent at): a failed row with a time must not count.
    rows = [("a", "1", SENT, NOW + MINUTE), ("a", "1", FAILED, NOW - MINUTE),
            ("a", "2", BOUNCED, NOW + 30 * US), ("b", "1", SENT, NOW),
            ("b", "1", SENT, NOW + 4 * MINUTE), ("c", "1", FAILED, NOW - 60 * MINUTE),
            ("d", "1", BOUNCED, NOW + 2 * MINUTE)]
    outcomes = []
    for campaign, occurrence in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = [r for r in rows if r[:2] == (campaign, occurrence)]
        _, ids = ledger(store, people(len(mine)), campaign=campaign, occurrence=occurrence)
        outcomes += [q.Outcome(i, status, 250, "", sent_at=at)
                     for i, (*_, status, at) in zip(ids, mine, strict=True)]
    with store.engine.begin() as conn:
        q.record(conn, outcomes)
        assert q.first_sent(conn, "a") == NOW + 30 * US
        assert q.first_sent(conn, "b") == NOW
        assert q.first_sent(conn, "c") is None
        assert q.sent_campaigns(conn) == [("d", NOW + 2 * MINUTE), ("a", NOW + 30 * US),
                                          ("b", NOW)]


# Failed rows with their code and text, in id order between rows of other states; retry times
# fall as ids rise, so that the claim index (run, status, retry time) does not read id order.
FAILURES = [(FAILED, 421, "421 b"), (FAILED, 421, "421 a"), (SENT, 250, "ok"),
            (FAILED, 421, "421 c"), (FAILED, 550, "550 z"), (PENDING, 421, "421 d"),
            (FAILED, 550, "550 y"), (FAILED, None, "")]


def failures(store: Store) -> tuple[q.Run, list[int]]:
    run, ids = ledger(store, people(len(FAILURES)))
    _, others = ledger(store, people(2), occurrence="2")
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(i, status, code, text, next_attempt_at=NOW - n * MINUTE)
                        for n, (i, (status, code, text)) in enumerate(zip(ids, FAILURES,
                                                                          strict=True))])
        q.record(conn, [q.Outcome(i, FAILED, 550, "550 x") for i in others])
    return run, ids


@both_databases
def test_failures_by_code_are_grouped_most_frequent_first(store: Store) -> None:
    run, _ = failures(store)
    with store.engine.connect() as conn:
        assert q.failures_by_code(conn, run.id) == [(421, 3, "421 a"), (550, 2, "550 y"),
                                                    (None, 1, "")]


@both_databases
def test_failed_rows_are_paged_by_id(store: Store) -> None:
    run, ids = failures(store)
    failed = [(i, f"p{n}@example.org", code, text)
              for n, (i, (status, code, text)) in enumerate(zip(ids, FAILURES, strict=True))
              if status == FAILED]
    with store.engine.connect() as conn:
        assert q.failed_rows(conn, run.id) == failed
        assert q.failed_rows(conn, run.id, after_id=ids[1]) == failed[2:]
        assert q.failed_rows(conn, run.id, after_id=ids[1], limit=2) == failed[2:4]
        assert q.failed_rows(conn, run.id, limit=1) == failed[:1]


@both_databases
def test_failed_rows_are_a_thousand_at_a_time_by_default(store: Store) -> None:
    run, ids = ledger(store, people(1001))
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(i, FAILED, 550, "") for i in ids])
        assert [r[0] for r in q.failed_rows(conn, run.id)] == ids[:1000]


@both_databases
def test_retry_failed_resets_the_runs_failed_rows_not_suppressed_for_their_list(
        store: Store) -> None:
    run, ids = ledger(store, on("crowd", "f0", "f1", "f2", "f3", "s4"))
    other, others = ledger(store, on("crowd", "f0"), occurrence="2")
    with store.engine.begin() as conn:
        q.claim(conn, run.id, worker="w1", limit=5, now=NOW)
        q.record(conn, [q.Outcome(i, FAILED, 550, "no", next_attempt_at=NOW) for i in ids[:4]])
        q.record(conn, [q.Outcome(ids[4], SENT, 250, "ok", sent_at=NOW),
                        q.Outcome(others[0], FAILED, 550, "no")])
        q.suppress(conn, "f1@example.org", reason="hard_bounce")
        q.suppress(conn, "f2@example.org", reason="unsubscribed", list_name="crowd")
        q.suppress(conn, "f3@example.org", reason="unsubscribed", list_name="news")
        assert q.retry_failed(conn, run.id) == 2
        assert states(conn, ids, "status", "attempts", "next_attempt_at") == [
            ("pending", 0, None), ("failed", 1, NOW), ("failed", 1, NOW), ("pending", 0, None),
            ("sent", 1, None)]
        assert states(conn, others, "status") == [("failed",)]
        assert q.retry_failed(conn, other.id) == 1


# --- suppressions -------------------------------------------------------------------------


@both_databases
def test_suppress_once_per_key_and_list_and_unsuppress_one_list_or_all(store: Store) -> None:
    with store.engine.begin() as conn:
        assert q.suppress(conn, "a@example.org", reason="manual")
        assert not q.suppress(conn, "a@example.org", reason="complaint")
        assert q.suppress(conn, "a@example.org", reason="unsubscribed", list_name="crowd")
        assert q.suppress(conn, "a@example.org", reason="unsubscribed", list_name="news")
        assert q.suppress(conn, "b@example.org", reason="unsubscribed", list_name="crowd")
        assert suppressed_keys(conn) == {"a@example.org": {"*", "crowd", "news"},
                                           "b@example.org": {"crowd"}}
        assert q.unsuppress(conn, "a@example.org", list_name="crowd") == 1
        assert suppressed_keys(conn) == {"a@example.org": {"*", "news"},
                                           "b@example.org": {"crowd"}}
        assert q.unsuppress(conn, "a@example.org") == 2
        assert q.unsuppress(conn, "a@example.org") == 0
        assert suppressed_keys(conn) == {"b@example.org": {"crowd"}}


@both_databases
def test_list_suppressions_shows_every_row_oldest_first_with_texts_cut(store: Store) -> None:
    with store.engine.begin() as conn:
        before = q.utcnow()
        q.suppress(conn, "a@example.org", reason="manual")
        assert not q.suppress(conn, "a@example.org", reason="complaint", source="web")
        q.suppress(conn, "b@example.org", reason="hard_bounce", source="s" * 121,
                   detail="d" * 501, list_name="crowd")
        after = q.utcnow()
        # An imported row is older than rows with lower ids: the order is by time.
        conn.execute(insert(suppressions).values(
            email_key="old@example.org", list_name="*", reason="manual", source="import",
            detail="", created_at=datetime(2020, 1, 1, tzinfo=UTC)))
        listed = q.list_suppressions(conn)
    assert [{k: v for k, v in r.items() if k not in ("id", "created_at")} for r in listed] == [
        {"email_key": "old@example.org", "list_name": "*", "reason": "manual",
         "source": "import", "detail": ""},
        {"email_key": "a@example.org", "list_name": "*", "reason": "manual", "source": "",
         "detail": ""},
        {"email_key": "b@example.org", "list_name": "crowd", "reason": "hard_bounce",
         "source": "s" * 120, "detail": "d" * 500}]
    # Naive on SQLite, aware on PostgreSQL: as_utc makes them comparable.
    assert all(before <= q.as_utc(r["created_at"]) <= after for r in listed[1:])  # type: ignore[operator]


@both_databases
def test_suppress_cuts_a_long_reason_to_its_column_on_either_database(store: Store) -> None:
    """`mailer suppressions add --reason` takes free text: PostgreSQL refused one longer than
    its VARCHAR(32) with a DataError, SQLite kept it whole."""
    reason = "asked us by phone on 2030-05-06, see ticket 4711"
    with store.engine.begin() as conn:
        assert q.suppress(conn, "a@example.org", reason=reason, source="cli")
        assert [r["reason"] for r in q.list_suppressions(conn)] == [reason[:32]]


@both_databases
def test_suppressed_among_answers_for_the_pairs_asked_by_key_or_by_hash(store: Store) -> None:
    with store.engine.begin() as conn:
        q.suppress(conn, "a@example.org", reason="unsubscribed", list_name="crowd")
        q.suppress(conn, "b@example.org", reason="manual")
        q.suppress(conn, q.hashed_key("gone@example.org"), reason="erased", list_name="crowd")
        q.suppress(conn, "d@example.org", reason="unsubscribed", list_name="news")
        assert q.suppressed_among(conn, []) == set()
        assert q.suppressed_among(conn, [
            ("a@example.org", "crowd"), ("b@example.org", "news"), ("gone@example.org", "crowd"),
            ("d@example.org", "crowd"), ("e@example.org", "crowd")]) == {
            "a@example.org", "b@example.org", "gone@example.org"}
        assert q.suppressed_among(conn, [("a@example.org", "news"),
                                         ("gone@example.org", "news")]) == set()


# --- returned mail ------------------------------------------------------------------------


def mailed(store: Store) -> dict[str, int]:
    """Ada mailed four times by campaign c (once from list news) and once by d. The row ids
    by name: o (sent, oldest), e (bounced: the one to find), then x_failed, x_key (another
    address), x_list (another list), x_campaign, each newer than e and unlike it in one
    respect; the run ids as "run c1" and so on."""
    ada = Recipient(email="Ada@Example.org", list="crowd")
    plan = [("c", "1", [ada], ["o"]), ("c", "2", [ada], ["e"]),
            ("c", "3", [ada, *on("crowd", "cy")], ["x_failed", "x_key"]),
            ("c", "4", [Recipient(email="Ada@Example.org", list="news")], ["x_list"]),
            ("d", "1", [ada], ["x_campaign"])]
    found: dict[str, int] = {}
    for campaign, occurrence, recipients, names in plan:
        run, ids = ledger(store, recipients, campaign=campaign, occurrence=occurrence)
        found.update(zip(names, ids, strict=True))
        found[f"run {campaign}{occurrence}"] = run.id
    with store.engine.begin() as conn:
        # x_failed reuses o's Message-ID and is written first: on PostgreSQL the rewritten o
        # then lies after it in the table, so "the row that used it first" needs the id order.
        q.record(conn, [q.Outcome(found["x_failed"], FAILED, 550, "",
                                  message_id="<o@example.org>")])
        q.record(conn, [q.Outcome(found[name], SENT, 250, "", sent_at=NOW,
                                  message_id=f"<{name}@example.org>")
                        for name in ("o", "e", "x_key", "x_list", "x_campaign")])
        assert q.mark_bounced(conn, found["e"], code=550, reason="5.1.1")
    return found


@both_databases
def test_deliveries_are_found_by_id_message_id_and_latest_per_address(store: Store) -> None:
    ids = mailed(store)
    e = q.Delivery(ids["e"], ids["run c2"], "c", "Ada@Example.org", "ada@example.org", "crowd",
                   "bounced", "<e@example.org>")
    with store.engine.connect() as conn:
        assert q.delivery(conn, ids["e"]) == e
        assert q.delivery(conn, ids["x_campaign"] + 1) is None
        assert q.delivery_by_message_id(conn, "<e@example.org>") == e
        # A Message-ID seen twice: the row that used it first.
        assert q.delivery_by_message_id(conn, "<o@example.org>").id == ids["o"]  # type: ignore[union-attr]
        assert q.delivery_by_message_id(conn, "<nobody@example.org>") is None
        assert q.latest_delivery(conn, campaign_id="c", email_key="ada@example.org",
                                 list_name="crowd") == e
        assert q.latest_delivery(conn, campaign_id="c", email_key="nobody@example.org",
                                 list_name="crowd") is None


@both_databases
def test_was_mailed_is_any_ledger_row_for_one_of_the_addresses(store: Store) -> None:
    mailed(store)
    with store.engine.connect() as conn:
        assert not q.was_mailed(conn, [])
        assert not q.was_mailed(conn, ["nobody@example.org"])
        assert q.was_mailed(conn, ["nobody@example.org", "cy@example.org"])


@both_databases
def test_mark_bounced_turns_a_sent_row_bounced_once(store: Store) -> None:
    run, ids = ledger(store, people(3))
    with store.engine.begin() as conn:
        q.record(conn, [q.Outcome(ids[0], SENT, 250, "ok", sent_at=NOW),
                        q.Outcome(ids[1], SENT, 250, "ok", sent_at=NOW),
                        q.Outcome(ids[2], FAILED, 421, "later")])
        before = q.utcnow()
        assert q.mark_bounced(conn, ids[0], code=550, reason="r" * 501)
        after = q.utcnow()
        assert not q.mark_bounced(conn, ids[0], code=551, reason="again")
        assert not q.mark_bounced(conn, ids[2], code=550, reason="never sent")
        marked = states(conn, ids, "status", "smtp_code", "smtp_text")
        stamped = row(conn, ids[0])["updated_at"]
    assert marked == [("bounced", 550, "r" * 500), ("sent", 250, "ok"), ("failed", 421, "later")]
    assert before <= stamped <= after


RETURNED = ("mail_key", "received_at", "source", "kind", "matched_by", "run_id",
            "delivery_id", "list_name", "action", "detail")


@both_databases
def test_record_returned_notes_a_mail_once_with_its_texts_cut(store: Store) -> None:
    run, ids = ledger(store, people(1))
    with store.engine.begin() as conn:
        assert q.record_returned(conn, mail_key="k1", source="maildir",
                                 kind=ReturnedKind.HARD_BOUNCE, matched_by="verp", run_id=run.id,
                                 delivery_id=ids[0], list_name="crowd", action="suppressed",
                                 detail="5.1.1", now=NOW)
        assert not q.record_returned(conn, mail_key="k1", source="imap", kind=ReturnedKind.REPLY,
                                     now=NOW + MINUTE)
        before = q.utcnow()
        assert q.record_returned(conn, mail_key="k2", source="imap", kind=ReturnedKind.REPLY)
        after = q.utcnow()
        assert q.record_returned(conn, mail_key="k3", source="s" * 17, kind=ReturnedKind.REPORT,
                                 list_name="l" * 81, action="a" * 33, detail="d" * 501, now=NOW)
        q.set_returned_action(conn, "k1", "b" * 33)
        found = [{k: q.as_utc(v) if isinstance(v, datetime) else v for k, v in r._mapping.items()}
                 for r in conn.execute(select(*(returned_mails.c[c] for c in RETURNED))
                                       .order_by(returned_mails.c.id))]
    received = found[1].pop("received_at")
    assert received is not None and before <= received <= after
    assert found == [
        {"mail_key": "k1", "received_at": NOW, "source": "maildir", "kind": "hard_bounce",
         "matched_by": "verp", "run_id": run.id, "delivery_id": ids[0], "list_name": "crowd",
         "action": "b" * 32, "detail": "5.1.1"},
        {"mail_key": "k2", "source": "imap", "kind": "reply", "matched_by": "", "run_id": None,
         "delivery_id": None, "list_name": "", "action": "", "detail": ""},
        {"mail_key": "k3", "received_at": NOW, "source": "s" * 16, "kind": "report",
         "matched_by": "", "run_id": None, "delivery_id": None, "list_name": "l" * 80,
         "action": "a" * 32, "detail": "d" * 500}]


SINCE = NOW - 60 * MINUTE


def returned(store: Store) -> tuple[q.Run, q.Run, list[int]]:
    """Returned mail around SINCE for ada (campaigns c and n), bo (c) and no one; the two runs
    and the ids of the mails in the order read."""
    run, ids = ledger(store, on("crowd", "ada", "bo"))
    news, news_ids = ledger(store, on("news", "ada"), campaign="n")
    soft, hard = ReturnedKind.SOFT_BOUNCE, ReturnedKind.HARD_BOUNCE
    mails = [  # (kind, run, delivery, received at)
        (soft, run.id, ids[0], SINCE),
        (soft, run.id, ids[0], SINCE - US),
        (soft, news.id, news_ids[0], SINCE + MINUTE),
        (hard, run.id, ids[0], SINCE + MINUTE),
        (soft, run.id, ids[1], SINCE + MINUTE),
        (ReturnedKind.COMPLAINT, run.id, None, SINCE + MINUTE),
        (ReturnedKind.REPLY, None, None, SINCE + 2 * MINUTE)]
    with store.engine.begin() as conn:
        for n, (kind, run_id, delivery_id, at) in enumerate(mails):
            q.record_returned(conn, mail_key=f"m{n}", source="imap", kind=kind, matched_by="verp",
                              run_id=run_id, delivery_id=delivery_id, list_name="crowd",
                              action=f"a{n}", detail=f"d{n}", now=at)
        read = list(conn.execute(select(returned_mails.c.id).order_by(returned_mails.c.id))
                    .scalars())
    return run, news, read


@both_databases
def test_soft_bounces_of_an_address_since_a_time_in_any_run(store: Store) -> None:
    returned(store)
    with store.engine.connect() as conn:
        assert q.soft_bounces(conn, "ada@example.org", since=SINCE) == 2
        assert q.soft_bounces(conn, "ada@example.org", since=SINCE - US) == 3
        assert q.soft_bounces(conn, "nobody@example.org", since=SINCE) == 0


@both_databases
def test_returned_counts_name_every_kind_for_the_run(store: Store) -> None:
    run, news, _ = returned(store)
    zero = {kind.value: 0 for kind in ReturnedKind}
    with store.engine.connect() as conn:
        assert q.returned_counts(conn, run.id) == {
            **zero, "soft_bounce": 3, "hard_bounce": 1, "complaint": 1}
        assert q.returned_counts(conn, news.id) == {**zero, "soft_bounce": 1}


@both_databases
def test_recent_returned_are_the_newest_with_address_and_campaign(store: Store) -> None:
    run, _, read = returned(store)
    with store.engine.connect() as conn:
        everything = q.recent_returned(conn)
        newest = q.recent_returned(conn, limit=2)
        complaints = q.recent_returned(conn, kinds=["complaint", "hard_bounce"])
    assert [r["id"] for r in everything] == read[::-1]
    assert newest == everything[:2]
    assert newest == [
        {"id": read[6], "received_at": SINCE + 2 * MINUTE, "source": "imap", "kind": "reply",
         "matched_by": "verp", "run_id": None, "list_name": "crowd", "action": "a6",
         "detail": "d6", "email": None, "campaign_id": None},
        {"id": read[5], "received_at": SINCE + MINUTE, "source": "imap", "kind": "complaint",
         "matched_by": "verp", "run_id": run.id, "list_name": "crowd",
         "action": "a5", "detail": "d5", "email": None, "campaign_id": "c"}]
    assert [(r["id"], r["email"]) for r in complaints] == [(read[5], None),
                                                            (read[3], "ada@example.org")]
    assert [(r["email"], r["campaign_id"]) for r in everything[2:5]] == [
        ("bo@example.org", "c"), ("ada@example.org", "c"), ("ada@example.org", "n")]


@both_databases
def test_recent_returned_are_fifty_by_default(store: Store) -> None:
    with store.engine.begin() as conn:
        for n in range(51):
            q.record_returned(conn, mail_key=f"m{n}", source="imap", kind=ReturnedKind.REPLY,
                              detail=f"d{n}")
        assert [r["detail"] for r in q.recent_returned(conn)] == [
            f"d{n}" for n in range(50, 0, -1)]
