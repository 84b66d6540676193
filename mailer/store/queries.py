"""Every query of the ledger and the suppression list, each a named function."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, func, or_, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect

from ..seen import Seen, digest
from .tables import (
    DeliveryStatus,
    ReturnedKind,
    RunStatus,
    deliveries,
    returned_mails,
    runs,
    suppressions,
)

INSERT_CHUNK = 2000
GLOBAL = "*"
# Rows whose message the relay took: `bounced` ones went out too, and came back later.
DELIVERED = (DeliveryStatus.SENT, DeliveryStatus.BOUNCED)
HASH_PREFIX = "sha256:"
T = TypeVar("T")


async def in_transaction(engine: Engine, fn: Callable[[Connection], T]) -> T:
    """Run `fn` in one transaction in a worker thread, off the event loop; commit on return."""

    def work() -> T:
        with engine.begin() as conn:
            return fn(conn)

    return await asyncio.to_thread(work)


def hashed_key(key: str) -> str:
    """What remains of an erased address: enough to recognise it, not to read it back."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _insert(conn: Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        # Imported here: on SQLite, every command would pay ~30 ms for a dialect it never uses.
        from sqlalchemy.dialects.postgresql import insert

        return insert(table)
    return sqlite.insert(table)


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    campaign_id: str
    occurrence: str
    status: str
    trigger: str
    scheduled_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    late_s: float | None
    total: int
    in_flight_recovered: int
    note: str | None


def _run(row: Any) -> Run:
    data = dict(row._mapping)
    for key in ("scheduled_at", "created_at", "started_at", "finished_at"):
        data[key] = as_utc(data[key])
    return Run(**data)


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    email: str
    email_key: str
    name: str
    language: str
    list_name: str
    fields: dict[str, str]
    attempts: int
    message_id: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The new state of one ledger row after an SMTP transaction."""

    id: int
    status: DeliveryStatus
    smtp_code: int | None
    smtp_text: str
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None
    message_id: str | None = None


# --- runs -----------------------------------------------------------------------------------


def find_run(conn: Connection, campaign_id: str, occurrence: str) -> Run | None:
    row = conn.execute(
        select(runs).where(runs.c.campaign_id == campaign_id, runs.c.occurrence == occurrence)
    ).first()
    return _run(row) if row else None


def get_run(conn: Connection, run_id: int) -> Run:
    return _run(conn.execute(select(runs).where(runs.c.id == run_id)).one())


def runs_of(conn: Connection, campaign_id: str) -> list[Run]:
    rows = conn.execute(select(runs).where(runs.c.campaign_id == campaign_id).order_by(runs.c.id))
    return [_run(r) for r in rows]


def last_run(conn: Connection, campaign_id: str) -> Run | None:
    row = conn.execute(select(runs).where(runs.c.campaign_id == campaign_id)
                       .order_by(runs.c.id.desc()).limit(1)).first()
    return _run(row) if row else None


def runs_with_status(conn: Connection, campaign_id: str, status: RunStatus, *, limit: int = 20
                     ) -> list[Run]:
    rows = conn.execute(select(runs).where(runs.c.campaign_id == campaign_id,
                                           runs.c.status == status)
                        .order_by(runs.c.id.desc()).limit(limit))
    return [_run(r) for r in rows]


def latest_scheduled(conn: Connection, campaign_id: str) -> datetime | None:
    """The scheduled time of the campaign's most recent recorded occurrence."""
    value = conn.execute(select(func.max(runs.c.scheduled_at))
                         .where(runs.c.campaign_id == campaign_id)).scalar()
    return as_utc(value)


def unfinished_runs(conn: Connection) -> list[Run]:
    rows = conn.execute(select(runs).where(runs.c.status == RunStatus.RUNNING).order_by(runs.c.id))
    return [_run(r) for r in rows]


def insert_run(
    conn: Connection,
    *,
    campaign_id: str,
    occurrence: str,
    trigger: str,
    status: RunStatus = RunStatus.RUNNING,
    scheduled_at: datetime | None = None,
    late_s: float | None = None,
    note: str | None = None,
) -> tuple[Run, bool]:
    """Create the run unless it exists; returns (run, created). Safe under races."""
    now = utcnow()
    stmt = _insert(conn, runs).values(
        campaign_id=campaign_id, occurrence=occurrence, status=status, trigger=trigger,
        scheduled_at=scheduled_at, created_at=now,
        started_at=now if status == RunStatus.RUNNING else None,
        late_s=late_s, total=0, in_flight_recovered=0, note=note,
    ).on_conflict_do_nothing(index_elements=["campaign_id", "occurrence"]).returning(runs.c.id)
    created = conn.execute(stmt).first() is not None
    run = find_run(conn, campaign_id, occurrence)
    assert run is not None  # inserted or already there, in this transaction
    return run, created


