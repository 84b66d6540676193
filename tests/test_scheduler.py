"""The scheduler: triggers (DST, weekdays), misfires, exactly-once, and a few real-time runs."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from mailer.config import SchedulerSettings, Settings
from mailer.jobs import JOB_TABLE, decide, kept_jobs
from mailer.leader import LOCK_KEYS, PostgresLeader
from mailer.schedule_view import schedule_overview
from mailer.scheduler import FIRE_FAILED, Runner, serve
from mailer.store import FAILED_ONCE, MISSED_ONCE, ONCE, RunStatus, Store, open_store
from mailer.store import queries as q
from mailer.triggers import cron_trigger, crontab_weekdays
from tests.conftest import Project, both_databases
from tests.helpers import refuse_sent_rows

BERLIN = ZoneInfo("Europe/Berlin")
CAMPAIGN = """\
template: newsletter
audience: {{lists: [partners]}}
content: {{de: {{subject: "x", blocks: [{{heading: "Hallo"}}]}}}}
schedule: {{{schedule}}}
"""


def campaign_text(schedule: str) -> str:
    return CAMPAIGN.format(schedule=schedule)


def at_text(when: datetime) -> str:
    return campaign_text(f'at: "{when.astimezone(BERLIN):%Y-%m-%d %H:%M:%S}"')


def fires_on(trigger: CronTrigger, day: datetime) -> list[datetime]:
    """Every fire time of the trigger during one local calendar day, in UTC."""
    start = day.replace(hour=0, minute=0, tzinfo=BERLIN)
    end = start + timedelta(days=1, hours=1)
    out, prev, now = [], None, start - timedelta(seconds=1)
    while True:
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None or nxt.astimezone(UTC) >= end.astimezone(UTC):
            return out
        if nxt.astimezone(BERLIN).date() == day.date():
            out.append(nxt.astimezone(UTC))
        prev = now = nxt


def fast(settings: Settings, **changes: float) -> Settings:
    sched = SchedulerSettings(**{"misfire_grace_s": 3600, "poll_s": 0.2, **changes})
    return settings.model_copy(update={"scheduler": sched})


def outbox(settings: Settings) -> list[Path]:
    folder = settings.outbox_dir / "new"
    return sorted(folder.iterdir()) if folder.exists() else []


def runs_of(settings: Settings, campaign_id: str) -> list[q.Run]:
    with open_store(settings.database_url).engine.connect() as conn:
        return q.runs_of(conn, campaign_id)


async def until(check: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


# --- triggers: daylight saving time and weekdays ----------------------------------------------


def test_spring_forward_fires_once_an_hour_later_on_the_clock() -> None:
    trigger = cron_trigger("30 2 * * *", BERLIN)
    fires = fires_on(trigger, datetime(2027, 3, 28))
    # 02:30 does not exist that night; it fires once, at 03:30 CEST = 01:30 UTC (module doc).
    assert fires == [datetime(2027, 3, 28, 1, 30, tzinfo=UTC)]
    assert fires_on(trigger, datetime(2027, 3, 29)) == [datetime(2027, 3, 29, 0, 30, tzinfo=UTC)]


@pytest.mark.parametrize("day", [datetime(2026, 10, 25), datetime(2027, 10, 31)])
def test_fall_back_fires_once_at_the_first_pass(day: datetime) -> None:
    plain = CronTrigger.from_crontab("30 2 * * *", timezone=BERLIN)
    assert len(fires_on(plain, day)) == 2  # what APScheduler alone would do
    fires = fires_on(cron_trigger("30 2 * * *", BERLIN), day)
    assert fires == [day.replace(hour=0, minute=30, tzinfo=UTC)]  # 02:30 CEST


def test_hourly_cron_keeps_both_passes_of_the_repeated_hour() -> None:
    fires = fires_on(cron_trigger("30 * * * *", BERLIN), datetime(2026, 10, 25))
    assert len(fires) == 25  # that day has 25 hours


def test_fixed_hour_trigger_survives_the_job_store_pickle() -> None:
    trigger = pickle.loads(pickle.dumps(cron_trigger("30 2 * * *", BERLIN)))
    assert len(fires_on(trigger, datetime(2026, 10, 25))) == 1


@pytest.mark.parametrize(("field", "expected"), [
    ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"), ("*/2", "sun,tue,thu,sat"),
    ("0-6", "*"), ("mon-fri", "mon-fri"), ("*", "*"), ("5,0", "fri,sun"),
])
def test_weekdays_mean_what_they_mean_in_crontab(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


def test_sunday_cron_fires_on_sunday() -> None:
    nxt = cron_trigger("0 9 * * 0", BERLIN).get_next_fire_time(
        None, datetime(2026, 12, 1, tzinfo=BERLIN))
    assert nxt is not None and nxt.strftime("%A %H:%M") == "Sunday 09:00"


# --- deciding a fire --------------------------------------------------------------------------


def test_decide_grace_and_coalescing(project: Project) -> None:
    from mailer.campaign import load_campaign

    settings = project.settings()
    cron = load_campaign(project.campaign("c.yaml", campaign_text('cron: "0 8 * * *"')), settings)
    at = load_campaign(project.campaign("a.yaml", campaign_text('at: "2026-12-03 09:00"')),
                       settings)
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    late = decide(cron, [t], now=t + timedelta(minutes=10), grace_s=3600, zone=BERLIN)
    assert (late.send, late.late_s, late.occurrence) == (True, 600.0, "2026-12-01T07:00:00+00:00")
    many = [t - timedelta(days=2), t - timedelta(days=1), t]
    missed = decide(cron, many, now=t + timedelta(hours=2), grace_s=3600, zone=BERLIN)
    assert not missed.send and missed.occurrence == "2026-12-01T07:00:00+00:00"
    assert missed.note and "2 earlier occurrences" in missed.note and "mailer send c" in missed.note
    assert decide(at, [t], now=t, grace_s=3600, zone=BERLIN).occurrence == ONCE
    assert decide(at, [t], now=t + timedelta(hours=2), grace_s=3600,
                  zone=BERLIN).occurrence == MISSED_ONCE


# --- fires with an injected clock -------------------------------------------------------------


def runner_for(project: Project, now: datetime, *, store: Store | None = None,
               **changes: float) -> Runner:
    settings = fast(project.settings(), **changes)
    runner = Runner(settings=settings, store=store or open_store(settings.database_url),
                    config_path=str(project.config), now=lambda: now)
    runner.jobs.load_changes()
    return runner


async def test_missed_beyond_grace_is_recorded_and_not_sent(project: Project) -> None:
    t = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    project.campaign("late.yaml", at_text(t))
    runner = runner_for(project, t + timedelta(hours=2))
    await runner.fire("late", [t])
    [run] = runs_of(runner.settings, "late")
    assert (run.status, run.occurrence, run.total) == (RunStatus.MISSED, MISSED_ONCE, 0)
    assert run.note and "mailer send late" in run.note and run.late_s == 7200
    assert outbox(runner.settings) == []
    await runner.fire("late", [t])  # a second fire of the same missed occurrence adds nothing
    assert len(runs_of(runner.settings, "late")) == 1
    # staff can still send it: the one-off occurrence "once" is free for `mailer send`
    from mailer.checks import check_campaign
    from mailer.sending import plan_run

    checked = check_campaign(project.root / "campaigns" / "late.yaml", runner.settings)
    plan = plan_run(checked, runner.settings, runner.store, again=False, retry_failed=False)
    assert plan.run is not None and plan.run.occurrence == ONCE


async def test_within_grace_is_sent_late_with_late_s(project: Project) -> None:
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("weekly.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, t + timedelta(minutes=10))
    await runner.fire("weekly", [t - timedelta(days=1), t])
    [run] = runs_of(runner.settings, "weekly")
    assert run.status == RunStatus.FINISHED and run.late_s == 600
    assert run.occurrence == "2026-12-01T07:00:00+00:00"
    assert len(outbox(runner.settings)) == run.total > 0


@both_databases
async def test_two_fires_of_one_occurrence_make_one_run(project: Project) -> None:
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    one = runner_for(project, t)
    two = runner_for(project, t)  # its own Store on the same database, in the same process
    await asyncio.gather(one.fire("daily", [t]), two.fire("daily", [t]))
    [run] = runs_of(one.settings, "daily")
    assert run.status == RunStatus.FINISHED
    assert len(outbox(one.settings)) == run.total


async def test_a_fire_after_the_file_changed_follows_the_new_schedule(project: Project) -> None:
    t = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    path = project.campaign("moved.yaml", at_text(t))
    runner = runner_for(project, t)
    path.write_text(at_text(t + timedelta(hours=1)), encoding="utf-8")
    await runner.fire("moved", [t])  # the old job fires before the watcher saw the edit
    assert runs_of(runner.settings, "moved") == []
    # ... and the fire of the new time is the one that sends (so the first did nothing
    # because of the edit, not because a fire never does anything)
    later = runner_for(project, t + timedelta(hours=1), store=runner.store)
    await later.fire("moved", [t + timedelta(hours=1)])
    [run] = runs_of(runner.settings, "moved")
    assert run.status == RunStatus.FINISHED and run.scheduled_at == t + timedelta(hours=1)
    assert len(outbox(runner.settings)) == run.total > 0


# --- a real scheduler in real time ------------------------------------------------------------


class Running:
    """`mailer run` as a task in this loop."""

    def __init__(self, settings: Settings, project: Project) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(serve(settings, str(project.config), stop=self.stop))

    async def close(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, 15)


def jobs(settings: Settings) -> list[str]:
    from sqlalchemy import inspect, text

    engine = open_store(settings.database_url).engine
    if JOB_TABLE not in inspect(engine).get_table_names():
        return []  # the scheduler has not started yet
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text(f"SELECT id FROM {JOB_TABLE}"))]


async def test_at_fires_within_a_second_and_not_again_after_an_edit(project: Project) -> None:
    settings = fast(project.settings())
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    path = project.campaign("soon.yaml", at_text(when))
    running = Running(settings, project)
    try:
        await until(lambda: outbox(settings), 8)
        first = min(p.stat().st_mtime for p in outbox(settings))
        assert 0 <= first - when.timestamp() < 1.0
        await until(lambda: runs_of(settings, "soon")[0].status == RunStatus.FINISHED, 5)
        assert "soon" not in jobs(settings)
        path.write_text(at_text(when + timedelta(hours=1)), encoding="utf-8")
        # A file written after the edit: once the watcher has seen it, it has seen the edit.
        project.campaign("control.yaml", at_text(when + timedelta(hours=2)))
        await until(lambda: "control" in jobs(settings), 5)
        await asyncio.sleep(0.5)  # and a few polls more
        assert len(runs_of(settings, "soon")) == 1 and "soon" not in jobs(settings)
    finally:
        assert await running.close() == 0


async def test_edited_at_moves_and_deleted_file_removes_the_job(project: Project) -> None:
    settings = fast(project.settings())
    now = datetime.now(UTC).replace(microsecond=0)
    moved = project.campaign("moved.yaml", at_text(now + timedelta(minutes=30)))
    gone = project.campaign("gone.yaml", at_text(now + timedelta(minutes=30)))
    running = Running(settings, project)
    try:
        await until(lambda: sorted(jobs(settings)) == ["gone", "moved"], 5)
        gone.unlink()
        new_time = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        moved.write_text(at_text(new_time), encoding="utf-8")
        await until(lambda: "gone" not in jobs(settings), 5)  # removed, long before its time
        await until(lambda: runs_of(settings, "moved"), 6)  # the same watcher saw the edit
        [run] = runs_of(settings, "moved")
        assert run.scheduled_at == new_time
        assert runs_of(settings, "gone") == []
    finally:
        assert await running.close() == 0


@both_databases
async def test_two_schedulers_send_each_occurrence_once(project: Project) -> None:
    settings = fast(project.settings())
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    project.campaign("both.yaml", at_text(when))
    one, two = Running(settings, project), Running(settings, project)
    try:
        await until(lambda: [r for r in runs_of(settings, "both") if r.status == "finished"], 8)
        await asyncio.sleep(1.0)
        [run] = runs_of(settings, "both")
        assert len(outbox(settings)) == run.total > 0
    finally:
        assert await one.close() == 0
        assert await two.close() == 0


async def test_broken_file_keeps_its_last_good_schedule(project: Project,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    settings = fast(project.settings())
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    path = project.campaign("typo.yaml", at_text(when))
    running = Running(settings, project)
    try:
        await until(lambda: "typo" in jobs(settings), 5)
        path.write_text(at_text(when).replace("template:", "templat:"), encoding="utf-8")
        await until(lambda: runs_of(settings, "typo"), 6)
        errors = [r.message for r in caplog.records if "campaign-invalid" in r.message]
        assert len(errors) == 1 and "typo.yaml" in errors[0]
    finally:
        assert await running.close() == 0


async def test_once_sends_what_is_due_and_resumes_unfinished(project: Project) -> None:
    settings = fast(project.settings())
    project.campaign("past.yaml", at_text(datetime.now(UTC) - timedelta(minutes=10)))
    project.campaign("future.yaml", at_text(datetime.now(UTC) + timedelta(days=1)))
    project.campaign("cut.yaml", campaign_text('cron: "0 8 * * *"'))
    from mailer.checks import check_campaign
    from mailer.dispatch import start_run
    from mailer.sending import audience

    store = open_store(settings.database_url)
    checked = check_campaign(project.root / "campaigns" / "cut.yaml", settings)
    start_run(store, campaign_id="cut", occurrence="2026-12-01T07:00:00+00:00",
              trigger="scheduler", recipients=audience(checked, settings, store))
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 15) == 0
    [past] = runs_of(settings, "past")
    assert past.status == RunStatus.FINISHED and 590 < (past.late_s or 0) < 700
    assert runs_of(settings, "future") == []
    assert [r.status for r in runs_of(settings, "cut")] == [RunStatus.FINISHED]
    overview = {row["campaign"]: row for row in schedule_overview(settings, store)}
    assert overview["future"]["next_local"] and overview["past"]["next_local"] is None
    assert overview["past"]["last_run"]["status"] == "finished"


@both_databases
def test_follower_takes_over_when_the_leader_is_killed(project: Project) -> None:
    config = project.config.read_text().replace(
        "scheduler:\n  misfire_grace_s: 3600", "scheduler:\n  misfire_grace_s: 3600\n  poll_s: 0.3")
    project.config.write_text(config)
    settings = project.settings()
    env = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config)}
    cmd = [sys.executable, "-m", "mailer", "run"]
    log_a, log_b = project.root / "a.log", project.root / "b.log"
    with open(log_a, "w") as fa, open(log_b, "w") as fb:
        leader = subprocess.Popen(cmd, env=env, stderr=fa, stdout=fa)
        wait_for_text(log_a, "event=leader", 10)
        follower = subprocess.Popen(cmd, env=env, stderr=fb, stdout=fb)
        try:
            wait_for_text(log_b, "event=standby", 10)
            when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
            project.campaign("takeover.yaml", at_text(when))
            time.sleep(1.0)  # the leader picks the new file up and stores its job
            leader.kill()
            leader.wait(5)
            wait_for_text(log_b, "event=leader", 5)
            wait_for_text(log_b, "event=finished campaign=takeover", 10)
            follower.send_signal(signal.SIGTERM)
            assert follower.wait(10) == 0
        finally:
            for proc in (leader, follower):
                if proc.poll() is None:
                    proc.kill()
    [run] = runs_of(settings, "takeover")
    assert run.status == RunStatus.FINISHED and len(outbox(settings)) == run.total


def wait_for_text(path: Path, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"'{needle}' not in {path.name}:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)


@both_databases
async def test_a_fire_lost_between_job_store_and_ledger_is_caught_up(project: Project) -> None:
    """kill -9 after APScheduler advanced the job but before the run was written."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    settings = fast(project.settings())
    project.campaign("minutely.yaml", campaign_text('cron: "* * * * *"'))
    if (second := datetime.now(UTC).second) > 45:  # no minute may turn while this runs
        await asyncio.sleep(61 - second)
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 15) == 0
    lost = datetime.now(UTC).replace(second=0, microsecond=0)
    store = open_store(settings.database_url)
    assert runs_of(settings, "minutely") == []
    # What the killed leader left behind: the job already points past `lost`, no run exists.
    sched = BackgroundScheduler(timezone=BERLIN)
    sched.add_jobstore(SQLAlchemyJobStore(engine=store.engine, tablename=JOB_TABLE))
    sched.start(paused=True)
    sched.modify_job("minutely", next_run_time=lost + timedelta(minutes=1))
    sched.shutdown(wait=False)
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 15) == 0
    occurrences = {r.occurrence: r for r in runs_of(settings, "minutely")}
    run = occurrences[lost.isoformat()]
    assert run.status == RunStatus.FINISHED and run.total > 0
    # Starting once more finds the occurrence in the ledger and does not send it again.
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 15) == 0
    assert [r.occurrence for r in runs_of(settings, "minutely")].count(lost.isoformat()) == 1


