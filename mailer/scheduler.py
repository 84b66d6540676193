"""APScheduler wiring: triggers from campaigns, persistent job store, leader lock, the fire.

`mailer run` keeps one APScheduler 3 `AsyncIOScheduler` in the event loop that also runs
dispatch. Jobs live in a `SQLAlchemyJobStore` (table `scheduler_jobs`) in the ledger's database,
one job per campaign id; the job function is `fire(campaign_id, config_path)`.

Where we lean on APScheduler and where we do not (APScheduler 3.11 behaviour, checked in its
source):

* A job function is not told the fire time it stands for, but the fire time is our occurrence
  key. `OccurrenceExecutor` therefore hands `run_times` to the job; jobs are added with
  `coalesce=False, misfire_grace_time=None` so the executor sees every fire time that passed and
  applies `scheduler.misfire_grace_s` itself: a fire beyond grace is *recorded* as a missed run in
  the ledger (APScheduler would only log it), and several missed fires coalesce into one run whose
  note names the others.
* `AsyncIOExecutor.shutdown()` cancels running jobs; ours never cancels a send. `Runner` awaits
  in-flight fires on SIGTERM (bounded), so a stop never cuts an SMTP transaction.
* `CronTrigger.from_crontab` numbers weekdays from Monday (0 = Monday; apscheduler#286, kept for
  compatibility in 3.x). Staff write crontab, where 0 and 7 are Sunday: `cron_trigger` translates
  numeric weekdays into names.

Daylight saving time in the configured zone (Europe/Berlin), for a cron with fixed hours: every
matching wall-clock time fires exactly once (`CampaignCronTrigger` in triggers.py; tests in
tests/test_triggers.py sweep every minute pattern over both nights):

* spring forward (e.g. 2027-03-28, 02:00 → 03:00): a wall-clock time in the skipped hour fires
  once, one hour later on the clock: "30 2 * * *" fires at 03:30 CEST (01:30 UTC), and
  "*/5 2 * * *" at 03:00, 03:05, … 03:55 CEST (APScheduler alone fires only 03:00).
* fall back (e.g. 2026-10-25, 03:00 → 02:00): a wall-clock time in the repeated hour fires once,
  at its first pass: "30 2 * * *" fires at 02:30 CEST (00:30 UTC), not again at 02:30 CET, and
  "*/5 2 * * *" fires 02:00-02:55 CEST and nothing in the second pass (APScheduler alone fires
  both passes).
* crons whose hour field is `*` run by elapsed time and fire in both passes of the repeated hour
  (an hourly job stays hourly), as Vixie cron does.

Exactly one run per occurrence: a one-off (`at`) campaign has the occurrence "once" – the same one
`mailer send` uses, so the two never both send it; a cron campaign has one occurrence per fire
time, written as UTC ISO 8601 ("2026-12-01T08:00:00+00:00"). The ledger's unique key on (campaign,
occurrence) makes a second fire find the run and at most resume it. A missed one-off is recorded
under "once-missed", so `mailer send` can still send it.

A fire that fails (a list file gone, the database refusing the snapshot, a bug) is never only
logged: APScheduler has moved on, so the occurrence would be lost without a trace. When no run
exists yet, a run with status `failed` and the reason in its note takes the occurrence (a
one-off's under "once-failed", leaving "once" to `mailer send`), like a missed one; when the run
exists (its rows are in the ledger), the run stays `running`, so the next start of `mailer run`
or `mailer send` resumes it, and its note says what failed. `mailer schedule` lists both.

A campaign file that does not pass `check_campaign` (a typo, a YAML bomb, a bug further down)
is reported once per change at WARNING (`event=campaign-invalid`, one sentence) and skipped; the
other files run on. If it was good before, its job keeps the last good version, schedule and
content, the way a web server or Kubernetes keeps its last good configuration when a reload
fails: a slip made while editing must not silently cancel a newsletter people expect, and an
irreversible send of a half-edited file is not possible either, since only a version that passed
every check is ever sent. A fire that uses it says so (`event=fire-last-good`, WARNING) and
`mailer schedule` lists the file as broken with the schedule kept. A process started while the
file is broken has the job but no good version: its fires are skipped with a warning until the
file is fixed (a one-off then fires late within `misfire_grace_s`, or is recorded as missed).

One scheduler per database: a PostgreSQL session advisory lock on a dedicated connection, or an
exclusive `flock` on `<var>/scheduler.lock` for SQLite. The follower polls and takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Protocol

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import Connection, Engine, text, update
from sqlalchemy.exc import DBAPIError

from . import heartbeat
from .campaign import Campaign, campaign_files, resolve_local
from .checks import Checked, check_campaign
from .config import Settings, load_settings
from .errors import MailerError, UserError
from .files import private_dir
from .redact import redact_addresses
from .store import FAILED_ONCE, MISSED_ONCE, ONCE, RunStatus, Store, open_store
from .store import queries as q
from .store.tables import runs
from .triggers import cron_trigger

log = logging.getLogger("mailer.scheduler")

JOB_TABLE = "scheduler_jobs"
FIRE_FAILED = "fire failed"  # how the note of a run whose delivery a failure cut off begins
TRIGGER = "scheduler"

LOCK_KEYS = (0x494D4147, 1)  # pg_try_advisory_lock(int, int): "IMAG", scheduler
MAX_INSTANCES = 1000  # different occurrences of one campaign may overlap; each is its own run
STOP_GRACE_S = 10.0  # on SIGTERM, in-flight transactions get smtp.timeout_s plus this

Clock = Callable[[], datetime]


utcnow = q.utcnow  # one clock for the ledger and the scheduler


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line: event=… campaign=… run=… and counts; never addresses."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.3f}"
        value = str(value)
        parts.append(f'{key}="{value}"' if (" " in value or not value) else f"{key}={value}")
    log.log(level, " ".join(parts))


# --- triggers ---------------------------------------------------------------------------------


def trigger_for(campaign: Campaign, settings: Settings) -> BaseTrigger:
    schedule = campaign.schedule
    if schedule is None:
        raise ValueError(f"campaign '{campaign.id}' has no schedule")
    if schedule.cron is not None:
        return cron_trigger(schedule.cron, settings.tz)
    assert schedule.at is not None  # the model requires exactly one of at / cron
    return DateTrigger(run_date=resolve_local(schedule.at, settings), timezone=settings.tz)


def fingerprint(campaign: Campaign, settings: Settings, path: Path) -> str:
    """What a job stands for; the job is rescheduled only when this changes."""
    schedule = campaign.schedule
    assert schedule is not None
    what = f"cron {schedule.cron}" if schedule.cron is not None else f"at {schedule.at}"
    return f"{path.name}|{what}|{settings.timezone}"


def next_fire(campaign: Campaign, settings: Settings, now: datetime) -> datetime | None:
    """The next time this campaign's schedule fires after `now` (for `mailer schedule`)."""
    trigger = trigger_for(campaign, settings)
    when = trigger.get_next_fire_time(None, now.astimezone(settings.tz))
    if when is not None and when.astimezone(UTC) < now.astimezone(UTC):
        return None  # a DateTrigger in the past
    return when