def snapshot(conn: Connection, run_id: int, rows: Iterable[dict[str, Any]]) -> int:
    """Insert one pending ledger row per recipient; rows already there are left alone.

    As driver SQL (like `record`): built through SQLAlchemy's insert, each chunk's parameters
    went through its per-row bind processing, which took longer than the insert itself.
    """
    sql, dump_fields = _snapshot_sql(conn.dialect)
    pending = DeliveryStatus.PENDING.value
    total = 0
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append({**row, "fields": dump_fields(row["fields"]), "run_id": run_id,
                      "status": pending})
        if len(chunk) >= INSERT_CHUNK:
            conn.exec_driver_sql(sql, chunk)
            total += len(chunk)
            chunk = []
    if chunk:
        conn.exec_driver_sql(sql, chunk)
        total += len(chunk)
    count = conn.execute(
        select(func.count()).select_from(deliveries).where(deliveries.c.run_id == run_id)
    ).scalar_one()
    conn.execute(update(runs).where(runs.c.id == run_id).values(total=count))
    return total


def _bind(column: Any, dialect: Dialect) -> Callable[[Any], Any]:
    """What SQLAlchemy does to a value of `column` before this dialect's driver gets it."""
    return column.type.dialect_impl(dialect).bind_processor(dialect) or (lambda value: value)


def _param_style(dialect: Dialect) -> str:
    """A named parameter as this dialect's driver writes it (sqlite3 / psycopg), to format."""
    return ":{}" if dialect.name == "sqlite" else "%({})s"


@functools.lru_cache(maxsize=4)
def _snapshot_sql(dialect: Dialect) -> tuple[str, Callable[[Any], Any]]:
    """The INSERT of `snapshot` in the driver's parameter style, and the column type's own
    conversion of `fields` for this dialect (JSON text on SQLite, the driver's JSON on
    PostgreSQL), so rows read back exactly as SQLAlchemy wrote them."""
    mark = _param_style(dialect)
    columns = ("run_id", "email", "email_key", "name", "language", "list_name", "fields",
               "status")
    sql = (f"INSERT INTO {deliveries.name} ({', '.join(columns)}, attempts) "
           f"VALUES ({', '.join(mark.format(c) for c in columns)}, 0) "
           "ON CONFLICT (run_id, email_key) DO NOTHING")
    return sql, _bind(deliveries.c.fields, dialect)


def set_run_status(conn: Connection, run_id: int, status: RunStatus) -> None:
    values: dict[str, Any] = {"status": status}
    if status == RunStatus.FINISHED:
        values["finished_at"] = utcnow()
    if status == RunStatus.RUNNING:
        values["finished_at"] = None
    conn.execute(update(runs).where(runs.c.id == run_id).values(**values))


def add_recovered(conn: Connection, run_id: int, count: int) -> None:
    conn.execute(update(runs).where(runs.c.id == run_id)
                 .values(in_flight_recovered=runs.c.in_flight_recovered + count))


# --- the ledger -----------------------------------------------------------------------------


