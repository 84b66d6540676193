"""`mailer send --workers N`: one run's rows sent by N processes of this machine.

Every worker is a forked copy of the command after it planned the run: it has the checked
campaign (with its compiled templates) without checking it again, its own event loop, its own
SMTP connections (its share of `smtp.pool_size`) and its own database connections. The workers
claim rows of the same run from the ledger as any two dispatchers do; a worker that dies leaves
its claims to the others (dispatch.is_stale), so the crash bound is the total pool size. The
rate limits are the database's shared buckets (quota.py). The parent only shows progress, read
from the ledger, and passes Ctrl-C / SIGTERM on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from datetime import tzinfo
from multiprocessing.queues import SimpleQueue
from typing import Any

from .checks import Checked
from .config import Settings
from .dispatch import Progress, RunResult, deliver_run, retry_note, stop_on_signals
from .errors import AuthenticationFailure, LedgerError, UserError
from .relay import open_transport
from .store import RunStatus, Store
from .store import queries as q

log = logging.getLogger("mailer.workers")

POLL_S = 0.5


def claim_size(pool_size: int) -> int:
    """Rows a worker claims at once: enough to keep its connections busy between two claims,
    few enough that the other workers find rows to claim in a small run too."""
    return max(16, min(200, 8 * pool_size))


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole shares, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class Report:
    """What a worker tells the parent when it ends."""

    worker: int
    sent_now: int = 0
    recovered: int = 0
    error: str | None = None  # the exception's class name
    message: str = ""


_ERRORS: dict[str, type[Exception]] = {
    "AuthenticationFailure": AuthenticationFailure, "LedgerError": LedgerError}


def send_with_workers(settings: Settings, store: Store, checked: Checked, run: q.Run, *,
                      workers: int, limit: int | None, progress: Progress) -> RunResult:
    """Send the run with `workers` forked processes; returns when all of them ended."""
    pools = shares(settings.smtp.pool_size, workers)
    limits = shares(limit, workers) if limit is not None else [None] * workers
    context = multiprocessing.get_context("fork")
    reports: SimpleQueue[Report] = context.SimpleQueue()
    store.engine.dispose()  # no database connection may be shared with a child
    children = []
    for i in range(workers):
        if limits[i] == 0:
            continue
        child = context.Process(target=_worker, name=f"mailer-worker-{i + 1}",
                                args=(i + 1, settings, store, checked, run, pools[i], limits[i],
                                      reports, os.getpid()))
        child.start()
        children.append(child)
    try:
        asyncio.run(_watch(store, run, children, progress, tz=settings.tz))
    finally:
        for child in children:
            child.join()
    ended: list[Report] = []
    while not reports.empty():  # every worker wrote before it ended
        ended.append(reports.get())
    lost = [c for c in children if c.exitcode not in (0, 1)]
    for child in lost:
        log.warning("%s (pid %s) ended with %s; the other workers take over its rows",
                    child.name, child.pid, _exit_text(child.exitcode))
    for report in ended:
        if report.error is not None:
            raise _ERRORS.get(report.error, UserError)(report.message)
    with store.engine.connect() as conn:
        counts = q.status_counts(conn, run.id)
        final = q.get_run(conn, run.id)
    finished = counts["pending"] == 0 and counts["sending"] == 0
    if lost and not finished and len(lost) == len(children):
        raise UserError(f"every worker ended unexpectedly ({_exit_text(lost[0].exitcode)}); "
                        f"nothing is lost: continue with: mailer send {run.campaign_id}")
    if finished and final.status != RunStatus.FINISHED:  # every worker that could was stopped
        with store.engine.begin() as conn:
            q.set_run_status(conn, run.id, RunStatus.FINISHED)
            final = q.get_run(conn, run.id)
    return RunResult(run=final, counts=counts, sent_now=sum(r.sent_now for r in ended),
                     recovered=sum(r.recovered for r in ended), stopped=not finished)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


async def _watch(store: Store, run: q.Run, children: list[Any], progress: Progress, *,
                 tz: tzinfo) -> None:
    """Progress from the ledger until every worker ended; signals go on to the workers."""
    loop = asyncio.get_running_loop()

    def pass_on(sig: signal.Signals) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, sig)

    # A worker's end wakes this loop at once (its sentinel becomes readable): the command
    # ends when its last worker does, not at the next poll.
    ended = asyncio.Event()

    def on_end(sentinel: int) -> None:
        loop.remove_reader(sentinel)
        ended.set()

    for child in children:
        loop.add_reader(child.sentinel, on_end, child.sentinel)
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, pass_on, sig)
    try:
        while True:
            counts, due, waiting = await q.in_transaction(store.engine, lambda c: (
                q.status_counts(c, run.id), q.next_attempt(c, run.id),
                q.due_count(c, run.id, q.utcnow()) == 0))
            done = counts["sent"] + counts["failed"] + counts["bounced"]
            # Only when every pending row waits for its retry, as the dispatcher says it.
            note = retry_note(counts["pending"], due, tz) if counts["pending"] and waiting else ""
            progress.update(done=done, total=sum(counts.values()), note=note)
            if not any(child.is_alive() for child in children):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), POLL_S)
            ended.clear()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for child in children:
            loop.remove_reader(child.sentinel)


def _stop_with(parent: int) -> None:
    """SIGTERM (a graceful stop) when the parent dies, however it dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _worker(number: int, settings: Settings, store: Store, checked: Checked, run: q.Run,
            pool_size: int, limit: int | None, reports: SimpleQueue[Report],
            parent: int) -> None:
    """The body of one worker process (forked: it starts with the parent's objects)."""
    # The parent's connections stay the parent's: this process opens its own (SQLAlchemy's
    # advice for a forked engine), and its Ctrl-C is a graceful stop, as in the parent.
    store.engine.dispose(close=False)
    _stop_with(parent)
    try:
        result = asyncio.run(_send(settings, store, checked, run, pool_size, limit))
    except (AuthenticationFailure, LedgerError, UserError) as exc:
        reports.put(Report(number, error=type(exc).__name__, message=str(exc)))
        os._exit(1)
    except BaseException:
        log.exception("worker %d failed", number)
        os._exit(70)
    reports.put(Report(number, sent_now=result.sent_now, recovered=result.recovered))
    os._exit(0)


async def _send(settings: Settings, store: Store, checked: Checked, run: q.Run,
                pool_size: int, limit: int | None) -> RunResult:

    # Its share of the connections bounds its transactions in flight too (the crash bound).
    settings = settings.model_copy(update={
        "smtp": settings.smtp.model_copy(update={"pool_size": pool_size})})
    stop = asyncio.Event()
    with stop_on_signals(asyncio.get_running_loop(), stop):
        async with open_transport(settings, store=store) as transport:
            return await deliver_run(settings, store, checked.rendition, run, stop=stop,
                                     limit=limit, transport=transport,
                                     batch_size=claim_size(pool_size))
