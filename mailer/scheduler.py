"""`mailer run`: the worker loop (`Runner`, `serve`) and the job function `fire`.

`mailer run` keeps one APScheduler 3 `AsyncIOScheduler` in the event loop that also runs
dispatch. Jobs live in a `SQLAlchemyJobStore` (table `scheduler_jobs`) in the ledger's database,
one job per campaign id; the job function is `fire(campaign_id, config_path)`. Who leads is
leader.py's; the triggers, the decisions and the job set are jobs.py's (`CampaignJobs`, which
the runner owns); `mailer schedule` is schedule_view.py's.

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

One scheduler per database: the one that holds the lock leads (leader.py); the others send
beside it, poll and take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, update

from . import heartbeat
from .campaign import Campaign
from .checks import Checked
from .config import Settings, load_settings
from .errors import MailerError, UserError
from .files import private_dir
from .jobs import CampaignJobs, Decision, decide, is_fire_time, one_off_done, utc_isoformat
from .leader import Leadership, leader_for
from .logs import log_event
from .redact import redact_addresses
from .store import FAILED_ONCE, MISSED_ONCE, ONCE, RunStatus, Store, open_store
from .store import queries as q
from .store.tables import runs

log = logging.getLogger("mailer.scheduler")

FIRE_FAILED = "fire failed"  # how the note of a run whose delivery a failure cut off begins
TRIGGER = "scheduler"

STOP_GRACE_S = 10.0  # on SIGTERM, in-flight transactions get smtp.timeout_s plus this

Clock = Callable[[], datetime]


utcnow = q.utcnow  # one clock for the ledger and the scheduler


# --- named queries (scheduler only) -----------------------------------------------------------


def note_run(conn: Connection, run_id: int, note: str) -> None:
    conn.execute(update(runs).where(runs.c.id == run_id).values(note=note))


def failed_fires(conn: Connection, campaign_id: str) -> list[q.Run]:
    """Fires that failed: runs recorded `failed`, and running ones a failure cut off."""
    failed = q.runs_with_status(conn, campaign_id, RunStatus.FAILED)
    cut = [r for r in q.runs_with_status(conn, campaign_id, RunStatus.RUNNING)
           if (r.note or "").startswith(FIRE_FAILED)]
    return sorted(failed + cut, key=lambda r: r.id, reverse=True)


# --- the job function -------------------------------------------------------------------------


async def fire(campaign_id: str, config_path: str, *, run_times: Sequence[datetime] = (),
               runner: Runner | None = None) -> None:
    """The job function: importable, with picklable arguments only (what the job store keeps).

    `mailer run`'s executor hands over the runner that fires it; a job run any other way
    (no runner) loads everything from the config path it was stored with. The job store keeps
    it by reference, as the text jobs.JOB_FUNC ("mailer.scheduler:fire"), in every database
    that ever ran `mailer run`: it stays in this module under this name.
    """
    if runner is None:
        settings = load_settings(config_path)
        runner = Runner(settings=settings,
                        store=open_store(settings.database_url, var_dir=settings.var_dir),
                        config_path=config_path)  # its fire loads the campaign files
    await runner.fire(campaign_id, run_times or [runner.now()])


# --- the runner -------------------------------------------------------------------------------


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
    """One `mailer run` process: fires runs; its `jobs` keep the job set in line with
    campaigns/."""

    settings: Settings
    store: Store
    config_path: str
    now: Clock = utcnow
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sending: set[int] = field(default_factory=set)  # runs a dispatcher of ours is sending
    jobs: CampaignJobs = field(init=False)

    def __post_init__(self) -> None:
        # The embedded capture server files mail under var/outbox/ but does not create var/
        # (absent on a fresh PostgreSQL setup, where no SQLite file put it there).
        private_dir(self.settings.var_dir)
        self.jobs = CampaignJobs(self.settings, self.store, self.config_path)

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
        found = await asyncio.to_thread(self.jobs.checked, campaign_id)
        if found is None:
            log_event("fire-skipped", level=logging.WARNING, campaign=campaign_id,
                      reason="no valid campaign file with this id any more")
            return
        path, checked = found
        firing.campaign = checked.campaign
        broken = self.jobs.files.get(path)
        if broken is not None and broken.error:
            log_event("fire-last-good", level=logging.WARNING, campaign=campaign_id,
                      file=path.name, error=broken.error,
                      note="the file is broken; its last good version is used")
        decision = decide(checked.campaign, firing.run_times, now=self.now(),
                          grace_s=self.settings.scheduler.misfire_grace_s, zone=self.settings.tz)
        firing.decision = decision
        if not is_fire_time(checked.campaign, self.settings, decision.scheduled_at):
            log_event("fire-skipped", campaign=campaign_id,
                      scheduled=utc_isoformat(decision.scheduled_at),
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
                occurrence = utc_isoformat(scheduled) or f"failed-{local:%Y%m%dT%H%M%S}"
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
            found = self.jobs.good.get(run.campaign_id)
            if found is None:
                log_event("resume-impossible", level=logging.ERROR, campaign=run.campaign_id,
                          run=run.id, reason="no valid campaign file with this id")
                continue
            log_event("resume", campaign=run.campaign_id, run=run.id, occurrence=run.occurrence)
            self.spawn(self._resume(found[1], run))

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
                await asyncio.to_thread(self.jobs.load_changes)
                for run in await asyncio.to_thread(self.runs_to_help):
                    found = self.jobs.good.get(run.campaign_id)
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

    def poll_mailbox(self) -> asyncio.Task[None] | None:
        """Returned mail is read on its own interval while we lead (mailbox.py), when an IMAP
        mailbox is configured."""
        if self.settings.mailbox is None:
            return None
        from .mailbox import poll

        return asyncio.create_task(poll(self.store, self.settings, self.stop))

    async def lead(self, leader: Leadership, *, once: bool) -> None:
        """Run the scheduler while we hold the lock (or, with once, until what is due is done)."""
        scheduler = self.jobs.make_scheduler(self)
        scheduler.start(paused=True)
        poller: asyncio.Task[None] | None = None
        try:
            before = {job.id: job.name for job in scheduler.get_jobs()}
            await self.jobs.sync(scheduler, force=True)
            await self.resume_unfinished()
            await self.jobs.catch_up(scheduler, before, self)
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
                await self.jobs.sync(scheduler)
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
    store = store or open_store(settings.database_url, var_dir=settings.var_dir)
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
    invalid = {path: known.error for path, known in sorted(runner.jobs.files.items())
               if known.error}
    for path, error in invalid.items():
        if on_invalid is not None:
            on_invalid(path, error)
    return 1 if once and invalid else 0