def claim(conn: Connection, run_id: int, *, worker: str, limit: int, now: datetime,
          new_message_id: Callable[[], str] | None = None) -> list[Claimed]:
    """Move up to `limit` due pending rows to sending, oldest first.

    On PostgreSQL several processes claim side by side: SKIP LOCKED hands each its own rows.
    SQLite serialises writers, so the plain sub-select is already exclusive.
    `new_message_id`: a row without a Message-ID gets one here, before its first attempt, so
    that every attempt carries the same (a receiver drops a copy it already has) and the result's
    write leaves the Message-ID index alone (a quarter of its cost on SQLite).
    """
    d = deliveries
    due = (
        select(d.c.id)
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.PENDING,
               or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now))
        .order_by(d.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    stmt = (
        update(d)
        .where(d.c.id.in_(due.scalar_subquery()))
        .values(status=DeliveryStatus.SENDING, claimed_by=worker, claimed_at=now,
                attempts=d.c.attempts + 1, updated_at=now)
        .returning(d.c.id, d.c.email, d.c.email_key, d.c.name, d.c.language, d.c.list_name,
                   d.c.fields, d.c.attempts, d.c.message_id)
    )
    rows = sorted(conn.execute(stmt), key=lambda r: r[0])
    if new_message_id is None:
        return [Claimed(*r) for r in rows]
    claimed, fresh = [], []
    for r in rows:  # the Message-ID is the last column
        if r[-1] is None:
            mid = new_message_id()
            fresh.append({"mid": mid, "id": r[0]})
            claimed.append(Claimed(*(*r[:-1], mid)))
        else:
            claimed.append(Claimed(*r))
    if fresh:
        conn.exec_driver_sql(_message_id_sql(conn.dialect), fresh)
    return claimed


@functools.lru_cache(maxsize=4)
def _message_id_sql(dialect: Dialect) -> str:
    mark = _param_style(dialect)
    return (f"UPDATE {deliveries.name} SET message_id = {mark.format('mid')} "
            f"WHERE id = {mark.format('id')}")


def record(conn: Connection, outcomes: Sequence[Outcome], *, worker: str | None = None
           ) -> None:
    """Write the results of a batch of SMTP transactions in one statement; `worker` is
    kept as the row's `sent_by` (which process made the attempt). An outcome without a
    `message_id` leaves the row's own (see `claim`).

    The one statement on the per-message path, so it goes to the driver as plain SQL: built
    through SQLAlchemy's expression and bind processing it cost 0.37-0.63 ms of CPU per write
    (1-4 rows), as driver SQL 0.16-0.26 ms (bench notes, issue 13).
    """
    if not outcomes:
        return
    sql, stamp = _record_sql(conn.dialect)
    now = stamp(utcnow())
    conn.exec_driver_sql(sql, [
        {"status": o.status.value, "code": o.smtp_code, "text": o.smtp_text[:500],
         "next": stamp(o.next_attempt_at), "sent": stamp(o.sent_at), "now": now,
         "worker": worker, "id": o.id}
        for o in outcomes
    ])
    given = [{"mid": o.message_id, "id": o.id} for o in outcomes if o.message_id is not None]
    if given:
        conn.exec_driver_sql(_message_id_sql(conn.dialect), given)


@functools.lru_cache(maxsize=4)  # one or two engines a process; tests make many
def _record_sql(dialect: Dialect) -> tuple[str, Callable[[datetime | None], Any]]:
    """The UPDATE of `record` in the driver's named-parameter style, and how this dialect
    stores a timestamp (SQLite: SQLAlchemy's text format, so comparisons keep working)."""
    mark = _param_style(dialect)
    names = {k: mark.format(k) for k in
             ("status", "code", "text", "next", "sent", "now", "worker", "id")}
    d = deliveries.name
    sql = (f"UPDATE {d} SET status = {names['status']}, smtp_code = {names['code']}, "
           f"smtp_text = {names['text']}, next_attempt_at = {names['next']}, "
           f"sent_at = {names['sent']}, updated_at = {names['now']}, claimed_by = NULL, "
           f"sent_by = {names['worker']} WHERE id = {names['id']}")
    return sql, _bind(deliveries.c.sent_at, dialect)


def release(conn: Connection, ids: Sequence[int]) -> None:
    """Claimed rows that never reached the server go back to pending, attempt not counted."""
    if not ids:
        return
    d = deliveries
    conn.execute(
        update(d).where(d.c.id.in_(list(ids)), d.c.status == DeliveryStatus.SENDING)
        .values(status=DeliveryStatus.PENDING, attempts=d.c.attempts - 1, claimed_by=None)
    )


def stuck_sending(conn: Connection, run_id: int) -> list[tuple[int, str | None, datetime | None]]:
    d = deliveries
    rows = conn.execute(
        select(d.c.id, d.c.claimed_by, d.c.claimed_at)
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.SENDING)
    ).all()
    return [(r[0], r[1], as_utc(r[2])) for r in rows]


def requeue(conn: Connection, rows: Sequence[tuple[int, str | None]]) -> int:
    """Rows caught 'sending' by a dead worker, as (id, that worker), are retried (they may have
    gone out: counted). Each only while that worker still holds it: the list was read before
    this write, and a live worker may have claimed the row since (two workers recovering at
    once, the first already sending what it requeued) - it must not be sent twice."""
    d = deliveries
    by_worker: dict[str | None, list[int]] = {}
    for delivery_id, worker in rows:
        by_worker.setdefault(worker, []).append(delivery_id)
    count = 0
    for worker, ids in by_worker.items():
        held = d.c.claimed_by.is_(None) if worker is None else d.c.claimed_by == worker
        result = conn.execute(
            update(d).where(d.c.id.in_(ids), d.c.status == DeliveryStatus.SENDING, held)
            .values(status=DeliveryStatus.PENDING, claimed_by=None, next_attempt_at=None)
        )
        count += int(result.rowcount)
    return count