# --- broken campaign files never stop the scheduler (issue 8, trust boundaries) -----------------

BROKEN = {  # each took `mailer run` down before the loader had budgets: (text, line)
    "deep.yaml": ("[" * 100_000 + "\n", 1),
    "digits.yaml": (campaign_text('at: "2030-01-01 09:00"') + "extra: " + "9" * 5000 + "\n", 5),
}


def invalid_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "event=campaign-invalid" in r.getMessage() and f"file={name}" in r.getMessage()
            and r.levelno == logging.WARNING]


async def test_broken_files_are_skipped_and_the_others_fire(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailer.scheduler")
    settings = fast(project.settings())
    project.campaign("due.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5)))
    for name, (text, _) in BROKEN.items():
        project.campaign(name, text)
    skipped: list[str] = []
    # --once exits 1 when a file was invalid (the others fired); each is named once.
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True, on_invalid=(
        lambda path, error: skipped.append(path.name))), 30) == 1
    assert sorted(skipped) == sorted(BROKEN)
    [run] = runs_of(settings, "due")
    assert run.status == RunStatus.FINISHED and len(outbox(settings)) == run.total > 0
    for name, (_, number) in BROKEN.items():
        [line] = invalid_lines(caplog, name)
        assert "\n" not in line and f"{name}, line {number}: " in line
    rows = {row["file"]: row for row in schedule_overview(settings, open_store(
        settings.database_url))}
    assert "nested more than" in rows["deep.yaml"]["error"] and rows["deep.yaml"]["kept"] is None
    assert "4,300 digits" in rows["digits.yaml"]["error"] and rows["due.yaml"]["last_run"]