def is_fire_time(campaign: Campaign, settings: Settings, when: datetime) -> bool:
    """Does the campaign's current schedule (still) fire at `when`? Catches edits not yet synced."""
    if campaign.schedule is None:
        return False
    trigger = trigger_for(campaign, settings)
    probe = when.astimezone(UTC) - timedelta(microseconds=1)  # wall clock: DST nights skew it
    if isinstance(trigger, DateTrigger):
        return trigger.run_date.astimezone(UTC) == when.astimezone(UTC)
    nxt = trigger.get_next_fire_time(None, probe)
    return nxt is not None and nxt.astimezone(UTC) == when.astimezone(UTC)


def occurrence_of(campaign: Campaign, fire_time: datetime) -> str:
    schedule = campaign.schedule
    if schedule is not None and schedule.cron is not None:
        return fire_time.astimezone(UTC).isoformat()
    return ONCE


# --- deciding what a fire does ----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    occurrence: str
    scheduled_at: datetime
    late_s: float
    send: bool
    note: str | None = None


def decide(campaign: Campaign, run_times: Sequence[datetime], *, now: datetime, grace_s: float,
           zone: tzinfo) -> Decision:
    """The latest fire time stands for all; within grace it is sent late, beyond it missed."""
    ordered = sorted(run_times, key=lambda d: d.astimezone(UTC))
    scheduled = ordered[-1].astimezone(UTC)
    late_s = max(0.0, (now - scheduled).total_seconds())
    occurrence = occurrence_of(campaign, scheduled)
    coalesced = ""
    if len(ordered) > 1:
        first = ordered[0].astimezone(zone)
        coalesced = (f"{len(ordered) - 1} earlier occurrences since {first:%Y-%m-%d %H:%M %Z} "
                     "were coalesced into this one")
    if late_s <= grace_s:
        return Decision(occurrence, scheduled, late_s, True, coalesced or None)
    local = scheduled.astimezone(zone)
    note = (f"missed: the scheduler was not running at {local:%Y-%m-%d %H:%M %Z} "
            f"({timedelta(seconds=round(late_s))} late, beyond misfire_grace_s={grace_s:g}); "
            f"not sent - send it with: mailer send {campaign.id}")
    if coalesced:
        note = f"{note}; {coalesced}"
    return Decision(MISSED_ONCE if occurrence == ONCE else occurrence, scheduled, late_s, False,
                    note)


# --- leader election --------------------------------------------------------------------------


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


# --- named queries (scheduler only) -----------------------------------------------------------


def one_off_done(conn: Connection, campaign_id: str) -> q.Run | None:
    """The run that settled a one-off campaign: sent (or being sent), recorded missed or failed."""
    for occurrence in (ONCE, MISSED_ONCE, FAILED_ONCE):
        if (run := q.find_run(conn, campaign_id, occurrence)) is not None:
            return run
    return None