def next_attempt(conn: Connection, run_id: int) -> datetime | None:
    d = deliveries
    value = conn.execute(
        select(func.min(d.c.next_attempt_at))
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.PENDING)
    ).scalar()
    return as_utc(value)


def due_count(conn: Connection, run_id: int, now: datetime) -> int:
    """Pending rows that may be sent now (not waiting for a retry)."""
    d = deliveries
    return int(conn.execute(
        select(func.count()).select_from(d)
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.PENDING,
               or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now))
    ).scalar_one())


def status_counts(conn: Connection, run_id: int) -> dict[str, int]:
    d = deliveries
    rows = conn.execute(
        select(d.c.status, func.count()).where(d.c.run_id == run_id).group_by(d.c.status)
    ).all()
    counts = {s.value: 0 for s in DeliveryStatus}
    counts.update({str(status): int(n) for status, n in rows})
    return counts


def bounced_count(conn: Connection, run_id: int) -> int:
    """Recipients of a run whose mail bounced: rows returned later as a hard bounce (status
    `bounced`, mailbox.py), and rows the relay refused with a 5xx for an address it then
    suppressed for bouncing (5.1.x during the run). `status`, `report` and /metrics agree."""
    d, s = deliveries, suppressions
    refused = select(s.c.id).where(
        s.c.email_key == d.c.email_key, s.c.reason.like("%bounce%"),
        or_(s.c.list_name == GLOBAL, s.c.list_name == d.c.list_name)).exists()
    return int(conn.execute(
        select(func.count()).select_from(d).where(d.c.run_id == run_id, or_(
            d.c.status == DeliveryStatus.BOUNCED,
            and_(d.c.status == DeliveryStatus.FAILED, d.c.smtp_code >= 500, refused)))
    ).scalar() or 0)


def send_window(conn: Connection, run_id: int) -> tuple[datetime | None, datetime | None]:
    d = deliveries
    first, last = conn.execute(
        select(func.min(d.c.sent_at), func.max(d.c.sent_at)).where(d.c.run_id == run_id)
    ).one()
    return as_utc(first), as_utc(last)


def first_sent(conn: Connection, campaign_id: str) -> datetime | None:
    """When the campaign's first message was delivered; None if none was."""
    d = deliveries
    value = conn.execute(
        select(func.min(d.c.sent_at)).select_from(d.join(runs, runs.c.id == d.c.run_id))
        .where(runs.c.campaign_id == campaign_id, d.c.status.in_(DELIVERED))
    ).scalar()
    return as_utc(value)


def sent_campaigns(conn: Connection) -> list[tuple[str, datetime]]:
    """Every campaign with a delivered message, newest first, with its first delivery."""
    d = deliveries
    first = func.min(d.c.sent_at)
    rows = conn.execute(
        select(runs.c.campaign_id, first).select_from(d.join(runs, runs.c.id == d.c.run_id))
        .where(d.c.status.in_(DELIVERED)).group_by(runs.c.campaign_id)
        .order_by(first.desc())
    ).all()
    return [(str(r[0]), as_utc(r[1]) or utcnow()) for r in rows]


def sent_by(conn: Connection, run_id: int) -> dict[str, int]:
    """Rows sent (or bounced later) per worker that sent them, busiest first."""
    d = deliveries
    rows = conn.execute(
        select(d.c.sent_by, func.count())
        .where(d.c.run_id == run_id, d.c.sent_by.is_not(None),
               d.c.status.in_([DeliveryStatus.SENT, DeliveryStatus.BOUNCED]))
        .group_by(d.c.sent_by).order_by(func.count().desc(), d.c.sent_by)
    ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def failures_by_code(conn: Connection, run_id: int) -> list[tuple[int | None, int, str]]:
    d = deliveries
    rows = conn.execute(
        select(d.c.smtp_code, func.count(), func.min(d.c.smtp_text))
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.FAILED)
        .group_by(d.c.smtp_code).order_by(func.count().desc())
    ).all()
    return [(r[0], int(r[1]), str(r[2] or "")) for r in rows]