async def test_an_unexpected_error_checking_one_file_does_not_stop_the_others(
        project: Project, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug further down the pipeline (not a UserError) costs one file, not the scheduler."""
    from mailer import jobs

    def check(path: Path, *args: object, **kwargs: object) -> object:
        if path.name == "bug.yaml":
            raise RuntimeError("a bug in a later stage")
        return real(path, *args, **kwargs)

    real = jobs.check_campaign
    monkeypatch.setattr(jobs, "check_campaign", check)
    settings = fast(project.settings())
    project.campaign("due.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5)))
    project.campaign("bug.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5)))
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 30) == 1
    assert [r.status for r in runs_of(settings, "due")] == [RunStatus.FINISHED]
    assert runs_of(settings, "bug") == []
    [line] = invalid_lines(caplog, "bug.yaml")
    assert "RuntimeError: a bug in a later stage" in line
    assert [r for r in caplog.records if "campaign-check-crashed" in r.getMessage()
            and r.exc_info and r.levelno == logging.ERROR]


async def test_a_fire_after_the_file_broke_sends_the_last_good_version_and_says_so(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    t = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    path = project.campaign("slip.yaml", at_text(t))
    runner = runner_for(project, t)
    path.write_text("[" * 100_000, encoding="utf-8")  # the slip, just before the fire
    await runner.fire("slip", [t])
    [run] = runs_of(runner.settings, "slip")
    assert run.status == RunStatus.FINISHED and len(outbox(runner.settings)) == run.total > 0
    assert invalid_lines(caplog, "slip.yaml")
    [kept] = [r for r in caplog.records if "event=fire-last-good" in r.getMessage()]
    assert kept.levelno == logging.WARNING and "slip.yaml" in kept.getMessage()


async def test_a_file_broken_while_running_keeps_its_job_and_shows_as_broken(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    settings = fast(project.settings())
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    path = project.campaign("later.yaml", at_text(when))
    project.campaign("other.yaml", at_text(when + timedelta(hours=1)))
    running = Running(settings, project)
    try:
        await until(lambda: sorted(jobs(settings)) == ["later", "other"], 5)
        path.write_text("[" * 100_000, encoding="utf-8")
        await until(lambda: invalid_lines(caplog, "later.yaml"), 5)
        # More polls, and they do run: an edit of the other file made now is picked up.
        store = open_store(settings.database_url)
        moved = when + timedelta(hours=3)
        project.campaign("other.yaml", at_text(moved))
        await until(lambda: kept_jobs(store, settings)["other.yaml"]["next_utc"]
                    == moved.isoformat(), 5)
        await asyncio.sleep(0.5)
        assert not running.task.done() and sorted(jobs(settings)) == ["later", "other"]
        assert len(invalid_lines(caplog, "later.yaml")) == 1  # once per change, not per poll
        [row] = [r for r in schedule_overview(settings, store) if r["file"] == "later.yaml"]
        assert "nested more than" in row["error"] and row["kept"]["campaign"] == "later"
        assert row["kept"]["next_utc"] == when.isoformat()
        env = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config)}
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mailer", "schedule"], capture_output=True,
            text=True, env=env, cwd=project.root, timeout=60)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr
        [line] = [x for x in shown.stderr.splitlines() if "later.yaml" in x]
        assert line.startswith("error: ") and "keeps the last good schedule of later" in line
        assert "other: at " in shown.stdout
    finally:
        assert await running.close() == 0


# --- a fire that fails is recorded, never only logged (issue 14) --------------------------------


def refuse_inserts(store: Store, table: str, *, on: bool) -> None:
    """A trigger that makes every INSERT into `table` fail, as a full disk or a lost database
    would: the real database refuses, nothing in the code is replaced."""
    name = f"refuse_{table}"
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} refused <a@example.org>'); END" if on
                else f"DROP TRIGGER {name}")
        elif on:
            conn.exec_driver_sql(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"RAISE EXCEPTION '{table} refused <a@example.org>'; END $$")
            conn.exec_driver_sql(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                                 f"FOR EACH ROW EXECUTE FUNCTION {name}()")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
            conn.exec_driver_sql(f"DROP FUNCTION {name}()")


def overview_of(settings: Settings, campaign_id: str) -> dict[str, Any]:
    rows = schedule_overview(settings, open_store(settings.database_url))
    [row] = [r for r in rows if r["campaign"] == campaign_id]
    return row


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"{r.getMessage()} ".startswith(f"event={event} ")]


async def test_a_fire_that_fails_before_its_run_is_recorded_as_failed(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    """A list file broken after the campaign was loaded: the occurrence is not lost."""
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, t + timedelta(minutes=1))
    lists = project.root / "lists" / "partners.yaml"
    good = lists.read_text()
    lists.write_text("- {email: [unclosed\n")
    await runner.fire("daily", [t])
    lists.write_text(good)  # fixed by the time someone looks
    [run] = runs_of(runner.settings, "daily")
    assert (run.status, run.occurrence, run.total) == (RunStatus.FAILED, t.isoformat(), 0)
    assert run.scheduled_at == t and run.late_s == 60
    assert run.note and "partners.yaml, line 1: YAML syntax error" in run.note
    assert "mailer send daily" in run.note and outbox(runner.settings) == []
    [logged] = events(caplog, "fire-failed")
    assert logged.levelno == logging.ERROR and "partners.yaml, line 1" in logged.getMessage()
    row = overview_of(runner.settings, "daily")
    assert row["last_run"]["status"] == "failed"
    [failed] = row["failed"]
    assert failed["status"] == "failed" and failed["occurrence"] == t.isoformat()
    assert "YAML syntax error" in failed["note"]
    await runner.fire("daily", [t])  # a second fire of that occurrence adds nothing
    assert [r.status for r in runs_of(runner.settings, "daily")] == [RunStatus.FAILED]


@both_databases
async def test_a_database_fault_in_a_fire_is_recorded_with_its_reason(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    """Not a user error: the database refuses the snapshot. Failed run, traceback logged."""
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, t)
    refuse_inserts(runner.store, "deliveries", on=True)
    await runner.fire("daily", [t])
    [run] = runs_of(runner.settings, "daily")
    assert run.status == RunStatus.FAILED and run.note and "deliveries refused" in run.note
    assert "a@example.org" not in run.note and "<address>" in run.note  # no addresses
    [logged] = events(caplog, "fire-failed")
    assert "deliveries refused <address>" in logged.getMessage()
    assert [r for r in caplog.records if r.exc_info and "fire-failed" in r.getMessage()]
    assert outbox(runner.settings) == []


async def test_a_failed_one_off_leaves_once_to_mailer_send_and_is_not_fired_again(
        project: Project) -> None:
    t = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    project.campaign("oneoff.yaml", at_text(t))
    runner = runner_for(project, t)
    lists = project.root / "lists" / "partners.yaml"
    good = lists.read_text()
    lists.write_text("- {email: [unclosed\n")
    await runner.fire("oneoff", [t])
    lists.write_text(good)
    [run] = runs_of(runner.settings, "oneoff")
    assert (run.status, run.occurrence) == (RunStatus.FAILED, FAILED_ONCE)
    assert overview_of(runner.settings, "oneoff")["next_local"] is None
    # A restart within the grace period does not send it behind the staff's back ...
    assert await asyncio.wait_for(serve(runner.settings, str(project.config), once=True),
                                  15) == 0
    assert [r.occurrence for r in runs_of(runner.settings, "oneoff")] == [FAILED_ONCE]
    assert outbox(runner.settings) == []
    # ... and `mailer send` can: the occurrence "once" is still free.
    from mailer.checks import check_campaign
    from mailer.sending import plan_run

    checked = check_campaign(project.root / "campaigns" / "oneoff.yaml", runner.settings)
    plan = plan_run(checked, runner.settings, runner.store, again=False, retry_failed=False)
    assert plan.run is not None and plan.run.occurrence == ONCE


@both_databases
async def test_a_fire_cut_off_while_sending_stays_resumable_and_says_why(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    """The ledger refuses to record a sent row: the run keeps its rows and is resumed."""
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, t)
    refuse_sent_rows(runner.store, on=True)
    await runner.fire("daily", [t])
    [run] = runs_of(runner.settings, "daily")
    assert run.status == RunStatus.RUNNING and run.total > 0
    assert run.note and run.note.startswith(FIRE_FAILED) and "ledger" in run.note
    [failed] = overview_of(runner.settings, "daily")["failed"]
    assert failed["status"] == "running" and failed["run"] == run.id
    refuse_sent_rows(runner.store, on=False)
    settings = runner.settings
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 30) == 0
    [run] = runs_of(settings, "daily")
    assert run.status == RunStatus.FINISHED
    with runner.store.engine.connect() as conn:
        assert q.status_counts(conn, run.id)["sent"] == run.total
    assert overview_of(settings, "daily")["failed"] == []  # finished: nothing left to do


# Real time runs here: a daily cron fired for real when the test ran within the grace hour
# after 08:00 (CI did, at 07:10 UTC), so the cron is one of 29 February 08:00.
@pytest.mark.parametrize("schedule", ['cron: "0 8 29 2 *"', 'at: "2026-12-03 09:00"'])
async def test_a_resume_that_fails_is_recorded_on_its_run(
        project: Project, caplog: pytest.LogCaptureFixture, schedule: str) -> None:
    settings = fast(project.settings())
    project.campaign("cut.yaml", campaign_text(schedule))
    from mailer.checks import check_campaign
    from mailer.dispatch import start_run
    from mailer.sending import audience

    store = open_store(settings.database_url)
    checked = check_campaign(project.root / "campaigns" / "cut.yaml", settings)
    occurrence = ONCE if schedule.startswith("at") else "2028-02-29T07:00:00+00:00"
    run, _ = start_run(store, campaign_id="cut", occurrence=occurrence,
                       trigger="scheduler", recipients=audience(checked, settings, store))
    refuse_sent_rows(store, on=True)
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 30) == 0
    [cut] = runs_of(settings, "cut")  # the same run, no failed one beside it
    assert (cut.id, cut.status) == (run.id, RunStatus.RUNNING)
    assert cut.note and cut.note.startswith(FIRE_FAILED) and "ledger" in cut.note
    assert "next start of mailer run or by: mailer send cut" in cut.note
    [logged] = events(caplog, "resume-failed")
    assert logged.levelno == logging.ERROR and f"run={run.id}" in logged.getMessage()
    refuse_sent_rows(store, on=False)
    assert await asyncio.wait_for(serve(settings, str(project.config), once=True), 30) == 0
    assert [r.status for r in runs_of(settings, "cut")] == [RunStatus.FINISHED]


@both_databases
async def test_a_failure_that_cannot_be_recorded_is_logged_as_lost(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    t = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, t)
    refuse_inserts(runner.store, "runs", on=True)
    await runner.fire("daily", [t])  # returns: a scheduler does not die of it
    assert runs_of(runner.settings, "daily") == []
    [lost] = events(caplog, "failure-unrecorded")
    assert lost.levelno == logging.ERROR and "runs refused" in lost.getMessage()


# --- the runner is handed over, never looked up --------------------------------------------------


async def test_the_executor_fires_with_its_own_runner(project: Project) -> None:
    """A job stored by a process with another config path still fires on this runner."""
    from apscheduler.triggers.date import DateTrigger

    from mailer.scheduler import fire

    t = datetime.now(UTC).replace(second=0, microsecond=0)
    project.campaign("daily.yaml", campaign_text('cron: "* * * * *"'))
    runner = runner_for(project, t)
    spawned: list[asyncio.Task[None]] = []
    spawn = runner.spawn
    runner.spawn = lambda coro: spawned.append(spawn(coro)) or spawned[-1]  # type: ignore[method-assign]
    scheduler = runner.jobs.make_scheduler(runner)
    scheduler.start(paused=True)
    try:
        scheduler.add_job(fire, DateTrigger(run_date=t), id="daily", misfire_grace_time=None,
                          args=["daily", "/elsewhere/config.yaml"])
        scheduler.resume()
        # Not `runner.tasks`: a task leaves it when done, and a quick fire is done between
        # two looks (the whole suite failed that way in CI three times).
        await until(lambda: spawned, 15)
        [task] = spawned
        await asyncio.wait_for(task, timeout=20)  # raises what the fire raised
    finally:
        scheduler.shutdown(wait=False)
    [run] = runs_of(runner.settings, "daily")
    assert run.status == RunStatus.FINISHED and run.total > 0


async def test_a_job_run_without_a_runner_loads_its_config(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer.scheduler import fire

    for key, value in project.env.items():
        monkeypatch.setenv(key, value)
    project.campaign("daily.yaml", campaign_text('cron: "* * * * *"'))
    t = datetime.now(UTC).replace(second=0, microsecond=0)
    await fire("daily", str(project.config), run_times=[t])
    [run] = runs_of(project.settings(), "daily")
    assert run.occurrence == t.isoformat() and run.status == RunStatus.FINISHED


# --- PostgreSQL leadership: the lock's session lost, the lock taken by another ----------------

postgres_only = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def lock_holder(store: Store) -> int | None:
    """The backend pid holding the scheduler's advisory lock."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return conn.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = :a"
            " AND objid = :b AND objsubid = 2"), {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]}).scalar()


