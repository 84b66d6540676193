"""Subscribers of the managed lists and the consent log: every query is a named function here.

A *managed* list (settings.web.subscribe_lists, e.g. `newsletter`) lives in the store: people
join it by double opt-in on the web page (or staff import them) and leave it by one click. A
*file* list under lists/ is kept by staff; leaving it is recorded as a list-scoped suppression.

The law behind the shape (DSG-EKD, the church's equivalent of the GDPR; UWG §7 (2) no. 2):
consent must be provable — who, when, which form text, which IP, when confirmed (BGH I ZR
164/09) — so every step appends a row to `consent_events`; withdrawal must be as easy as
consent; a person may see everything stored (`show`) and have it erased (`forget`), after which
only a hashed key remains so that a later import cannot silently add them again.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from .audience import NAME_MAX, Recipient, email_key
from .config import Settings
from .redact import redact_addresses
from .store import Store
from .store import queries as q
from .store.queries import HASH_PREFIX, hashed_key
from .store.subscriber_tables import (
    ConsentEvent,
    MemberStatus,
    confirm_nonces,
    consent_events,
    memberships,
    subscribers,
)
from .store.tables import DeliveryStatus, deliveries, runs, suppressions

MEMBER_CHUNK = 1000  # rows a managed list is read in (server-side cursor on PostgreSQL)

ADDRESS_MAX = 254  # RFC 5321 §4.5.3.1.3: a forward-path holds at most 256 octets incl. <>
CONFIRM_MAILS_PER_DAY = 3  # per address: no subscription bombing of a third party's inbox
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
_MARKUP = re.compile(r"[<>]")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a consent event comes from: kept as proof (IP and user agent only for web)."""

    source: str
    ip: str = ""
    user_agent: str = ""
    form_version: str = ""
    form_text: str = ""


def is_managed(settings: Settings, list_name: str) -> bool:
    return list_name in settings.web.subscribe_lists


def clean_name(raw: str) -> str:
    """A display name as typed, or ValueError: no line breaks, no markup, not overlong."""
    if _CONTROL.search(raw):
        raise ValueError("the name contains a line break or a control character")
    name = " ".join(raw.split())
    if _MARKUP.search(name):
        raise ValueError("the name must not contain < or >")
    if len(name) > NAME_MAX:
        raise ValueError(f"the name is longer than {NAME_MAX} characters")
    return name


def _utc(now: datetime | None) -> datetime:
    return now or q.utcnow()


# --- rows -----------------------------------------------------------------------------------