def failed_rows(conn: Connection, run_id: int, *, after_id: int = 0, limit: int = 1000
                ) -> list[tuple[int, str, int | None, str]]:
    d = deliveries
    rows = conn.execute(
        select(d.c.id, d.c.email, d.c.smtp_code, d.c.smtp_text)
        .where(d.c.run_id == run_id, d.c.status == DeliveryStatus.FAILED, d.c.id > after_id)
        .order_by(d.c.id).limit(limit)
    ).all()
    return [(r[0], r[1], r[2], r[3] or "") for r in rows]


def retry_failed(conn: Connection, run_id: int) -> int:
    """Failed rows get another full set of attempts, except addresses now suppressed."""
    d, s = deliveries, suppressions
    suppressed = select(s.c.id).where(
        s.c.email_key == d.c.email_key, or_(s.c.list_name == GLOBAL, s.c.list_name == d.c.list_name)
    ).exists()
    result = conn.execute(
        update(d).where(d.c.run_id == run_id, d.c.status == DeliveryStatus.FAILED, ~suppressed)
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=None)
    )
    return int(result.rowcount)


# --- suppressions ---------------------------------------------------------------------------


def suppress(
    conn: Connection, email_key: str, *, reason: str, source: str = "", detail: str = "",
    list_name: str = GLOBAL,
) -> bool:
    stmt = _insert(conn, suppressions).values(
        email_key=email_key, list_name=list_name, reason=reason[:32], source=source[:120],
        detail=detail[:500], created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["email_key", "list_name"]).returning(suppressions.c.id)
    return conn.execute(stmt).first() is not None


def unsuppress(conn: Connection, email_key: str, *, list_name: str | None = None) -> int:
    s = suppressions
    cond = s.c.email_key == email_key
    if list_name is not None:
        cond = and_(cond, s.c.list_name == list_name)
    return int(conn.execute(s.delete().where(cond)).rowcount)


def suppression_digests(conn: Connection) -> tuple[Seen, bool]:
    """A digest of every suppressed key (seen.py: about 25 bytes a row, however long the
    suppression list), and whether any key is an erased address's hash."""
    table, erased = Seen(), False
    # On the statement, not the connection: a connection keeps its options for what follows.
    rows = conn.execute(select(suppressions.c.email_key).execution_options(yield_per=5000))
    for (key,) in rows:
        table.add(digest(key), 0)
        erased = erased or key.startswith(HASH_PREFIX)
    return table, erased


def is_suppressed(suppressed: Mapping[str, Collection[str]], key: str, list_name: str) -> bool:
    """Is the address `key` suppressed for `list_name`, given {email_key: its lists ("*" =
    all)}: by its own key, or - once erased, when only its hash is kept - by its hash."""
    for k in (key, hashed_key(key)):
        lists = suppressed.get(k)
        if lists and (GLOBAL in lists or list_name in lists):
            return True
    return False


def suppressed_among(conn: Connection, pairs: Sequence[tuple[str, str]]) -> set[str]:
    """Which of these (email_key, list) pairs are suppressed now (erased ones by their hash)."""
    if not pairs:
        return set()
    keys = {k for k, _ in pairs}
    found: dict[str, set[str]] = {}
    for key, list_name in conn.execute(
            select(suppressions.c.email_key, suppressions.c.list_name)
            .where(suppressions.c.email_key.in_(keys | {hashed_key(k) for k in keys}))):
        found.setdefault(key, set()).add(list_name)
    return {k for k, name in pairs if is_suppressed(found, k, name)}


def list_suppressions(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(suppressions).order_by(suppressions.c.created_at))
    return [dict(r._mapping) for r in rows]


# --- returned mail (mailbox.py) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A ledger row as returned mail is matched to it."""

    id: int
    run_id: int
    campaign_id: str
    email: str
    email_key: str
    list_name: str
    status: str
    message_id: str | None


def _delivery_query() -> Any:
    d = deliveries
    return select(d.c.id, d.c.run_id, runs.c.campaign_id, d.c.email, d.c.email_key,
                  d.c.list_name, d.c.status, d.c.message_id).join(runs, runs.c.id == d.c.run_id)


def delivery(conn: Connection, delivery_id: int) -> Delivery | None:
    row = conn.execute(_delivery_query().where(deliveries.c.id == delivery_id)).first()
    return Delivery(*row) if row else None