def terminate(store: Store, pid: int) -> None:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


@postgres_only
async def test_a_lost_lock_session_stops_firing_and_leads_again(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailer.scheduler")
    settings = fast(project.settings(), poll_s=0.3)
    store = open_store(settings.database_url)
    running = Running(settings, project)
    try:
        await until(lambda: events(caplog, "leader"), 10)
        first = lock_holder(store)
        assert first is not None
        terminate(store, first)  # the lock's connection dies (a restart, a network cut)
        await until(lambda: events(caplog, "leadership-lost"), 5)
        assert events(caplog, "leader-check-failed")
        await until(lambda: len(events(caplog, "leader")) == 2, 5)
        assert lock_holder(store) not in (None, first)
        when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        project.campaign("after.yaml", at_text(when))
        await until(lambda: [r for r in runs_of(settings, "after")
                             if r.status == RunStatus.FINISHED], 10)
    finally:
        assert await running.close() == 0


@postgres_only
async def test_leadership_taken_by_another_stops_firing_until_it_is_back(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy import text

    caplog.set_level(logging.INFO, logger="mailer.scheduler")
    settings = fast(project.settings(), poll_s=1.0)
    store = open_store(settings.database_url)
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    project.campaign("due.yaml", at_text(when))
    running = Running(settings, project)
    other = store.engine.connect()  # the other `mailer run`
    try:
        await until(lambda: "due" in jobs(settings) and events(caplog, "leader"), 10)
        pid = lock_holder(store)
        assert pid is not None
        terminate(store, pid)
        deadline = time.monotonic() + 5
        while not other.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                                {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]}).scalar():
            assert time.monotonic() < deadline, "the terminated session kept the lock"
            await asyncio.sleep(0.01)
        other.commit()
        await until(lambda: events(caplog, "leadership-lost"), 5)
        await until(lambda: events(caplog, "standby"), 5)
        assert events(caplog, "leadership-lost")[0].levelno == logging.WARNING
        await asyncio.sleep(max(0.0, when.timestamp() + 1.5 - time.time()))
        assert runs_of(settings, "due") == []  # due, but this runner no longer leads
        other.execute(text("SELECT pg_advisory_unlock(:a, :b)"),
                      {"a": LOCK_KEYS[0], "b": LOCK_KEYS[1]})
        other.commit()
        await until(lambda: len(events(caplog, "leader")) == 2, 5)
        await until(lambda: [r for r in runs_of(settings, "due")
                             if r.status == RunStatus.FINISHED], 10)
        [run] = runs_of(settings, "due")
        assert (run.late_s or 0) > 1  # the same runner, back in the lead, sends it late
    finally:
        other.close()
        assert await running.close() == 0


def test_an_unreachable_database_is_a_standby_not_a_crash(
        caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy import create_engine

    leader = PostgresLeader(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none",
                                          connect_args={"connect_timeout": 2}))
    assert leader.try_acquire() is False and leader.held() is False
    [logged] = events(caplog, "leader-acquire-failed")
    assert logged.levelno == logging.WARNING and "OperationalError" in logged.getMessage()
