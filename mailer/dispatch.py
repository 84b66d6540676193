"""A run: snapshot the audience into the ledger, claim, send, retry, finish.

The checkpoint moves only after the server said 250: a row becomes `sent` when the result of
its SMTP transaction is committed, and a worker starts its next transaction only after that
commit (group commit: concurrent results share one write). So after a crash at most the
transactions in flight — at most `pool_size` — can have reached the server without being
recorded; those rows are caught `sending`, retried, and counted in `in_flight_recovered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, Protocol

import jinja2
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from .audience import Recipient
from .compose import Composer, message_id
from .config import Settings
from .errors import AuthenticationFailure, LedgerError
from .redact import redact_addresses
from .relay import open_transport
from .render import Rendition
from .store import DeliveryStatus, RunStatus, Store
from .store import queries as q
from .store.db import checkpoint, is_busy, nowait_engine
from .store.subscriber_tables import ConsentEvent
from .subscribers import Origin, record_event
from .tokens import Tokens
from .transport import DeliveryResult, Outcome, Outgoing, Transport

log = logging.getLogger("mailer.dispatch")

LEASE_S = 600.0  # a claim by another machine's worker older than this is abandoned
IDLE_POLL_S = 1.0
FIRST_IDLE_POLL_S = 0.05  # the first look at rows another worker holds; doubled up to IDLE_POLL_S
MAX_BACKOFF_S = 6 * 3600.0
# SQLite: ledger commits on the event loop between two checkpoints of the WAL in a thread
# (~3 pages a commit: the WAL stays near 1 MB, under the 1,000 pages at which a commit on
# another connection would checkpoint it).
CHECKPOINT_EVERY = 64


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def is_stale(claimed_by: str | None, claimed_at: datetime | None, now: datetime, *, me: str,
             live: Collection[str]) -> bool:
    """May another worker take over a row claimed by `claimed_by` (is that worker gone)?

    A worker on this machine can be asked: the claim of a running one is never stale, however
    long its transactions take (a slow relay, a rate limit); the claim of a process that has
    ended is. `live` holds the ids of the dispatchers running in this process. A worker on
    another machine cannot be asked: its claim is stale once it is older than the lease.
    """
    if not claimed_by:
        return True
    host, _, rest = claimed_by.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        return not _running_here(claimed_by, int(pid_text), me=me, live=live)
    return claimed_at is None or (now - claimed_at).total_seconds() > LEASE_S


def _running_here(worker: str, pid: int, *, me: str, live: Collection[str]) -> bool:
    if worker == me:
        return True
    if pid == os.getpid():
        return worker in live  # a dispatcher of this process (or of an earlier one, same pid)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def backoff_s(attempts: int, base_s: float) -> float:
    """The wait before the next attempt after `attempts` tries: base × 2^(attempts-1), at most
    six hours, with ±20 % jitter so that the retries of a batch do not march in step."""
    delay = base_s * 2.0 ** min(max(attempts - 1, 0), 30)
    return min(delay, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)


def retry_note(pending: int, due: datetime | None, tz: tzinfo) -> str:
    """The progress note while every pending row waits for its retry."""
    local = due.astimezone(tz).strftime("%H:%M:%S") if due else "now"
    return f"waiting for {pending} retries until {local}"


class Progress(Protocol):
    def update(self, *, done: int, total: int, note: str = "") -> None: ...


class NoProgress:
    def update(self, *, done: int, total: int, note: str = "") -> None:
        pass


@dataclass
class RunResult:
    run: q.Run
    counts: dict[str, int]
    sent_now: int = 0
    recovered: int = 0
    stopped: bool = False


class GroupCommit:
    """Workers submit results and wait; whatever piles up during one write goes in the next.

    `submit` returns only once the write that holds the item has committed, and raises what
    that write raised: a worker never starts its next SMTP transaction before the result of
    the last one is safe in the ledger.
    """

    def __init__(self, write: Callable[[list[Any]], Awaitable[None]]) -> None:
        self._write = write
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._waiters.append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._items:
            items, waiters = self._items, self._waiters
            self._items, self._waiters = [], []
            try:
                await self._write(items)
            except BaseException as exc:  # every waiter learns about a failed write
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)


@dataclass
class Dispatcher:
    store: Store
    transport: Transport
    composer: Composer
    settings: Settings
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    progress: Progress = field(default_factory=NoProgress)
    limit: int | None = None
    batch_size: int = 200
    worker: str = field(default_factory=worker_id)
    now: Callable[[], datetime] = q.utcnow

    def __post_init__(self) -> None:
        self._commit = GroupCommit(self._write)
        self._auth_error: AuthenticationFailure | None = None
        self._write_error: BaseException | None = None
        self._sent_now = 0
        self._started = 0
        self._run_id = 0
        self._idle_polls = 0  # looks in a row at rows only other workers hold
        self._nowait: Connection | None = None  # SQLite: results written on the loop's thread
        self._commits = 0  # on _nowait
        self._checkpoint: asyncio.Task[None] | None = None

    # -- the loop --------------------------------------------------------------------------

    async def run(self, run: q.Run) -> RunResult:
        # The store's registry of this process's running dispatchers: another dispatcher of
        # this process on the same run leaves our claims alone while we run.
        live = self.store.workers
        live.add(self.worker)
        nowait = nowait_engine(self.store.engine)
        try:
            # Held for the whole run: a checkout from the pool per write costs as much as the
            # write.
            self._nowait = nowait.connect() if nowait is not None else None
            return await self._run(run)
        finally:
            if self._checkpoint is not None:
                await self._checkpoint  # (it says and swallows its own errors)
            live.discard(self.worker)
            if self._nowait is not None:
                self._nowait.close()
                self._nowait = None
            if nowait is not None:
                nowait.dispose()

    async def _run(self, run: q.Run) -> RunResult:
        self._run_id = run.id
        recovered = await self._tx(lambda c: self._recover(c, run.id))
        if recovered:
            log.warning("run %s: %d rows were in flight when the last process stopped; "
                        "they are retried (at most %d can have been delivered twice)",
                        run.id, recovered, self.settings.smtp.pool_size)
        counts = await self._tx(lambda c: q.status_counts(c, run.id))
        total = sum(counts.values())
        done = counts["sent"] + counts["failed"] + counts["bounced"]
        self.progress.update(done=done, total=total)
        while not self.stop.is_set() and not self._limit_reached():
            want = self.batch_size
            if self.limit is not None:
                want = min(want, self.limit - self._started)
            rows: list[q.Claimed] = await self._tx(
                functools.partial(q.claim, run_id=run.id, worker=self.worker, limit=want,
                                  now=self.now(), new_message_id=self._new_message_id))
            if rows:
                self._idle_polls = 0
                # Only rows that reached `sent` or `failed` are done: a row put back for a
                # retry is claimed (and counted) again later, so counting claims overshoots.
                done += await self._send_batch(rows)
                self.progress.update(done=done, total=total)
                continue
            if not await self._wait_for_more(run.id, done, total):
                break
        if self._auth_error is not None:
            raise self._auth_error
        counts = await self._tx(lambda c: q.status_counts(c, run.id))
        finished = counts["pending"] == 0 and counts["sending"] == 0
        if finished:
            await self._tx(lambda c: q.set_run_status(c, run.id, RunStatus.FINISHED))
        final = await self._tx(lambda c: q.get_run(c, run.id))
        return RunResult(run=final, counts=counts, sent_now=self._sent_now, recovered=recovered,
                         stopped=not finished)

    def _limit_reached(self) -> bool:
        return self.limit is not None and self._started >= self.limit

    async def _wait_for_more(self, run_id: int, done: int, total: int) -> bool:
        """Nothing due now: wait for the next retry, or report that the run is complete."""
        counts = await self._tx(lambda c: q.status_counts(c, run_id))
        if counts["pending"] == 0 and counts["sending"] == 0:
            return False
        if counts["pending"] == 0:
            # Rows another worker holds: wait, and take them over if it dies. They are
            # usually its last few transactions: look again soon, then less often.
            await self._tx(lambda c: self._recover(c, run_id))
            delay = min(IDLE_POLL_S, FIRST_IDLE_POLL_S * 2 ** self._idle_polls)
            self._idle_polls += 1
        else:
            due = await self._tx(lambda c: q.next_attempt(c, run_id))
            delay = max(0.0, (due - self.now()).total_seconds()) if due else 0.0
            self.progress.update(done=done, total=total,
                                 note=retry_note(counts["pending"], due, self.settings.tz))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=min(delay, 5.0) + 0.01)
        return not self.stop.is_set()

    async def _send_batch(self, rows: Sequence[q.Claimed]) -> int:
        """Send claimed rows; returns how many of them are now `sent` or `failed`."""
        suppressed = await self._tx(lambda c: q.suppressed_among(
            c, [(r.email_key, r.list_name) for r in rows]))
        if suppressed:
            await self._commit.submit([
                q.Outcome(id=r.id, status=DeliveryStatus.FAILED, smtp_code=None,
                          smtp_text="not sent: the address is suppressed")
                for r in rows if r.email_key in suppressed])
        todo = [r for r in rows if r.email_key not in suppressed]
        gate = asyncio.Semaphore(self.settings.smtp.pool_size)
        unsent: list[int] = []
        finished = len(rows) - len(todo)

        async def one(row: q.Claimed) -> None:
            nonlocal finished
            async with gate:
                if self.stop.is_set() or self._write_error is not None:
                    unsent.append(row.id)
                    return
                try:
                    final = await self._deliver(row)  # (not `finished += await …`: the
                    finished += final                 # read before the await would be stale)
                except Exception as exc:
                    # The ledger could not record a result (the database is failing): start
                    # no further transaction, whose result could not be recorded either - the
                    # rows caught `sending` stay within the in-flight window and are retried.
                    if self._write_error is None:
                        self._write_error = exc

        await asyncio.gather(*(one(r) for r in todo))
        if unsent:
            with contextlib.suppress(Exception):  # if this fails too, recovery requeues them
                await self._tx(lambda c: q.release(c, unsent))
        if self._write_error is not None:
            failure = self._write_error
            reason = redact_addresses(getattr(failure, "orig", None) or failure)
            raise LedgerError(
                f"the ledger could not record a delivery ({reason}); sending stopped, and "
                "starting the run again resumes it") from failure
        return finished

    async def _deliver(self, row: q.Claimed) -> bool:
        """One SMTP transaction, its result recorded; True when the row is now final."""
        recipient = Recipient(email=row.email, name=row.name, language=row.language,
                              fields=dict(row.fields or {}), list=row.list_name)
        # `claim` gave the row its Message-ID (new_message_id): the fallback is for the type.
        mid = row.message_id or self._new_message_id()
        self._started += 1
        try:
            data = self.composer.compose(recipient, message_id=mid).data
        except jinja2.TemplateError as exc:
            # One recipient's data must not stop everyone else's mail: fail the row, say why.
            log.error("run row %s: the message could not be built: %s", row.id,
                      redact_addresses(exc))
            await self._commit.submit([q.Outcome(
                id=row.id, status=DeliveryStatus.FAILED, smtp_code=None,
                smtp_text=f"not sent: the message could not be built ({exc})"[:500])])
            return True
        try:
            result = await self.transport.send(Outgoing(
                key=row.id, sender=self._return_path(row.id), recipient=row.email, data=data,
                composed=True))
        except AuthenticationFailure as exc:
            self._auth_error = exc
            self.stop.set()
            await self._tx(lambda c: q.release(c, [row.id]))
            return False
        outcome = self._outcome(row, result)
        await self._commit.submit([outcome])
        return outcome.status != DeliveryStatus.PENDING

    def _new_message_id(self) -> str:
        return message_id(domain=self.settings.msgid_domain)

    def _return_path(self, delivery_id: int) -> str:
        return return_path(self.settings, self.composer.tokens, run_id=self._run_id,
                           delivery_id=delivery_id)

    def _outcome(self, row: q.Claimed, result: DeliveryResult) -> q.Outcome:
        """The row's new state (its Message-ID stays as the claim wrote it)."""
        now = self.now()
        text = f"{result.text}"[:500]
        if result.outcome == Outcome.SENT:
            self._sent_now += 1
            return q.Outcome(id=row.id, status=DeliveryStatus.SENT, smtp_code=result.code,
                             smtp_text=text, sent_at=now)
        if result.outcome == Outcome.TEMPORARY and row.attempts < self.settings.smtp.max_attempts:
            return q.Outcome(id=row.id, status=DeliveryStatus.PENDING, smtp_code=result.code,
                             smtp_text=text, next_attempt_at=now + timedelta(
                                 seconds=backoff_s(row.attempts, self.settings.smtp.retry_base_s)))
        if result.outcome == Outcome.TEMPORARY:
            text = f"gave up after {row.attempts} attempts: {text}"[:500]
        return _Failed(id=row.id, status=DeliveryStatus.FAILED, smtp_code=result.code,
                       smtp_text=text, suppress_key=row.email_key if result.suppress else None)

    # -- the store -------------------------------------------------------------------------

    async def _write(self, batches: list[list[q.Outcome]]) -> None:
        outcomes = [o for batch in batches for o in batch]
        if self._nowait is not None:
            # A SQLite write of a few rows takes less than handing it to a thread and back
            # (a thread hop costs ~0.1 ms of CPU); only while another process holds the lock
            # does it wait, and then off the loop.
            try:
                with self._nowait.begin():
                    self._record(self._nowait, outcomes)
            except OperationalError as exc:
                if not is_busy(exc):
                    raise
            else:
                self._commits += 1
                if self._commits % CHECKPOINT_EVERY == 0:
                    self._start_checkpoint()
                return
        await q.in_transaction(self.store.engine, lambda conn: self._record(conn, outcomes))

    def _start_checkpoint(self) -> None:
        """The WAL's pages into the database file, in a thread beside the loop (the loop's
        own connection never does it: see nowait_engine); one at a time."""
        if self._checkpoint is None or self._checkpoint.done():
            self._checkpoint = asyncio.create_task(self._checkpoint_in_thread())

    async def _checkpoint_in_thread(self) -> None:
        try:
            await asyncio.to_thread(checkpoint, self.store.engine)
        except Exception as exc:  # nothing is lost: the pages stay in the WAL for the next one
            log.warning("the ledger's WAL could not be checkpointed: %s", exc)

    def _record(self, conn: Connection, outcomes: list[q.Outcome]) -> None:
        q.record(conn, outcomes, worker=self.worker)
        for o in outcomes:
            if isinstance(o, _Failed) and o.suppress_key:
                # RFC 3463 5.1.x: the mailbox does not exist; never send to it again - and
                # keep it as a consent event, like every other reason an address stops.
                detail = f"{o.smtp_code} {o.smtp_text}"
                if q.suppress(conn, o.suppress_key, reason="hard_bounce", source="smtp",
                              detail=detail):
                    record_event(conn, o.suppress_key, ConsentEvent.BOUNCED,
                                 origin=Origin(source="smtp"), list_name=q.GLOBAL,
                                 detail=detail)

    def _recover(self, conn: Connection, run_id: int) -> int:
        now = self.now()
        live = set(self.store.workers)
        stale = [(i, by) for i, by, at in q.stuck_sending(conn, run_id)
                 if is_stale(by, at, now, me=self.worker, live=live)]
        count = q.requeue(conn, stale)
        if count:
            q.add_recovered(conn, run_id, count)
        return count

    async def _tx(self, fn: Callable[[Connection], Any]) -> Any:
        return await q.in_transaction(self.store.engine, fn)