def delivery_by_message_id(conn: Connection, message_id: str) -> Delivery | None:
    row = conn.execute(_delivery_query().where(deliveries.c.message_id == message_id)
                       .order_by(deliveries.c.id).limit(1)).first()
    return Delivery(*row) if row else None


def latest_delivery(conn: Connection, *, campaign_id: str, email_key: str, list_name: str
                    ) -> Delivery | None:
    """The newest row that mailed this address from this list in this campaign."""
    d = deliveries
    row = conn.execute(_delivery_query().where(
        runs.c.campaign_id == campaign_id, d.c.email_key == email_key,
        d.c.list_name == list_name, d.c.status.in_(DELIVERED)).order_by(d.c.id.desc()).limit(1)
    ).first()
    return Delivery(*row) if row else None


def was_mailed(conn: Connection, email_keys: Collection[str]) -> bool:
    """Did any run mail one of these addresses?"""
    if not email_keys:
        return False
    return conn.execute(select(deliveries.c.id).where(
        deliveries.c.email_key.in_(list(email_keys))).limit(1)).first() is not None


def mark_bounced(conn: Connection, delivery_id: int, *, code: int | None, reason: str) -> bool:
    """A sent row came back as a hard bounce; False if it was already marked (or not sent)."""
    d = deliveries
    return bool(conn.execute(
        update(d).where(d.c.id == delivery_id, d.c.status == DeliveryStatus.SENT)
        .values(status=DeliveryStatus.BOUNCED, smtp_code=code, smtp_text=reason[:500],
                updated_at=utcnow())).rowcount)


def record_returned(conn: Connection, *, mail_key: str, source: str, kind: ReturnedKind,
                    matched_by: str = "", run_id: int | None = None,
                    delivery_id: int | None = None, list_name: str = "", action: str = "",
                    detail: str = "", now: datetime | None = None) -> bool:
    """Note a mail as read; False if it was read before (then nothing else may happen)."""
    stmt = _insert(conn, returned_mails).values(
        mail_key=mail_key, received_at=now or utcnow(), source=source[:16], kind=kind,
        matched_by=matched_by, run_id=run_id, delivery_id=delivery_id,
        list_name=list_name[:80], action=action[:32], detail=detail[:500],
    ).on_conflict_do_nothing(index_elements=["mail_key"]).returning(returned_mails.c.id)
    return conn.execute(stmt).first() is not None


def set_returned_action(conn: Connection, mail_key: str, action: str) -> None:
    conn.execute(update(returned_mails).where(returned_mails.c.mail_key == mail_key)
                 .values(action=action[:32]))


def soft_bounces(conn: Connection, email_key: str, *, since: datetime) -> int:
    """Soft bounces of mail to this address read since `since` (any run, any list)."""
    r, d = returned_mails, deliveries
    return int(conn.execute(
        select(func.count()).select_from(r.join(d, d.c.id == r.c.delivery_id))
        .where(d.c.email_key == email_key, r.c.kind == ReturnedKind.SOFT_BOUNCE,
               r.c.received_at >= since)).scalar() or 0)


def returned_counts(conn: Connection, run_id: int) -> dict[str, int]:
    """Returned mail matched to a run, by kind (every kind present, 0 when none)."""
    r = returned_mails
    rows = conn.execute(select(r.c.kind, func.count()).where(r.c.run_id == run_id)
                        .group_by(r.c.kind)).all()
    counts = {k.value: 0 for k in ReturnedKind}
    counts.update({str(kind): int(n) for kind, n in rows})
    return counts


def recent_returned(conn: Connection, *, limit: int = 50, kinds: Collection[str] = ()
                    ) -> list[dict[str, Any]]:
    """The newest returned mails with the address and campaign of their delivery, if any."""
    r, d = returned_mails, deliveries
    stmt = (select(r.c.id, r.c.received_at, r.c.source, r.c.kind, r.c.matched_by, r.c.run_id,
                   r.c.list_name, r.c.action, r.c.detail, d.c.email, runs.c.campaign_id)
            .select_from(r.outerjoin(d, d.c.id == r.c.delivery_id)
                         .outerjoin(runs, runs.c.id == r.c.run_id))
            .order_by(r.c.id.desc()).limit(limit))
    if kinds:
        stmt = stmt.where(r.c.kind.in_(list(kinds)))
    return [{**dict(row._mapping), "received_at": as_utc(row.received_at)}
            for row in conn.execute(stmt)]