def note_run(conn: Connection, run_id: int, note: str) -> None:
    conn.execute(update(runs).where(runs.c.id == run_id).values(note=note))


def failed_fires(conn: Connection, campaign_id: str) -> list[q.Run]:
    """Fires that failed: runs recorded `failed`, and running ones a failure cut off."""
    failed = q.runs_with_status(conn, campaign_id, RunStatus.FAILED)
    cut = [r for r in q.runs_with_status(conn, campaign_id, RunStatus.RUNNING)
           if (r.note or "").startswith(FIRE_FAILED)]
    return sorted(failed + cut, key=lambda r: r.id, reverse=True)


# --- the executor and the job function --------------------------------------------------------


class OccurrenceExecutor(AsyncIOExecutor):
    """Runs `fire` with the fire times it stands for, as a task of the runner that owns us."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self._runner = runner

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        task = self._runner.spawn(job.func(*job.args, run_times=list(run_times),
                                           runner=self._runner, **job.kwargs))

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or t.exception() is None:
                self._run_job_success(job.id, [])
            else:
                exc = t.exception()
                self._run_job_error(job.id, exc, exc.__traceback__ if exc else None)

        task.add_done_callback(done)

    def shutdown(self, wait: bool = True) -> None:
        """Never cancel a send: the runner awaits in-flight fires before it shuts us down."""


async def fire(campaign_id: str, config_path: str, *, run_times: Sequence[datetime] = (),
               runner: Runner | None = None) -> None:
    """The job function: importable, with picklable arguments only (what the job store keeps).

    `mailer run`'s executor hands over the runner that fires it; a job run any other way
    (no runner) loads everything from the config path it was stored with.
    """
    if runner is None:
        settings = load_settings(config_path)
        runner = Runner(settings=settings, store=open_store(settings.database_url),
                        config_path=config_path)  # its fire loads the campaign files
    await runner.fire(campaign_id, run_times or [runner.now()])


# --- the runner -------------------------------------------------------------------------------


@dataclass
class Known:
    """A campaign file as last seen: its stamp, the id it last validated with, its error now."""

    stamp: tuple[int, int]
    campaign_id: str | None = None
    error: str | None = None


@dataclass
class Firing:
    """What a fire got to before it failed: enough to record the failure against its run."""

    campaign_id: str
    run_times: Sequence[datetime]
    campaign: Campaign | None = None
    decision: Decision | None = None
    run: q.Run | None = None


def failure_reason(exc: BaseException) -> str:
    """One line, no addresses: a user error's sentence, else the error's type and message."""
    if isinstance(exc, UserError):
        text_ = exc.sentence()
    elif isinstance(exc, MailerError):
        text_ = str(exc)
    else:
        text_ = f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}"
    return redact_addresses(" ".join(text_.split()))[:500]


@dataclass
class Runner:
    """One `mailer run` process: keeps the job set in line with campaigns/ and fires runs."""

    settings: Settings
    store: Store
    config_path: str
    now: Clock = utcnow
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    good: dict[str, tuple[Path, Checked]] = field(default_factory=dict)
    files: dict[Path, Known] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    sending: set[int] = field(default_factory=set)  # runs a dispatcher of ours is sending

    def __post_init__(self) -> None:
        # The embedded capture server files mail under var/outbox/ but does not create var/
        # (absent on a fresh PostgreSQL setup, where no SQLite file put it there).
        private_dir(self.settings.var_dir)

    # -- campaign files --------------------------------------------------------------------

    def scan(self) -> dict[Path, tuple[int, int]]:
        out = {}
        for path in campaign_files(self.settings):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                out[path] = (st.st_mtime_ns, st.st_size)
        return out

    def changed(self) -> bool:
        stamps = self.scan()
        return stamps != {p: k.stamp for p, k in self.files.items()}

    def load_changes(self) -> bool:
        """Reload changed files; a file that no longer validates keeps its last good version."""
        with self._lock:  # the watcher and a fire may both get here, each in a worker thread
            return self._load_changes()

    def _load_changes(self) -> bool:
        stamps = self.scan()
        dirty = False
        for path in [p for p in self.files if p not in stamps]:
            known = self.files.pop(path)
            dirty = True
            if known.campaign_id and self.good.get(known.campaign_id, (None,))[0] == path:
                del self.good[known.campaign_id]
                log_event("campaign-removed", campaign=known.campaign_id, file=path.name)
        for path, stamp in stamps.items():
            old = self.files.get(path)
            if old is not None and old.stamp == stamp:
                continue
            dirty = True
            self.files[path] = Known(stamp, old.campaign_id if old else None)
            self._load(path)
        return dirty

    def _load(self, path: Path) -> None:
        """Check one file; a broken one is reported and skipped, never the end of `mailer run`."""
        known = self.files[path]
        try:
            checked = check_campaign(path, self.settings)
        except UserError as exc:
            known.error = exc.sentence()
        except Exception as exc:  # a bug further down the pipeline: still only this file
            known.error = file_problem(exc, path)
        else:
            known.error = None
            campaign = checked.campaign
            known.campaign_id = campaign.id
            self.good[campaign.id] = (path, checked)
            log_event("campaign-loaded", campaign=campaign.id, file=path.name,
                      schedule=_describe(campaign))
            return
        log_event("campaign-invalid", level=logging.WARNING, file=path.name,
                  keeps=known.campaign_id and "its last good version", error=known.error)

    def checked(self, campaign_id: str) -> tuple[Path, Checked] | None:
        if self.changed():
            self.load_changes()
        return self.good.get(campaign_id)

    # -- the job set -----------------------------------------------------------------------

    def reconcile(self, scheduler: AsyncIOScheduler) -> None:
        """Bring the job store in line with the campaign files (one job per campaign id)."""
        wanted = {cid: (path, c) for cid, (path, c) in self.good.items()
                  if c.campaign.schedule is not None}
        broken = {p.name for p, k in self.files.items() if k.campaign_id is None}
        for job in scheduler.get_jobs():
            if job.id in wanted:
                continue
            if str(job.name).partition("|")[0] in broken:
                continue  # the file exists but does not validate: keep its last good schedule
            scheduler.remove_job(job.id)
            log_event("job-removed", campaign=job.id)
        for path, checked in wanted.values():
            try:
                self._ensure_job(scheduler, checked.campaign, path)
            except Exception:  # one campaign's job must not keep the others from theirs
                log.error("event=job-failed campaign=%s file=%s", checked.campaign.id,
                          path.name, exc_info=True)

    def _ensure_job(self, scheduler: AsyncIOScheduler, campaign: Campaign, path: Path) -> None:
        name = fingerprint(campaign, self.settings, path)
        args = [campaign.id, self.config_path]
        job = scheduler.get_job(campaign.id)
        if job is not None and job.name == name:
            if list(job.args) != args:
                scheduler.modify_job(campaign.id, args=args)
            return
        assert campaign.schedule is not None
        if campaign.schedule.at is not None:
            with self.store.engine.connect() as conn:
                done = one_off_done(conn, campaign.id)
            if done is not None:
                if job is not None:
                    scheduler.remove_job(campaign.id)
                log_event("schedule-ignored", campaign=campaign.id, run=done.id,
                          status=done.status, reason="this one-off campaign's occurrence is "
                          "settled; mailer send sends it (--again anew)")
                return
        trigger = trigger_for(campaign, self.settings)
        if job is None:
            scheduler.add_job(fire, trigger, args=args, id=campaign.id, name=name,
                              misfire_grace_time=None, coalesce=False,
                              max_instances=MAX_INSTANCES, replace_existing=True)
        else:
            scheduler.modify_job(campaign.id, name=name, args=args)
            scheduler.reschedule_job(campaign.id, trigger=trigger)
        job = scheduler.get_job(campaign.id)
        nxt = getattr(job, "next_run_time", None)
        log_event("job-scheduled", campaign=campaign.id, schedule=_describe(campaign),
                  next_local=_local(nxt, self.settings), next_utc=_utc(nxt))

    # -- firing ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def fire(self, campaign_id: str, run_times: Sequence[datetime]) -> None:
        firing = Firing(campaign_id, run_times)
        try:
            await self._fire(firing)
        except Exception as exc:  # the schedule has moved on: record it, never only log it
            await self.failed(firing, exc)

    async def _fire(self, firing: Firing) -> None:
        campaign_id = firing.campaign_id
        found = await asyncio.to_thread(self.checked, campaign_id)
        if found is None:
            log_event("fire-skipped", level=logging.WARNING, campaign=campaign_id,
                      reason="no valid campaign file with this id any more")
            return
        path, checked = found
        firing.campaign = checked.campaign
        broken = self.files.get(path)
        if broken is not None and broken.error:
            log_event("fire-last-good", level=logging.WARNING, campaign=campaign_id,
                      file=path.name, error=broken.error,
                      note="the file is broken; its last good version is used")
        decision = decide(checked.campaign, firing.run_times, now=self.now(),
                          grace_s=self.settings.scheduler.misfire_grace_s, zone=self.settings.tz)
        firing.decision = decision
        if not is_fire_time(checked.campaign, self.settings, decision.scheduled_at):
            log_event("fire-skipped", campaign=campaign_id, scheduled=_utc(decision.scheduled_at),
                      reason="the schedule changed since; the new one applies")
            return
        if decision.note:
            log_event("coalesced" if decision.send else "missed",
                      level=logging.INFO if decision.send else logging.WARNING,
                      campaign=campaign_id, occurrence=decision.occurrence, note=decision.note)
        run = await asyncio.to_thread(self._start, checked, decision)
        if run is not None:
            firing.run = run
            await self.deliver(checked, run, event="start" if decision.send else "resume")

    async def failed(self, firing: Firing, exc: Exception, *, event: str = "fire-failed"
                     ) -> None:
        """Log a failed fire (or resume) and record it in the ledger (see the module doc)."""
        reason = failure_reason(exc)
        log_event(event, level=logging.ERROR, campaign=firing.campaign_id,
                  run=firing.run.id if firing.run else None, error=reason)
        if not isinstance(exc, MailerError):  # a bug: its traceback belongs in the log
            log.error("event=%s-traceback campaign=%s", event, firing.campaign_id,
                      exc_info=exc)
        try:
            run = await asyncio.to_thread(self._record_failure, firing, reason)
        except Exception as again:
            log_event("failure-unrecorded", level=logging.ERROR, campaign=firing.campaign_id,
                      error=failure_reason(again), lost=reason)
            return
        if run is not None:
            log_event("failure-recorded", level=logging.WARNING, campaign=run.campaign_id,
                      run=run.id, occurrence=run.occurrence, status=run.status)

    def _record_failure(self, firing: Firing, reason: str) -> q.Run | None:
        """The failed run, or the note on the run a failure cut off; None if another took it."""
        local = self.now().astimezone(self.settings.tz)
        hint = f"mailer send {firing.campaign_id}"
        cut = (f"{FIRE_FAILED} at {local:%Y-%m-%d %H:%M %Z}: {reason}; the rows not yet sent "
               f"are resumed by the next start of mailer run or by: {hint}")
        with self.store.engine.begin() as conn:
            if firing.run is not None:  # e.g. a one-off's resume: never a second run for it
                note_run(conn, firing.run.id, cut)
                return q.get_run(conn, firing.run.id)
            decision = firing.decision
            scheduled = (decision.scheduled_at if decision else  # in UTC, as SQLite keeps it
                         max((d.astimezone(UTC) for d in firing.run_times), default=None))
            schedule = firing.campaign.schedule if firing.campaign else None
            if decision is not None and decision.occurrence in (ONCE, MISSED_ONCE):
                occurrence = FAILED_ONCE
            elif decision is not None:
                occurrence = decision.occurrence
            elif schedule is not None and schedule.at is not None:
                occurrence = FAILED_ONCE
            else:
                occurrence = _utc(scheduled) or f"failed-{local:%Y%m%dT%H%M%S}"
            note = f"failed: {reason}; not sent - send it with: {hint}"
            run, created = q.insert_run(
                conn, campaign_id=firing.campaign_id, occurrence=occurrence, trigger=TRIGGER,
                status=RunStatus.FAILED, scheduled_at=scheduled,
                late_s=decision.late_s if decision else None, note=note)
            if created:
                return run
            if run.status == RunStatus.RUNNING:  # another fire started it meanwhile
                note_run(conn, run.id, cut)
                return q.get_run(conn, run.id)
            return None

    def _start(self, checked: Checked, decision: Decision) -> q.Run | None:
        """Create the run of this occurrence, or find it; None when there is nothing to send."""
        from .dispatch import start_run
        from .sending import audience

        campaign = checked.campaign
        with self.store.engine.begin() as conn:
            if decision.occurrence in (ONCE, MISSED_ONCE):
                existing = one_off_done(conn, campaign.id)
            else:
                existing = q.find_run(conn, campaign.id, decision.occurrence)
            if existing is None and not decision.send:
                run, _ = q.insert_run(conn, campaign_id=campaign.id,
                                      occurrence=decision.occurrence, trigger=TRIGGER,
                                      status=RunStatus.MISSED, scheduled_at=decision.scheduled_at,
                                      late_s=decision.late_s, note=decision.note)
                log_event("missed", level=logging.WARNING, campaign=campaign.id, run=run.id,
                          occurrence=run.occurrence, late_s=decision.late_s)
                return None
        if existing is not None:
            if existing.status != RunStatus.RUNNING:
                log_event("already-done", campaign=campaign.id, run=existing.id,
                          occurrence=existing.occurrence, status=existing.status)
                return None
            return existing
        recipients = audience(checked, self.settings, self.store)
        run, created = start_run(self.store, campaign_id=campaign.id,
                                 occurrence=decision.occurrence, trigger=TRIGGER,
                                 recipients=recipients, scheduled_at=decision.scheduled_at,
                                 late_s=round(decision.late_s, 3))
        log_event("fire" if created else "fire-found-run", campaign=campaign.id, run=run.id,
                  occurrence=run.occurrence, late_s=decision.late_s, recipients=run.total)
        return run

    async def deliver(self, checked: Checked, run: q.Run, *, event: str) -> None:
        from .dispatch import deliver_run

        self.sending.add(run.id)
        try:
            result = await deliver_run(self.settings, self.store, checked.rendition, run,
                                       stop=self.stop)
        finally:
            self.sending.discard(run.id)
        c = result.counts
        log_event("stopped" if result.stopped else "finished", campaign=run.campaign_id,
                  run=run.id, occurrence=run.occurrence, sent=c["sent"], failed=c["failed"],
                  left=c["pending"] + c["sending"], sent_now=result.sent_now,
                  recovered=result.recovered or None, via=event)

    async def resume_unfinished(self) -> None:
        """Runs the scheduler started and a stopped or killed process left unfinished."""
        with self.store.engine.connect() as conn:
            unfinished = q.unfinished_runs(conn)
        for run in unfinished:
            if run.id in self.sending:  # helped with while another process led: goes on
                continue
            if run.trigger != TRIGGER:
                log_event("unfinished-send", campaign=run.campaign_id, run=run.id,
                          hint=f"continue it with: mailer send {run.campaign_id}")
                continue
            found = self.good.get(run.campaign_id)
            if found is None:
                log_event("resume-impossible", level=logging.ERROR, campaign=run.campaign_id,
                          run=run.id, reason="no valid campaign file with this id")
                continue
            log_event("resume", campaign=run.campaign_id, run=run.id, occurrence=run.occurrence)
            self.spawn(self._resume(found[1], run))

    def lost_fires(self, job: Any, now: datetime) -> list[datetime]:
        """Cron fire times a killed leader took off the job store but never wrote to the ledger.

        APScheduler advances a job's next run time before the job runs, so a kill -9 in between
        would lose that occurrence. Fire times after the campaign's latest recorded occurrence
        and before the stored next run time, within the grace period, are due again.
        """
        found = self.good.get(job.id)
        if found is None or job.next_run_time is None or not isinstance(job.trigger, CronTrigger):
            return []
        start = now - timedelta(seconds=self.settings.scheduler.misfire_grace_s)
        with self.store.engine.connect() as conn:
            latest = q.latest_scheduled(conn, found[1].campaign.id)
        lost: list[datetime] = []
        # In UTC: times in the trigger's zone compare and add on the wall clock, which goes
        # back in the repeated hour of the fall-back night.
        until = job.next_run_time.astimezone(UTC)
        when = job.trigger.get_next_fire_time(None, start)
        while when is not None and when < until and when <= now:
            if latest is None or when > latest:
                lost.append(when)
            when = job.trigger.get_next_fire_time(
                when, when.astimezone(UTC) + timedelta(microseconds=1))
        return lost

    async def catch_up(self, scheduler: AsyncIOScheduler, before: dict[str, str]) -> None:
        """Fire the occurrences lost between the job store's update and the ledger's insert."""
        for job in scheduler.get_jobs():
            if before.get(job.id) != job.name:
                continue  # new or changed since the last process: nothing can have been lost
            lost = await asyncio.to_thread(self.lost_fires, job, self.now())
            if lost:
                log_event("catch-up", campaign=job.id, fires=len(lost), first=_utc(lost[0]))
                self.spawn(self.fire(job.id, lost))

    async def _resume(self, checked: Checked, run: q.Run, *, event: str = "resume") -> None:
        try:
            await self.deliver(checked, run, event=event)
        except Exception as exc:  # recorded on the run, which stays resumable
            firing = Firing(run.campaign_id, [run.scheduled_at] if run.scheduled_at else [],
                            campaign=checked.campaign, run=run)
            await self.failed(firing, exc, event="resume-failed")

    async def help_out(self, leading: asyncio.Event) -> None:
        """While another process leads: send rows of the runs it fired, beside it (every
        `mailer run` is a dispatch worker; the leader alone fires schedules)."""
        while not self.stop.is_set():
            if not leading.is_set():
                await asyncio.to_thread(self.load_changes)
                for run in await asyncio.to_thread(self.runs_to_help):
                    found = self.good.get(run.campaign_id)
                    if found is not None:
                        log_event("help", campaign=run.campaign_id, run=run.id,
                                  occurrence=run.occurrence)
                        self.sending.add(run.id)  # now, not when the task first runs
                        self.spawn(self._resume(found[1], run, event="help"))
            if await _wait(self.stop, self.settings.scheduler.poll_s):
                return

    def runs_to_help(self) -> list[q.Run]:
        """Unfinished scheduler runs with rows to send now that no dispatcher of ours sends."""
        with self.store.engine.connect() as conn:
            return [run for run in q.unfinished_runs(conn)
                    if run.trigger == TRIGGER and run.id not in self.sending
                    and q.due_count(conn, run.id, q.utcnow()) > 0]

    async def finish_in_flight(self, *, timeout_s: float | None = None) -> None:
        """Wait for in-flight fires (bounded); the dispatcher stopped claiming when stop was set."""
        if not self.tasks:
            return
        bound = timeout_s if timeout_s is not None else (
            self.settings.smtp.timeout_s + STOP_GRACE_S)
        _, pending = await asyncio.wait(set(self.tasks), timeout=bound)
        for task in pending:  # resumable: its rows stay claimed until the next start
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    # -- the process -----------------------------------------------------------------------

    def make_scheduler(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone=self.settings.tz)
        scheduler.add_jobstore(SQLAlchemyJobStore(engine=self.store.engine, tablename=JOB_TABLE))
        scheduler.add_executor(OccurrenceExecutor(self))
        return scheduler

    async def sync(self, scheduler: AsyncIOScheduler, *, force: bool = False) -> None:
        if force or self.changed():
            dirty = await asyncio.to_thread(self.load_changes)
            if dirty or force:
                self.reconcile(scheduler)

    def poll_mailbox(self) -> asyncio.Task[None] | None:
        """Returned mail is read on its own interval while we lead (mailbox.py), when an IMAP
        mailbox is configured."""
        if self.settings.mailbox is None:
            return None
        from .mailbox import poll

        return asyncio.create_task(poll(self.store, self.settings, self.stop))

    async def lead(self, leader: Leadership, *, once: bool) -> None:
        """Run the scheduler while we hold the lock (or, with once, until what is due is done)."""
        scheduler = self.make_scheduler()
        scheduler.start(paused=True)
        poller: asyncio.Task[None] | None = None
        try:
            before = {job.id: job.name for job in scheduler.get_jobs()}
            await self.sync(scheduler, force=True)
            await self.resume_unfinished()
            await self.catch_up(scheduler, before)
            scheduler.resume()
            if once:
                await _next_turn()  # resume() queued a wakeup: due jobs are submitted by now
                while self.tasks and not self.stop.is_set():
                    await asyncio.wait(set(self.tasks))
                return
            poller = self.poll_mailbox()
            while not self.stop.is_set():
                await heartbeat.beat(self.store)  # read by /metrics (mailer/heartbeat.py)
                if await _wait(self.stop, self.settings.scheduler.poll_s):
                    break
                if not await asyncio.to_thread(leader.held):
                    log_event("leadership-lost", level=logging.WARNING)
                    break
                await self.sync(scheduler)
        finally:
            if poller is not None:
                poller.cancel()
            if scheduler.running:
                scheduler.pause()  # stop firing
            await self.finish_in_flight()
            if scheduler.running:
                scheduler.shutdown(wait=False)
                await _next_turn()


async def _next_turn() -> None:
    """Let callbacks queued with call_soon(_threadsafe) before this point run."""
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout_s)
    return event.is_set()


async def serve(settings: Settings, config_path: str, *, once: bool = False, now: Clock = utcnow,
                stop: asyncio.Event | None = None, store: Store | None = None,
                on_invalid: Callable[[Path, str], None] | None = None) -> int:
    """`mailer run`: follow until we lead, then schedule; returns the exit code.

    With `once`, the code is 1 when a campaign file did not validate (the others still fired);
    `on_invalid` hears of each such file with its one-sentence error."""
    store = store or open_store(settings.database_url)
    runner = Runner(settings=settings, store=store, config_path=config_path, now=now,
                    stop=stop or asyncio.Event())
    leader = leader_for(store, settings)
    leading = asyncio.Event()
    helping = None if once else asyncio.create_task(runner.help_out(leading))
    try:
        while not runner.stop.is_set():
            if not await asyncio.to_thread(leader.try_acquire):
                if once:
                    log_event("standby", reason="another mailer run leads; nothing to do")
                    return 0
                log_event("standby", reason="another mailer run leads; sending beside it "
                                            "and waiting to take over")
                while not await asyncio.to_thread(leader.try_acquire):
                    if await _wait(runner.stop, settings.scheduler.poll_s):
                        await runner.finish_in_flight()
                        return 0
            log_event("leader", pid=os.getpid(), lock=type(leader).__name__)
            leading.set()
            try:
                await runner.lead(leader, once=once)
            finally:
                leading.clear()
                leader.release()
            if once:
                break
    finally:
        if helping is not None:
            helping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await helping
    log_event("exit", reason="stopped" if runner.stop.is_set() else "done")
    invalid = {path: known.error for path, known in sorted(runner.files.items()) if known.error}
    for path, error in invalid.items():
        if on_invalid is not None:
            on_invalid(path, error)
    return 1 if once and invalid else 0


# --- `mailer schedule` ------------------------------------------------------------------------


def _describe(campaign: Campaign) -> str:
    s = campaign.schedule
    if s is None:
        return "none"
    return f"cron {s.cron}" if s.cron is not None else f"at {s.at}"


def _local(when: datetime | None, settings: Settings) -> str | None:
    return when.astimezone(settings.tz).isoformat() if when else None


def _utc(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat() if when else None


def schedule_overview(settings: Settings, store: Store, *, now: datetime | None = None,
                      unscheduled: bool = False) -> list[dict[str, Any]]:
    """Every scheduled campaign: next fire (local and UTC) or why there is none, last run and
    its status, misses. With `unscheduled`, campaigns without a schedule too (`schedule` None).

    Files are checked as `mailer run` checks them (list contents aside, which `mailer validate`
    reads): a broken one is listed with its error and, when the job store still holds a job for
    it, the last good schedule `mailer run` keeps.
    """
    now = now or utcnow()
    kept: dict[str, dict[str, Any]] | None = None
    out: list[dict[str, Any]] = []
    for path in campaign_files(settings):
        try:
            campaign = check_campaign(path, settings, with_audience=False).campaign
        except Exception as exc:  # one sentence per broken file; the others are still listed
            if kept is None:
                kept = kept_jobs(store, settings)
            error = file_problem(exc, path)
            out.append({"file": path.name, "campaign": None, "error": error,
                        "kept": kept.get(path.name), "why": f"the file is invalid: {error}"})
            continue
        if campaign.schedule is None and not unscheduled:
            continue
        out.append(_overview_row(campaign, path, settings, store, now))
    return out


def file_problem(exc: Exception, path: Path) -> str:
    """One line for a file that did not pass the checks; a bug's traceback goes to the log."""
    if isinstance(exc, UserError):
        return exc.sentence()
    log.error("event=campaign-check-crashed file=%s", path.name, exc_info=True)
    detail = " ".join(str(exc).split())[:300]
    return f"{path}: could not be checked ({type(exc).__name__}: {detail}); please report this"