@contextmanager
def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    """First Ctrl-C/SIGTERM: stop claiming, finish in-flight, leave the run resumable."""
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@dataclass(frozen=True, slots=True)
class _Failed(q.Outcome):
    suppress_key: str | None = None


def return_path(settings: Settings, tokens: Tokens, *, run_id: int, delivery_id: int) -> str:
    """The envelope sender of one delivery: with `bounces.address` a VERP address
    `local+<token>@domain` whose token (tokens.py) names run and ledger row without revealing
    the recipient, so returned mail is matched to its delivery (mailbox.py); else the sender."""
    address = settings.bounces.address
    if address is None:
        return settings.sender.address
    local, _, domain = address.rpartition("@")
    return f"{local}+{tokens.verp(run_id, delivery_id)}@{domain}"


def start_run(
    store: Store,
    *,
    campaign_id: str,
    occurrence: str,
    trigger: str,
    recipients: Iterable[Recipient],
    scheduled_at: datetime | None = None,
    late_s: float | None = None,
) -> tuple[q.Run, bool]:
    """Create the run and its ledger rows in one transaction; a second start adds nothing."""
    with store.engine.begin() as conn:
        run, created = q.insert_run(conn, campaign_id=campaign_id, occurrence=occurrence,
                                    trigger=trigger, scheduled_at=scheduled_at, late_s=late_s)
        if created:
            q.snapshot(conn, run.id, (
                {"email": r.email, "email_key": r.key, "name": r.name, "language": r.language,
                 "list_name": r.list, "fields": r.fields}
                for r in recipients))
            run = q.get_run(conn, run.id)
    return run, created


async def deliver_run(
    settings: Settings,
    store: Store,
    rendition: Rendition,
    run: q.Run,
    *,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
    transport: Transport | None = None,
    batch_size: int = 200,
) -> RunResult:
    """Send a run's pending rows until every row is sent or failed (or stop/limit)."""
    composer = Composer(rendition, settings, tokens=Tokens(settings.secret()))
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_transport(settings, store=store))
        dispatcher = Dispatcher(store=store, transport=transport, composer=composer,
                                settings=settings, stop=stop or asyncio.Event(),
                                progress=progress or NoProgress(), limit=limit,
                                batch_size=batch_size)
        return await dispatcher.run(run)