def find_subscriber(conn: Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute(select(subscribers).where(subscribers.c.email_key == key)).first()
    return dict(row._mapping) if row else None


def statuses(conn: Connection, subscriber_id: int) -> dict[str, str]:
    rows = conn.execute(select(memberships.c.list_name, memberships.c.status)
                        .where(memberships.c.subscriber_id == subscriber_id))
    return {name: status for name, status in rows}


def record_event(conn: Connection, key: str, event: ConsentEvent, *, origin: Origin,
                 list_name: str = "", detail: str = "", now: datetime | None = None) -> None:
    conn.execute(insert(consent_events).values(
        email_key=key, event=event, list_name=list_name, at=_utc(now),
        source=origin.source[:120], form_version=origin.form_version[:40],
        form_text=origin.form_text, ip=origin.ip[:64], user_agent=origin.user_agent[:300],
        detail=detail[:500],
    ))


def _ensure_subscriber(conn: Connection, *, email: str, name: str, language: str,
                       now: datetime) -> int:
    """The subscriber's id; a new row takes name and language, an existing one keeps its own
    (a stranger typing someone's address into the form must not rename them)."""
    key = email_key(email)
    found = find_subscriber(conn, key)
    if found is not None:
        return int(found["id"])
    stmt = q._insert(conn, subscribers).values(
        email=email, email_key=key, name=name, language=language, created_at=now, updated_at=now,
    ).on_conflict_do_nothing(index_elements=["email_key"])
    conn.execute(stmt)
    found = find_subscriber(conn, key)
    if found is None:  # pragma: no cover - inserted or present in this transaction
        raise RuntimeError(f"subscriber row for {key} vanished")
    return int(found["id"])


def _set_status(conn: Connection, subscriber_id: int, list_name: str, status: MemberStatus, *,
                proof: str, now: datetime) -> None:
    stmt = q._insert(conn, memberships).values(
        subscriber_id=subscriber_id, list_name=list_name, status=status, proof=proof,
        updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=["subscriber_id", "list_name"],
        set_={"status": status, "proof": proof, "updated_at": now})
    conn.execute(stmt)


def _lift_withdrawals(conn: Connection, key: str) -> None:
    """A new, confirmed consent outranks an earlier 'unsubscribe from all' or erasure."""
    s = suppressions
    conn.execute(delete(s).where(or_(
        and_(s.c.email_key == key, s.c.list_name == q.GLOBAL, s.c.reason == "unsubscribed"),
        and_(s.c.email_key == hashed_key(key), s.c.reason == "erased"),
    )))


# --- double opt-in ------------------------------------------------------------------------


def confirmations_sent(conn: Connection, key: str, *, since: datetime) -> int:
    return int(conn.execute(
        select(func.count()).select_from(confirm_nonces)
        .where(confirm_nonces.c.email_key == key, confirm_nonces.c.created_at >= since)
    ).scalar_one())


def request_subscription(
    conn: Connection, *, email: str, name: str, language: str, lists: Sequence[str],
    origin: Origin, now: datetime | None = None, per_day: int = CONFIRM_MAILS_PER_DAY,
) -> str | None:
    """First half of the double opt-in: pending memberships, a consent event, a nonce.

    Returns the nonce for the confirmation link, or None when this address already got
    `per_day` confirmation mails in the last 24 hours (then nothing is written).
    """
    now = _utc(now)
    key = email_key(email)
    if confirmations_sent(conn, key, since=now - timedelta(days=1)) >= per_day:
        return None
    sub_id = _ensure_subscriber(conn, email=email, name=name, language=language, now=now)
    current = statuses(conn, sub_id)
    for list_name in lists:
        if current.get(list_name) != MemberStatus.SUBSCRIBED:
            _set_status(conn, sub_id, list_name, MemberStatus.PENDING, proof="web", now=now)
        record_event(conn, key, ConsentEvent.SUBSCRIBED, origin=origin, list_name=list_name,
                     now=now)
    nonce = secrets.token_urlsafe(16)
    conn.execute(insert(confirm_nonces).values(nonce=nonce, email_key=key, lists=list(lists),
                                               created_at=now))
    return nonce


@dataclass(frozen=True, slots=True)
class Confirmation:
    status: str  # confirmed | already | unknown
    lists: list[str] = field(default_factory=list)
    language: str = ""


def confirm(conn: Connection, *, email: str, nonce: str, origin: Origin,
            now: datetime | None = None) -> Confirmation:
    """Second half: the link was opened. Single use; a second click is harmless."""
    now = _utc(now)
    key = email_key(email)
    row = conn.execute(select(confirm_nonces).where(confirm_nonces.c.nonce == nonce)).first()
    sub = find_subscriber(conn, key)
    if row is None or row.email_key != key or sub is None:
        return Confirmation("unknown")
    lists = [str(x) for x in row.lists]
    claimed = conn.execute(
        update(confirm_nonces)
        .where(confirm_nonces.c.nonce == nonce, confirm_nonces.c.used_at.is_(None))
        .values(used_at=now)
    ).rowcount
    if not claimed:
        return Confirmation("already", lists, sub["language"])
    for list_name in lists:
        _set_status(conn, int(sub["id"]), list_name, MemberStatus.SUBSCRIBED, proof="web",
                    now=now)
        record_event(conn, key, ConsentEvent.CONFIRMED, origin=origin, list_name=list_name,
                     now=now)
    _lift_withdrawals(conn, key)
    return Confirmation("confirmed", lists, sub["language"])


# --- withdrawal and preferences -------------------------------------------------------------


def is_erased(conn: Connection, key: str) -> bool:
    """The address was erased (`forget`): an old link may still carry it, but nothing may
    store it in the clear again."""
    h = hashed_key(key)
    return conn.execute(select(suppressions.c.id).where(
        suppressions.c.email_key == h, suppressions.c.list_name == q.GLOBAL).limit(1)
    ).first() is not None


def _known_key(conn: Connection, email: str) -> str:
    """The key to act on: the address, or only its hash once it was erased."""
    key = email_key(email)
    return hashed_key(key) if is_erased(conn, key) else key


def unsubscribe(conn: Connection, settings: Settings, *, email: str, list_name: str,
                origin: Origin, now: datetime | None = None, detail: str = "") -> bool:
    """Leave one list (RFC 8058 one-click lands here; so do complaints and mailto
    unsubscribes, with their evidence in `detail`). Returns False if already done."""
    now = _utc(now)
    key = _known_key(conn, email)
    sub = find_subscriber(conn, key) if is_managed(settings, list_name) else None
    if sub is not None:
        if statuses(conn, int(sub["id"])).get(list_name) == MemberStatus.UNSUBSCRIBED:
            return False
        _set_status(conn, int(sub["id"]), list_name, MemberStatus.UNSUBSCRIBED,
                    proof="web", now=now)
    elif not q.suppress(conn, key, reason="unsubscribed", source=origin.source,
                        list_name=list_name, detail=detail):
        return False  # a file list (or a managed address no longer stored): list suppression
    record_event(conn, key, ConsentEvent.UNSUBSCRIBED, origin=origin, list_name=list_name,
                 detail=detail, now=now)
    return True


def unsubscribe_all(conn: Connection, settings: Settings, *, email: str, origin: Origin,
                    now: datetime | None = None) -> None:
    """Every managed list, and a global suppression that also covers the file lists."""
    now = _utc(now)
    key = _known_key(conn, email)
    sub = find_subscriber(conn, key)
    if sub is not None:
        for list_name, status in statuses(conn, int(sub["id"])).items():
            if status != MemberStatus.UNSUBSCRIBED:
                _set_status(conn, int(sub["id"]), list_name, MemberStatus.UNSUBSCRIBED,
                            proof="web", now=now)
    if q.suppress(conn, key, reason="unsubscribed", source=origin.source, list_name=q.GLOBAL):
        record_event(conn, key, ConsentEvent.UNSUBSCRIBED, origin=origin, list_name=q.GLOBAL,
                     now=now)


def list_suppressed(conn: Connection, key: str) -> set[str]:
    rows = conn.execute(select(suppressions.c.list_name).where(suppressions.c.email_key == key))
    return {r[0] for r in rows}


def set_preferences(conn: Connection, settings: Settings, *, email: str, language: str,
                    wanted: set[str], offered: Sequence[str], origin: Origin,
                    now: datetime | None = None) -> None:
    """Apply the preferences form. The link came by mail, so it proves the mailbox: a list
    ticked here is subscribed at once (no second confirmation mail)."""
    now = _utc(now)
    key = email_key(email)
    if is_erased(conn, key):
        return  # an old link of an erased address: it must not bring the address back
    sub = find_subscriber(conn, key)
    if sub is None and wanted & set(settings.web.subscribe_lists):
        _ensure_subscriber(conn, email=email, name="", language=language, now=now)
        sub = find_subscriber(conn, key)
    if sub is not None and language and language != sub["language"]:
        conn.execute(update(subscribers).where(subscribers.c.id == sub["id"])
                     .values(language=language, updated_at=now))
        record_event(conn, key, ConsentEvent.PREFERENCES, origin=origin,
                     detail=f"language {sub['language'] or '-'} -> {language}", now=now)
    current = statuses(conn, int(sub["id"])) if sub is not None else {}
    suppressed = list_suppressed(conn, key)
    for list_name in offered:
        want = list_name in wanted
        if is_managed(settings, list_name) and sub is not None:
            sub_id = int(sub["id"])
            if want and current.get(list_name) != MemberStatus.SUBSCRIBED:
                _set_status(conn, sub_id, list_name, MemberStatus.SUBSCRIBED,
                            proof="preferences", now=now)
                record_event(conn, key, ConsentEvent.CONFIRMED, origin=origin,
                             list_name=list_name, now=now)
            elif not want and current.get(list_name) in (MemberStatus.SUBSCRIBED,
                                                          MemberStatus.PENDING):
                unsubscribe(conn, settings, email=email, list_name=list_name, origin=origin,
                            now=now)
        elif want and list_name in suppressed:
            q.unsuppress(conn, key, list_name=list_name)
            record_event(conn, key, ConsentEvent.CONFIRMED, origin=origin, list_name=list_name,
                         detail="stays on the file list", now=now)
        elif not want and list_name not in suppressed:
            unsubscribe(conn, settings, email=email, list_name=list_name, origin=origin, now=now)
    if wanted:
        _lift_withdrawals(conn, key)


# --- the audience of a managed list -------------------------------------------------------


def members(conn: Connection, list_name: str) -> list[Recipient]:
    """Confirmed, subscribed members of a managed list, in the order they joined."""
    return [recipient for _, recipient in iter_members(conn, list_name)]


def iter_members(conn: Connection, list_name: str) -> Iterator[tuple[int, Recipient]]:
    """`members` as a stream, a chunk of rows at a time, each with its subscriber id."""
    s, m = subscribers, memberships
    # On the statement, not the connection: a connection keeps its options for what follows.
    rows = conn.execute(
        select(s.c.id, s.c.email, s.c.name, s.c.language)
        .join(m, m.c.subscriber_id == s.c.id)
        .where(m.c.list_name == list_name, m.c.status == MemberStatus.SUBSCRIBED)
        .order_by(s.c.id)
        .execution_options(yield_per=MEMBER_CHUNK)
    )
    for sid, e, n, lang in rows:
        yield sid, Recipient(email=e, name=n, language=lang, list=list_name)


def member_count(conn: Connection, list_name: str) -> int:
    m = memberships
    return int(conn.execute(select(func.count()).select_from(m).where(
        m.c.list_name == list_name, m.c.status == MemberStatus.SUBSCRIBED)).scalar_one())


@dataclass(frozen=True)
class StoredList:
    """A managed list as an audience source: read from the store when the audience reaches
    it, a chunk at a time, so no list is held whole (audience.ManagedList)."""

    store: Store
    name: str

    def members(self) -> Iterator[tuple[int, Recipient]]:
        with self.store.engine.connect() as conn:
            yield from iter_members(conn, self.name)

    def key_of(self, member_id: int) -> str:
        """Rare: an address whose digest was seen before is compared by its key."""
        with self.store.engine.connect() as conn:
            key = conn.execute(select(subscribers.c.email_key)
                               .where(subscribers.c.id == member_id)).scalar()
        return key or ""


def erased_keys(conn: Connection) -> set[str]:
    rows = conn.execute(select(suppressions.c.email_key)
                        .where(suppressions.c.email_key.startswith(HASH_PREFIX)))
    return {r[0] for r in rows}


# --- staff import and export ----------------------------------------------------------------


@dataclass
class Imported:
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (address, why)
    to_confirm: list[tuple[Recipient, str]] = field(default_factory=list)  # (who, nonce)


def import_members(conn: Connection, recipients: Iterable[Recipient], *, list_name: str,
                   consent_source: str | None, send_confirmation: bool,
                   now: datetime | None = None) -> Imported:
    """Add a file of addresses to a managed list, in one transaction.

    With `consent_source` (where and how they agreed, e.g. "Anmeldeliste Straßenfest
    2025-06-14") they are subscribed and the source is kept as proof. Without it they stay
    `pending` (marked `unconfirmed`), and only get a confirmation mail if asked to. Nobody who
    left the list, unsubscribed from everything or was erased is added back.
    """
    now = _utc(now)
    out = Imported()
    erased = erased_keys(conn)
    source = f"import: {consent_source}" if consent_source else "import (no proof of consent)"
    origin = Origin(source=source[:120], form_text=consent_source or "")
    for r in recipients:
        key = r.key
        why = _import_refusal(conn, key, list_name, erased)
        if why == "already":
            out.already.append(r.email)
            continue
        if why:
            out.skipped.append((r.email, why))
            continue
        sub_id = _ensure_subscriber(conn, email=r.email, name=r.name, language=r.language,
                                    now=now)
        status = MemberStatus.SUBSCRIBED if consent_source else MemberStatus.PENDING
        _set_status(conn, sub_id, list_name, status,
                    proof="import" if consent_source else "unconfirmed", now=now)
        record_event(conn, key, ConsentEvent.IMPORTED, origin=origin, list_name=list_name,
                     now=now)
        out.added.append(r.email)
        if send_confirmation and not consent_source:
            nonce = secrets.token_urlsafe(16)
            conn.execute(insert(confirm_nonces).values(nonce=nonce, email_key=key,
                                                       lists=[list_name], created_at=now))
            out.to_confirm.append((r, nonce))
    return out


def _import_refusal(conn: Connection, key: str, list_name: str, erased: set[str]) -> str:
    if hashed_key(key) in erased:
        return "erased at their request: only they can subscribe again"
    suppressed = list_suppressed(conn, key)
    if q.GLOBAL in suppressed or list_name in suppressed:
        return "suppressed (unsubscribed from everything or bounced)"
    sub = find_subscriber(conn, key)
    status = statuses(conn, int(sub["id"])).get(list_name) if sub else None
    if status == MemberStatus.UNSUBSCRIBED:
        return "unsubscribed from this list earlier"
    if status == MemberStatus.SUBSCRIBED:
        return "already"
    return ""


def export_members(conn: Connection, *, list_name: str | None = None) -> list[dict[str, Any]]:
    s, m = subscribers, memberships
    stmt = (select(s.c.email, s.c.name, s.c.language, m.c.list_name, m.c.status, m.c.proof,
                   m.c.updated_at)
            .join(m, m.c.subscriber_id == s.c.id).order_by(m.c.list_name, s.c.id))
    if list_name is not None:
        stmt = stmt.where(m.c.list_name == list_name)
    return [{**dict(r._mapping), "updated_at": q.as_utc(r.updated_at)} for r in conn.execute(stmt)]


# --- the rights of access and erasure -----------------------------------------------------


def show(conn: Connection, email: str) -> dict[str, Any]:
    """Everything stored about an address (DSG-EKD § 19, as GDPR Art. 15)."""
    key = email_key(email)
    keys = [key, hashed_key(key)]
    sub = find_subscriber(conn, key)
    events = conn.execute(select(consent_events).where(consent_events.c.email_key.in_(keys))
                          .order_by(consent_events.c.id))
    supp = conn.execute(select(suppressions).where(suppressions.c.email_key.in_(keys)))
    mails = conn.execute(
        select(runs.c.campaign_id, runs.c.occurrence, deliveries.c.list_name,
               deliveries.c.status, deliveries.c.sent_at, deliveries.c.message_id)
        .join(runs, runs.c.id == deliveries.c.run_id)
        .where(deliveries.c.email_key == key).order_by(deliveries.c.id))
    nonces = conn.execute(select(confirm_nonces.c.lists, confirm_nonces.c.created_at,
                                 confirm_nonces.c.used_at)
                          .where(confirm_nonces.c.email_key == key))
    return {
        "email_key": key,
        "subscriber": sub,
        "memberships": (_rows(conn.execute(select(memberships).where(
            memberships.c.subscriber_id == sub["id"]))) if sub else []),
        "consent_events": _rows(events),
        "suppressions": _rows(supp),
        "confirmation_mails": _rows(nonces),
        "deliveries": _rows(mails),
    }


def _rows(result: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


def forget(conn: Connection, *, email: str, now: datetime | None = None) -> dict[str, int]:
    """Erase the personal data of an address (DSG-EKD § 21, as GDPR Art. 17).

    Deleted: subscriber row, memberships, pending confirmations. Kept without the address:
    the consent log (as proof; IP and user agent blanked), suppressions and the delivery
    ledger re-keyed to sha256 — plus a global hashed suppression, so the address can neither
    be imported again silently nor mailed from a file list (see sending.audience).
    """
    now = _utc(now)
    key = email_key(email)
    h = hashed_key(key)
    counts: dict[str, int] = {}
    sub = find_subscriber(conn, key)
    if sub is not None:
        conn.execute(delete(memberships).where(memberships.c.subscriber_id == sub["id"]))
        conn.execute(delete(subscribers).where(subscribers.c.id == sub["id"]))
    counts["subscriber"] = int(sub is not None)
    counts["confirmations"] = conn.execute(
        delete(confirm_nonces).where(confirm_nonces.c.email_key == key)).rowcount
    counts["consent_events"] = conn.execute(
        update(consent_events).where(consent_events.c.email_key == key)
        .values(email_key=h, ip="", user_agent="", detail="")).rowcount
    counts["suppressions"] = _rekey_suppressions(conn, key, h)
    counts["deliveries"] = _anonymise_deliveries(conn, key, h, now)
    q.suppress(conn, h, reason="erased", source="forget", list_name=q.GLOBAL)
    record_event(conn, h, ConsentEvent.ERASED, origin=Origin(source="forget"), list_name="*",
                 now=now)
    return counts


def _rekey_suppressions(conn: Connection, key: str, h: str) -> int:
    rows = _rows(conn.execute(select(suppressions).where(suppressions.c.email_key == key)))
    conn.execute(delete(suppressions).where(suppressions.c.email_key == key))
    for r in rows:
        q.suppress(conn, h, reason=r["reason"], source=r["source"], list_name=r["list_name"])
    return len(rows)


def _anonymise_deliveries(conn: Connection, key: str, h: str, now: datetime) -> int:
    d = deliveries
    conn.execute(update(d).where(d.c.email_key == key, d.c.status.in_(
        [DeliveryStatus.PENDING, DeliveryStatus.SENDING])).values(
        status=DeliveryStatus.FAILED, smtp_text="not sent: the address was erased",
        updated_at=now))
    # A relay's refusal often quotes the address ("550 <anna@…>: no such user").
    quoted = conn.execute(select(d.c.id, d.c.smtp_text).where(
        d.c.email_key == key, d.c.smtp_text.contains("@"))).all()
    for row_id, text in quoted:
        conn.execute(update(d).where(d.c.id == row_id).values(
            smtp_text=redact_addresses(text)))
    return int(conn.execute(update(d).where(d.c.email_key == key).values(
        email=h[:320], email_key=h, name="", fields={})).rowcount)


# --- the mailto: variant of List-Unsubscribe (RFC 2369) --------------------------------------

MAILTO_SUBJECT = re.compile(r"^\s*unsubscribe\s+([A-Za-z0-9_.\-]+)\s*$", re.I)


def mailto_token(subject: str) -> str | None:
    """The token in the Subject of a mail to `unsubscribe_mailto`: compose.py writes
    `mailto:{unsubscribe_mailto}?subject=unsubscribe%20{token}`. The inbox processing
    (bounces.py) reads that mailbox and calls `unsubscribe` with Origin("mailto")."""
    match = MAILTO_SUBJECT.match(subject)
    return match.group(1) if match else None