def _overview_row(campaign: Campaign, path: Path, settings: Settings, store: Store,
                  now: datetime) -> dict[str, Any]:
    from .report import run_numbers

    schedule = campaign.schedule
    with store.engine.connect() as conn:
        last = q.last_run(conn, campaign.id)
        missed = q.runs_with_status(conn, campaign.id, RunStatus.MISSED)
        failed = failed_fires(conn, campaign.id)
        done = one_off_done(conn, campaign.id) if schedule and schedule.at else None
        number = run_numbers(conn, campaign.id)
    nxt = None if done is not None or schedule is None else next_fire(campaign, settings, now)
    return {
        "file": path.name, "campaign": campaign.id,
        "schedule": _describe(campaign) if schedule else None,
        "next_local": _local(nxt, settings), "next_utc": _utc(nxt),
        "why": None if nxt else no_next_fire(campaign, settings, done, number),
        "last_run": None if last is None else {
            "id": last.id, "number": number[last.id], "occurrence": last.occurrence,
            "status": last.status, "trigger": last.trigger,
            "scheduled_utc": _utc(last.scheduled_at), "late_s": last.late_s,
            "total": last.total, "finished_utc": _utc(last.finished_at), "note": last.note},
        "missed": [{"occurrence": r.occurrence, "scheduled_utc": _utc(r.scheduled_at),
                    "note": r.note} for r in missed],
        "failed": [{"run": r.id, "number": number[r.id], "occurrence": r.occurrence,
                    "status": r.status, "scheduled_utc": _utc(r.scheduled_at), "note": r.note}
                   for r in failed],
    }


