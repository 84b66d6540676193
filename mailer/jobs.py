"""The job wiring of `mailer run`: what a campaign's schedule means and what a fire does
(triggers, `decide`), the executor, and `CampaignJobs`, which keeps the APScheduler job set in
line with the campaign files (their last good versions). The why is in scheduler.py's doc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Sequence
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
from sqlalchemy import Connection, text

from .campaign import Campaign, campaign_files, resolve_local
from .checks import Checked, check_campaign
from .config import Settings
from .errors import UserError
from .logs import log_event
from .store import FAILED_ONCE, MISSED_ONCE, ONCE, Store
from .store import queries as q
from .triggers import cron_trigger

log = logging.getLogger("mailer.scheduler")  # the scheduler's log lines, whichever module

JOB_TABLE = "scheduler_jobs"
# The job function, as the job store pickles it (by reference): the jobs in existing databases
# hold this text, so `fire` stays in mailer/scheduler.py under that name.
JOB_FUNC = "mailer.scheduler:fire"
MAX_INSTANCES = 1000  # different occurrences of one campaign may overlap; each is its own run


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


def one_off_done(conn: Connection, campaign_id: str) -> q.Run | None:
    """The run that settled a one-off campaign: sent (or being sent), recorded missed or failed."""
    for occurrence in (ONCE, MISSED_ONCE, FAILED_ONCE):
        if (run := q.find_run(conn, campaign_id, occurrence)) is not None:
            return run
    return None


# --- the executor -----------------------------------------------------------------------------


class Firer(Protocol):
    """What the job wiring needs of the runner that fires its jobs (scheduler.Runner)."""

    def now(self) -> datetime: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    async def fire(self, campaign_id: str, run_times: Sequence[datetime]) -> None: ...


class OccurrenceExecutor(AsyncIOExecutor):
    """Runs `fire` with the fire times it stands for, as a task of the runner that owns us."""

    def __init__(self, runner: Firer) -> None:
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


# --- the campaign files and the job set -------------------------------------------------------


@dataclass
class Known:
    """A campaign file as last seen: its stamp, the id it last validated with, its error now."""

    stamp: tuple[int, int]
    campaign_id: str | None = None
    error: str | None = None


@dataclass
class CampaignJobs:
    """The campaign files as last checked, the last good version of each, and the job set kept
    in line with them: the part of a `mailer run` runner that wires campaigns to APScheduler."""

    settings: Settings
    store: Store
    config_path: str
    good: dict[str, tuple[Path, Checked]] = field(default_factory=dict)
    files: dict[Path, Known] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

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
                      schedule=schedule_text(campaign))
            return
        log_event("campaign-invalid", level=logging.WARNING, file=path.name,
                  keeps=known.campaign_id and "its last good version", error=known.error)

    def checked(self, campaign_id: str) -> tuple[Path, Checked] | None:
        if self.changed():
            self.load_changes()
        return self.good.get(campaign_id)

    # -- the job set -----------------------------------------------------------------------

    def make_scheduler(self, runner: Firer) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone=self.settings.tz)
        scheduler.add_jobstore(SQLAlchemyJobStore(engine=self.store.engine, tablename=JOB_TABLE))
        scheduler.add_executor(OccurrenceExecutor(runner))
        return scheduler

    async def sync(self, scheduler: AsyncIOScheduler, *, force: bool = False) -> None:
        if force or self.changed():
            dirty = await asyncio.to_thread(self.load_changes)
            if dirty or force:
                self.reconcile(scheduler)

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
            scheduler.add_job(JOB_FUNC, trigger, args=args, id=campaign.id, name=name,
                              misfire_grace_time=None, coalesce=False,
                              max_instances=MAX_INSTANCES, replace_existing=True)
        else:
            scheduler.modify_job(campaign.id, name=name, args=args)
            scheduler.reschedule_job(campaign.id, trigger=trigger)
        job = scheduler.get_job(campaign.id)
        nxt = getattr(job, "next_run_time", None)
        log_event("job-scheduled", campaign=campaign.id, schedule=schedule_text(campaign),
                  next_local=local_isoformat(nxt, self.settings), next_utc=utc_isoformat(nxt))

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

    async def catch_up(self, scheduler: AsyncIOScheduler, before: dict[str, str],
                       runner: Firer) -> None:
        """Fire the occurrences lost between the job store's update and the ledger's insert."""
        for job in scheduler.get_jobs():
            if before.get(job.id) != job.name:
                continue  # new or changed since the last process: nothing can have been lost
            lost = await asyncio.to_thread(self.lost_fires, job, runner.now())
            if lost:
                log_event("catch-up", campaign=job.id, fires=len(lost),
                          first=utc_isoformat(lost[0]))
                runner.spawn(runner.fire(job.id, lost))


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
                     "next_local": local_isoformat(nxt, settings), "next_utc": utc_isoformat(nxt)}
    return out


# --- texts of the log lines and of `mailer schedule` ------------------------------------------


def schedule_text(campaign: Campaign) -> str:
    s = campaign.schedule
    if s is None:
        return "none"
    return f"cron {s.cron}" if s.cron is not None else f"at {s.at}"


def local_isoformat(when: datetime | None, settings: Settings) -> str | None:
    return when.astimezone(settings.tz).isoformat() if when else None


def utc_isoformat(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat() if when else None


def file_problem(exc: Exception, path: Path) -> str:
    """One line for a file that did not pass the checks; a bug's traceback goes to the log."""
    if isinstance(exc, UserError):
        return exc.sentence()
    log.error("event=campaign-check-crashed file=%s", path.name, exc_info=True)
    detail = " ".join(str(exc).split())[:300]
    return f"{path}: could not be checked ({type(exc).__name__}: {detail}); please report this"