def no_next_fire(campaign: Campaign, settings: Settings, done: q.Run | None,
                 number: dict[int, int]) -> str:
    """Why a campaign will not fire again: one clause for `mailer schedule`."""
    from .report import local_time

    schedule = campaign.schedule
    send = f"mailer send {campaign.id}"
    if schedule is None:
        return f"no schedule: it goes out only with: {send}"
    if schedule.cron is not None:
        return f"cron {schedule.cron} matches no future time"
    at = local_time(resolve_local(schedule.at or "", settings), settings.tz)
    if done is None:
        return (f"its time {at} has passed (mailer run sends it within "
                f"misfire_grace_s={settings.scheduler.misfire_grace_s:g} s of it, else records "
                f"it as missed)")
    run = f"run {number[done.id]}"
    if done.status == RunStatus.FINISHED:
        when = local_time(done.finished_at or done.created_at, settings.tz)
        by = ", by mailer send" if done.trigger != TRIGGER else ""
        return f"already sent on {when} ({run}{by}, {done.total} recipients)"
    if done.status == RunStatus.RUNNING:
        return f"being sent since {local_time(done.created_at, settings.tz)} ({run})"
    if done.status == RunStatus.MISSED:
        return f"missed at {at} ({run}): send it with: {send}"
    return f"its fire at {at} failed ({run}): send it with: {send}"


def kept_jobs(store: Store, settings: Settings) -> dict[str, dict[str, Any]]:
    """The jobs in the store by the file they came from (read-only; `mailer run` owns them)."""
    import pickle

    from sqlalchemy import inspect

    if JOB_TABLE not in inspect(store.engine).get_table_names():
        return {}
    out: dict[str, dict[str, Any]] = {}
    with store.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT id, job_state FROM {JOB_TABLE}")).all()
    for job_id, job_state in rows:
        try:  # our own rows, pickled by APScheduler's SQLAlchemyJobStore
            state = pickle.loads(job_state)
            file, _, rest = str(state["name"]).partition("|")
            nxt = state["next_run_time"]
        except Exception:
            continue  # not ours to judge: mailer run reports jobs it cannot restore
        out[file] = {"campaign": job_id, "schedule": rest.rpartition("|")[0],
                     "next_local": _local(nxt, settings), "next_utc": _utc(nxt)}
    return out
