"""The scheduler's decisions, pinned one function at a time without a running scheduler.

What this module pins, in mailer/scheduler.py and the modules beside it (jobs.py, leader.py,
schedule_view.py; `log_event` in logs.py):

* the log line (`log_event`): its quoting rules, None fields left out, floats to 3 decimals;
* what a schedule means (`trigger_for`, `fingerprint`, `next_fire`, `is_fire_time`,
  `occurrence_of`, `schedule_text`): fire times in the configured zone (Europe/Berlin) on both
  daylight saving nights of 2026, asked with aware times from other zones;
* what a fire does (`decide`): the exact boundary of `misfire_grace_s`, the latest of unsorted
  run times standing for all, `once` against `once-missed`, and its notes as staff read them;
* who leads (`FileLeader` on real flock files, `PostgresLeader` on the real PostgreSQL, two
  contenders each; `leader_for`);
* what the ledger says (`one_off_done`, `note_run`, `failed_fires`, `failure_reason`,
  `Runner._record_failure`, `CampaignJobs.lost_fires`);
* how a job names its function in the job store (`mailer.scheduler:fire`, as existing
  databases hold it);
* what `mailer schedule` shows (`schedule_overview`, `_overview_row`, `no_next_fire`,
  `kept_jobs`, `file_problem`, `local_isoformat`, `utc_isoformat`).

Every test runs in-process in well under a second (a fake clock is passed as `now`), so this
module can be the test selection of a mutation run over these functions; tests/test_scheduler.py
runs whole schedulers for what only they can show. PostgresLeader needs
MAILER_TEST_POSTGRES_URL (tests/conftest.py); without it those tests are skipped.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.util import ref_to_obj
from sqlalchemy import Connection, Engine, QueuePool, create_engine, make_url, text, update
from sqlalchemy.exc import OperationalError

from mailer.campaign import Campaign, load_campaign
from mailer.checks import check_campaign
from mailer.errors import CampaignError, LedgerError, UserError
from mailer.jobs import (
    JOB_TABLE,
    Decision,
    decide,
    file_problem,
    fingerprint,
    is_fire_time,
    kept_jobs,
    local_isoformat,
    next_fire,
    occurrence_of,
    one_off_done,
    schedule_text,
    trigger_for,
    utc_isoformat,
)
from mailer.leader import FileLeader, PostgresLeader, leader_for
from mailer.logs import log_event
from mailer.schedule_view import _overview_row, no_next_fire, schedule_overview
from mailer.scheduler import TRIGGER, Firing, Runner, failed_fires, failure_reason, fire, note_run
from mailer.store import FAILED_ONCE, MISSED_ONCE, ONCE, RunStatus, Store, open_store
from mailer.store import queries as q
from mailer.store.tables import runs
from mailer.triggers import CampaignCronTrigger
from tests.conftest import Project, both_databases
from tests.test_scheduler import (
    BERLIN,
    campaign_text,
    events,
    lock_holder,
    postgres_only,
    runner_for,
    terminate,
)

NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
UNSCHEDULED = campaign_text("").replace("schedule: {}\n", "")
DAILY_0230 = 'cron: "30 2 * * *"'  # the hour both DST nights of Berlin touch


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


@pytest.fixture(autouse=True)
def machine_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's own zone is neither UTC nor the configured one (as on many servers), so a
    conversion that forgot its zone (`astimezone()`) shows instead of passing by luck."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def load(project: Project, name: str, schedule: str | None) -> Campaign:
    text_ = campaign_text(schedule) if schedule else UNSCHEDULED
    return load_campaign(project.campaign(f"{name}.yaml", text_), project.settings())


def add_run(conn: Connection, campaign_id: str, occurrence: str, status: RunStatus, *,
            trigger: str = TRIGGER, scheduled_at: datetime | None = None,
            note: str | None = None, **settled: Any) -> int:
    """A run as the ledger holds it; `settled` fixes what insert_run takes from the clock."""
    run, created = q.insert_run(conn, campaign_id=campaign_id, occurrence=occurrence,
                                trigger=trigger, status=status, scheduled_at=scheduled_at,
                                note=note)
    assert created
    if settled:
        conn.execute(update(runs).where(runs.c.id == run.id).values(**settled))
    return run.id


# --- the log line -----------------------------------------------------------------------------


def test_log_event_quotes_spaces_and_empty_values_and_skips_none(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailer.scheduler")
    log_event("fire", level=logging.WARNING, campaign="daily", run=None, note="two words",
              empty="", late_s=1.23456, whole=2.0, recipients=3, after="last")
    log_event("leader")
    first, second = caplog.records
    assert (first.name, first.levelno, first.getMessage()) == (
        "mailer.scheduler", logging.WARNING,
        'event=fire campaign=daily note="two words" empty="" late_s=1.235 whole=2.000 '
        "recipients=3 after=last")
    assert (second.levelno, second.getMessage()) == (logging.INFO, "event=leader")


# --- what a schedule means --------------------------------------------------------------------


def test_trigger_fingerprint_and_description_follow_the_schedule(project: Project) -> None:
    settings = project.settings()
    cron = load(project, "daily", DAILY_0230)
    at = load(project, "oneoff", 'at: "2026-03-29 03:30"')
    plain = load(project, "plain", None)
    trigger = trigger_for(cron, settings)
    assert isinstance(trigger, CampaignCronTrigger)
    assert (trigger.expr, str(trigger.timezone)) == ("30 2 * * *", "Europe/Berlin")
    date = trigger_for(at, settings)
    assert isinstance(date, DateTrigger)
    assert date.run_date.isoformat() == "2026-03-29T03:30:00+02:00"
    assert str(date.run_date.tzinfo) == "Europe/Berlin"
    with pytest.raises(ValueError) as raised:
        trigger_for(plain, settings)
    assert str(raised.value) == "campaign 'plain' has no schedule"
    path = project.root / "campaigns" / "renamed.yaml"
    assert fingerprint(cron, settings, path) == "renamed.yaml|cron 30 2 * * *|Europe/Berlin"
    assert fingerprint(at, settings, path) == "renamed.yaml|at 2026-03-29 03:30|Europe/Berlin"
    assert [schedule_text(c) for c in (cron, at, plain)] == [
        "cron 30 2 * * *", "at 2026-03-29 03:30", "none"]


def test_occurrence_is_the_utc_fire_time_or_once(project: Project) -> None:
    cron = load(project, "daily", DAILY_0230)
    first_pass = datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN)
    second_pass = first_pass.replace(fold=1)
    assert occurrence_of(cron, first_pass) == "2026-10-25T00:30:00+00:00"
    assert occurrence_of(cron, second_pass) == "2026-10-25T01:30:00+00:00"
    for name, schedule in [("oneoff", 'at: "2026-12-03 09:00"'), ("plain", None)]:
        assert occurrence_of(load(project, name, schedule), first_pass) == ONCE


def test_next_fire_across_both_dst_nights_and_at_the_very_time(project: Project) -> None:
    settings = project.settings()
    cron = load(project, "daily", DAILY_0230)
    # 02:30 does not exist on 29 March: it fires at 03:30 CEST (asked at 21:00 in Tokyo)
    spring = next_fire(cron, settings, datetime(2026, 3, 28, 21, 0, tzinfo=TOKYO))
    assert spring is not None and spring.isoformat() == "2026-03-29T03:30:00+02:00"
    fall = next_fire(cron, settings, utc(2026, 10, 24, 12))
    assert fall is not None and fall.isoformat() == "2026-10-25T02:30:00+02:00"
    after_first_pass = next_fire(cron, settings, utc(2026, 10, 25, 0, 30, 1))
    assert after_first_pass is not None
    assert after_first_pass.isoformat() == "2026-10-26T02:30:00+01:00"  # not 02:30 CET again
    at = load(project, "oneoff", 'at: "2026-12-03 09:00"')
    due = utc(2026, 12, 3, 8)
    for now in (due - timedelta(days=1), due.astimezone(NEW_YORK)):  # its own time still counts
        when = next_fire(at, settings, now)
        assert when is not None and when.isoformat() == "2026-12-03T09:00:00+01:00"
    assert next_fire(at, settings, due + timedelta(microseconds=1)) is None


def test_is_fire_time_knows_the_wall_clock_of_both_dst_nights(project: Project) -> None:
    settings = project.settings()
    cron = load(project, "daily", DAILY_0230)
    fires = {
        datetime(2026, 3, 28, 21, 30, tzinfo=NEW_YORK): True,  # 03:30 CEST, for the gap
        utc(2026, 3, 29, 0, 30): False,  # 01:30 CET
        utc(2026, 10, 25, 0, 30): True,  # 02:30 CEST, the first pass
        utc(2026, 10, 25, 1, 30): False,  # 02:30 CET, the second pass
        utc(2026, 10, 25, 0, 30, 1): False,
        utc(2026, 10, 25, 0, 29, 59): False,
    }
    assert {when: is_fire_time(cron, settings, when) for when in fires} == fires
    at = load(project, "oneoff", 'at: "2026-12-03 09:00"')
    due = datetime(2026, 12, 3, 17, 0, tzinfo=TOKYO)
    assert is_fire_time(at, settings, due) is True
    assert is_fire_time(at, settings, due + timedelta(seconds=1)) is False
    assert is_fire_time(load(project, "plain", None), settings, due) is False


def test_is_fire_time_right_after_a_clock_shift(project: Project) -> None:
    """A microsecond before `when`, counted in UTC: on the wall clock it lands an hour off in
    both nights, and fires that were due were skipped as 'the schedule changed since'."""
    settings = project.settings()
    crons = {"three": 'cron: "0 3 * * *"', "gap": 'cron: "*/5 2 * * *"',
             "hourly": 'cron: "0 * * * *"'}
    campaigns = {name: load(project, name, schedule) for name, schedule in crons.items()}
    fires = [
        ("three", utc(2026, 3, 29, 1)),  # 03:00 CEST, the first minute after the gap
        ("gap", utc(2026, 3, 29, 1)),  # 02:00, which does not exist, at 03:00 CEST
        ("hourly", utc(2026, 3, 29, 1)),
        ("hourly", utc(2026, 10, 25, 1)),  # 02:00 CET, the second pass
        ("hourly", utc(2026, 10, 25, 2)),  # 03:00 CET
        ("three", utc(2026, 10, 25, 2)),
    ]
    assert [(name, is_fire_time(campaigns[name], settings, when)) for name, when in fires] \
        == [(name, True) for name, _ in fires]


# --- deciding a fire --------------------------------------------------------------------------


def test_decide_sends_within_grace_up_to_the_second(project: Project) -> None:
    cron = load(project, "daily", DAILY_0230)
    due = utc(2026, 10, 25, 0, 30)  # 02:30 CEST, the first pass
    occurrence = "2026-10-25T00:30:00+00:00"
    early = decide(cron, [due.astimezone(NEW_YORK)], now=due - timedelta(seconds=5),
                   grace_s=0, zone=BERLIN)
    assert early == Decision(occurrence, due, 0.0, True, None)
    assert early.scheduled_at.isoformat() == occurrence  # in UTC, whatever zone it came in
    assert decide(cron, [due], now=due, grace_s=0, zone=BERLIN) == Decision(
        occurrence, due, 0.0, True, None)
    edge = decide(cron, [due], now=due + timedelta(seconds=3600), grace_s=3600, zone=BERLIN)
    assert edge == Decision(occurrence, due, 3600.0, True, None)
    missed = decide(cron, [due], now=due + timedelta(seconds=3601), grace_s=3600, zone=BERLIN)
    assert missed == Decision(
        occurrence, due, 3601.0, False,
        "missed: the scheduler was not running at 2026-10-25 02:30 CEST (1:00:01 late, beyond "
        "misfire_grace_s=3600); not sent - send it with: mailer send daily")


def test_decide_lets_the_latest_of_unsorted_run_times_stand_for_all(project: Project) -> None:
    hourly = load(project, "hourly", 'cron: "0 * * * *"')
    # The spring night: 01:00 CET, 03:00 CEST, 04:00 CEST, handed over unsorted, in three zones.
    first, middle, last = utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2)
    run_times = [middle, last.astimezone(NEW_YORK), first.astimezone(TOKYO)]
    sent = decide(hourly, run_times, now=last + timedelta(minutes=10), grace_s=3600,
                  zone=BERLIN)
    assert sent == Decision("2026-03-29T02:00:00+00:00", last, 600.0, True,
                            "2 earlier occurrences since 2026-03-29 01:00 CET were coalesced "
                            "into this one")
    assert sent.scheduled_at.isoformat() == "2026-03-29T02:00:00+00:00"
    two = decide(hourly, [last, middle], now=last, grace_s=3600, zone=BERLIN)
    assert two.note == "1 earlier occurrences since 2026-03-29 03:00 CEST were coalesced into " \
                       "this one"


def test_decide_missed_and_coalesced_says_both_in_local_time(project: Project) -> None:
    hourly = load(project, "hourly", 'cron: "0 * * * *"')
    # The fall night: 02:00 CEST, 02:00 CET, 03:00 CET.
    run_times = [utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 0)]
    now = utc(2026, 10, 25, 4, 0, 0, 600_000)
    missed = decide(hourly, run_times, now=now, grace_s=3600, zone=BERLIN)
    assert missed == Decision(
        "2026-10-25T02:00:00+00:00", utc(2026, 10, 25, 2), 7200.6, False,
        "missed: the scheduler was not running at 2026-10-25 03:00 CET (2:00:01 late, beyond "
        "misfire_grace_s=3600); not sent - send it with: mailer send hourly; 2 earlier "
        "occurrences since 2026-10-25 02:00 CEST were coalesced into this one")


def test_decide_a_one_off_is_once_in_time_and_once_missed_late(project: Project) -> None:
    at = load(project, "oneoff", 'at: "2026-03-29 03:30"')
    due = utc(2026, 3, 29, 1, 30)
    assert decide(at, [due], now=due + timedelta(seconds=90.5), grace_s=90.5,
                  zone=BERLIN) == Decision(ONCE, due, 90.5, True, None)
    assert decide(at, [due], now=due + timedelta(seconds=91), grace_s=90.5,
                  zone=BERLIN) == Decision(
        MISSED_ONCE, due, 91.0, False,
        "missed: the scheduler was not running at 2026-03-29 03:30 CEST (0:01:31 late, beyond "
        "misfire_grace_s=90.5); not sent - send it with: mailer send oneoff")


# --- leadership -------------------------------------------------------------------------------


def test_file_leader_one_holder_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "var" / "scheduler.lock"  # var/ does not exist yet
    one, two = FileLeader(path), FileLeader(path)
    one.release()  # holding nothing, it lets go of nothing
    assert one.held() is False
    assert one.try_acquire() is True and one.held() is True
    assert one.try_acquire() is True  # asking again while leading keeps the lead
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert two.try_acquire() is False and two.held() is False
    one.release()
    assert one.held() is False
    assert two.try_acquire() is True and two.held() is True
    assert one.try_acquire() is False
    two.release()
    assert one.try_acquire() is True
    one.release()


def test_file_leader_overwrites_a_stale_pid(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.lock"
    path.write_text("4194303\nleft by a killed leader\n")
    leader = FileLeader(path)
    assert leader.try_acquire() is True
    assert path.read_text() == f"{os.getpid()}\n"
    leader.release()


@both_databases
def test_leader_for_takes_the_lock_of_its_database(project: Project) -> None:
    settings = project.settings()
    store = open_store(settings.database_url)
    leader = leader_for(store, settings)
    if store.is_postgres:
        assert isinstance(leader, PostgresLeader) and leader.engine is store.engine
    else:
        assert isinstance(leader, FileLeader)
        assert leader.path == settings.var_dir / "scheduler.lock"


def in_use(engine: Engine) -> int:
    """Connections of the engine's pool that are checked out (a session kept open)."""
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


def wait_unlocked(store: Store) -> None:
    """pg_terminate_backend signals; the session (and its lock) is gone a moment later."""
    deadline = time.monotonic() + 5
    while lock_holder(store) is not None:
        assert time.monotonic() < deadline, "the terminated session kept the lock"
        time.sleep(0.01)


@postgres_only
def test_postgres_leader_one_session_leads_until_it_releases(db_url: str) -> None:
    watch = open_store(db_url)
    # Two `mailer run` processes: each its own engine, so never a pooled session of the other.
    one, two = PostgresLeader(create_engine(db_url)), PostgresLeader(create_engine(db_url))
    try:
        one.release()
        assert one.held() is False and lock_holder(watch) is None
        assert one.try_acquire() is True
        pid = lock_holder(watch)  # the scheduler's keys exactly: ("IMAG", 1)
        assert pid is not None
        assert one.held() is True and one.held() is True
        assert one.try_acquire() is True and lock_holder(watch) == pid
        assert two.try_acquire() is False and two.held() is False
        assert in_use(two.engine) == 0  # the refused session is not kept open
        one.release()
        assert one.held() is False and lock_holder(watch) is None
        assert in_use(one.engine) == 0
        assert two.try_acquire() is True and one.try_acquire() is False
        two.release()
        assert one.try_acquire() is True  # the first leads again after a pause
        one.release()
    finally:
        for leader in (one, two):
            leader.engine.dispose()


@postgres_only
def test_postgres_leader_whose_session_died_leads_no_more(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailer.scheduler")
    watch = open_store(db_url)
    leader, other = PostgresLeader(create_engine(db_url)), PostgresLeader(create_engine(db_url))
    try:
        assert leader.try_acquire() is True
        terminate(watch, lock_holder(watch) or 0)  # a restart, a network cut
        wait_unlocked(watch)
        assert leader.try_acquire() is False  # it notices it lost the lead ...
        [logged] = events(caplog, "leader-check-failed")
        assert (logged.levelno, logged.getMessage()) == (
            logging.WARNING, "event=leader-check-failed error=OperationalError")
        assert in_use(leader.engine) == 0
        assert leader.try_acquire() is True  # ... and leads again on a new session
        terminate(watch, lock_holder(watch) or 0)
        wait_unlocked(watch)
        leader.release()  # the dead session cannot unlock: no error for that
        assert leader.held() is False
        assert other.try_acquire() is True
        other.release()
    finally:
        for one in (leader, other):
            one.engine.dispose()


def test_postgres_leader_without_a_database_stands_by(caplog: pytest.LogCaptureFixture) -> None:
    leader = PostgresLeader(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none",
                                          connect_args={"connect_timeout": 2}))
    assert leader.try_acquire() is False and leader.held() is False
    [logged] = events(caplog, "leader-acquire-failed")
    assert (logged.levelno, logged.getMessage()) == (
        logging.WARNING, "event=leader-acquire-failed error=OperationalError")


@postgres_only
def test_postgres_leader_refused_the_lock_stands_by(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The connection works but the lock statement fails: a role the database does not let
    take advisory locks (REVOKE, in this test's own database)."""
    role = f"mailer_test_{secrets.token_hex(4)}"
    admin = create_engine(db_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql("REVOKE EXECUTE ON FUNCTION pg_try_advisory_lock(integer, integer) "
                             "FROM PUBLIC")
    limited = create_engine(make_url(db_url).set(username=role))
    try:
        leader = PostgresLeader(limited)
        assert leader.try_acquire() is False and leader.held() is False
        assert in_use(limited) == 0
        [logged] = events(caplog, "leader-acquire-failed")
        assert (logged.levelno, logged.getMessage()) == (
            logging.WARNING, "event=leader-acquire-failed error=ProgrammingError")
    finally:
        limited.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


# --- what the ledger says ---------------------------------------------------------------------


def test_one_off_done_prefers_the_run_that_sent_it(project: Project) -> None:
    store = open_store(project.settings().database_url)
    with store.engine.begin() as conn:
        assert one_off_done(conn, "oneoff") is None
        add_run(conn, "oneoff", "manual-20261201T070000.000000", RunStatus.FINISHED)
        add_run(conn, "other", ONCE, RunStatus.FINISHED)
        assert one_off_done(conn, "oneoff") is None
        # Each settles it ahead of the one before: once, then once-missed, then once-failed.
        for occurrence, status in [(FAILED_ONCE, RunStatus.FAILED),
                                   (MISSED_ONCE, RunStatus.MISSED), (ONCE, RunStatus.RUNNING)]:
            run_id = add_run(conn, "oneoff", occurrence, status)
            done = one_off_done(conn, "oneoff")
            assert done is not None and (done.id, done.occurrence) == (run_id, occurrence)


def test_note_run_notes_that_run_only(project: Project) -> None:
    store = open_store(project.settings().database_url)
    with store.engine.begin() as conn:
        first = add_run(conn, "daily", "2026-12-01T07:00:00+00:00", RunStatus.RUNNING)
        add_run(conn, "daily", "2026-12-02T07:00:00+00:00", RunStatus.RUNNING, note="kept")
        note_run(conn, first, "fire failed at 2026-12-01 08:00 CET: ledger write refused")
        assert [r.note for r in q.runs_of(conn, "daily")] == [
            "fire failed at 2026-12-01 08:00 CET: ledger write refused", "kept"]


def test_failed_fires_lists_failed_and_cut_off_runs_newest_first(project: Project) -> None:
    store = open_store(project.settings().database_url)
    with store.engine.begin() as conn:
        day = "2026-12-0{}T07:00:00+00:00".format
        failed = add_run(conn, "daily", day(1), RunStatus.FAILED, note="failed: list gone")
        cut = add_run(conn, "daily", day(2), RunStatus.RUNNING, note="fire failed at 08:00")
        add_run(conn, "daily", day(3), RunStatus.RUNNING, note="resumed, nothing failed")
        add_run(conn, "daily", day(4), RunStatus.RUNNING)
        add_run(conn, "daily", day(5), RunStatus.FINISHED, note="fire failed at 08:00")
        add_run(conn, "other", day(1), RunStatus.FAILED)
        again = add_run(conn, "daily", day(6), RunStatus.FAILED)
        assert [r.id for r in failed_fires(conn, "daily")] == [again, cut, failed]
        assert failed_fires(conn, "none") == []


def test_failure_reason_is_one_line_without_addresses(project: Project) -> None:
    store = open_store(project.settings().database_url)
    assert failure_reason(CampaignError("unknown list 'crowd'", path="campaigns/a.yaml",
                                        line=3)) == "campaigns/a.yaml, line 3: unknown list 'crowd'"
    assert failure_reason(LedgerError("ledger  write\n refused for a@example.org")) \
        == "ledger write refused for <address>"
    assert failure_reason(RuntimeError("boom\n\tagain")) == "RuntimeError: boom again"
    with pytest.raises(OperationalError) as raised, store.engine.connect() as conn:
        conn.execute(text("SELECT * FROM missing"))
    # The driver's own message, not SQLAlchemy's wrapping with the statement and a link
    assert failure_reason(raised.value) == "OperationalError: no such table: missing"
    long = failure_reason(RuntimeError("x" * 600))
    assert long == "RuntimeError: " + "x" * 486 and len(long) == 500


def decided(project: Project, name: str, schedule: str, due: datetime, now: datetime
            ) -> Firing:
    campaign = load(project, name, schedule)
    decision = decide(campaign, [due], now=now, grace_s=3600, zone=BERLIN)
    return Firing(name, [due], campaign=campaign, decision=decision)


def test_record_failure_takes_the_occurrence_or_notes_the_run_that_holds_it(
        project: Project) -> None:
    due = utc(2026, 10, 25, 0, 30)  # 02:30 CEST; the failure at 02:31 CEST
    project.campaign("daily.yaml", campaign_text(DAILY_0230))
    runner = runner_for(project, due + timedelta(seconds=61))
    cut = ("fire failed at 2026-10-25 02:31 CEST: list gone; the rows not yet sent are resumed "
           "by the next start of mailer run or by: mailer send {}").format
    firing = decided(project, "daily", DAILY_0230, due, due + timedelta(seconds=61))
    run = runner._record_failure(firing, "list gone")
    assert run is not None
    with runner.store.engine.connect() as conn:
        assert q.runs_of(conn, "daily") == [run]
    assert (run.campaign_id, run.occurrence, run.status, run.trigger, run.scheduled_at,
            run.late_s, run.note) == (
        "daily", "2026-10-25T00:30:00+00:00", RunStatus.FAILED, "scheduler", due, 61.0,
        "failed: list gone; not sent - send it with: mailer send daily")
    assert runner._record_failure(firing, "again") is None  # that occurrence has its record
    # Another fire started the run of this occurrence meanwhile: its note says what failed.
    later = due + timedelta(days=1)
    with runner.store.engine.begin() as conn:
        started = add_run(conn, "daily", later.isoformat(), RunStatus.RUNNING)
    noted = runner._record_failure(
        decided(project, "daily", DAILY_0230, later, later), "list gone")
    assert noted is not None
    assert (noted.id, noted.status, noted.note) == (started, RunStatus.RUNNING, cut("daily"))
    # A resume's run is noted, never a second run beside it (a one-off keeps "once").
    with runner.store.engine.begin() as conn:
        resumed = q.get_run(conn, add_run(conn, "oneoff", ONCE, RunStatus.RUNNING))
    kept = runner._record_failure(Firing("oneoff", [], run=resumed), "list gone")
    assert kept is not None and (kept.id, kept.occurrence, kept.note) == (
        resumed.id, ONCE, cut("oneoff"))


def test_record_failure_of_a_one_off_leaves_once_to_mailer_send(project: Project) -> None:
    due = utc(2026, 3, 29, 1, 30)
    runner = runner_for(project, due + timedelta(hours=2))
    recorded = []
    for name, now in [("intime", due), ("late", due + timedelta(hours=2))]:
        firing = decided(project, name, 'at: "2026-03-29 03:30"', due, now)
        run = runner._record_failure(firing, "list gone")
        assert run is not None
        recorded.append((firing.decision.occurrence if firing.decision else None,
                         run.occurrence, run.status, run.scheduled_at, run.late_s))
    assert recorded == [(ONCE, FAILED_ONCE, RunStatus.FAILED, due, 0.0),
                        (MISSED_ONCE, FAILED_ONCE, RunStatus.FAILED, due, 7200.0)]


@both_databases
def test_record_failure_before_the_decision_keeps_the_latest_fire_time(
        project: Project) -> None:
    """A fire that failed before it decided (its file unreadable): the fire times APScheduler
    handed over, in the zone of the trigger, are what the failed run stands for."""
    now = utc(2026, 12, 3, 8, 5, 30)
    runner = runner_for(project, now)
    cron = load(project, "daily", 'cron: "0 9 * * *"')
    at = load(project, "oneoff", 'at: "2026-12-03 09:00"')
    fires = [datetime(2026, 12, 3, 9, 0, tzinfo=BERLIN), datetime(2026, 12, 3, 2, 30,
                                                                  tzinfo=NEW_YORK)]
    cases = [Firing("oneoff", fires, campaign=at), Firing("daily", fires, campaign=cron),
             Firing("gone", fires[1:]), Firing("unknown", [])]
    recorded = []
    for firing in cases:
        run = runner._record_failure(firing, "campaigns/ unreadable")
        assert run is not None
        recorded.append((run.campaign_id, run.occurrence, run.scheduled_at, run.late_s))
    assert recorded == [
        ("oneoff", FAILED_ONCE, utc(2026, 12, 3, 8), None),
        ("daily", "2026-12-03T08:00:00+00:00", utc(2026, 12, 3, 8), None),
        ("gone", "2026-12-03T07:30:00+00:00", utc(2026, 12, 3, 7, 30), None),
        ("unknown", "failed-20261203T090530", None, None),  # local time of the failure
    ]


def job_of(runner: Runner, campaign_id: str, next_run_time: datetime | None,
           campaign: Campaign | None = None) -> Job:
    """The job as the job store hands it back after a kill -9: its next run time advanced,
    in the zone of its trigger."""
    found = runner.jobs.good.get(campaign_id)
    campaign = campaign or (found[1].campaign if found else None)
    assert campaign is not None
    return Job(BackgroundScheduler(timezone=runner.settings.tz), id=campaign_id, func=fire,
               args=[campaign_id, runner.config_path], kwargs={},
               trigger=trigger_for(campaign, runner.settings), next_run_time=next_run_time)


def test_lost_fires_are_those_after_the_ledger_and_before_the_job(project: Project) -> None:
    every_10 = campaign_text('cron: "*/10 * * * *"')  # by elapsed time: both passes of 02:xx
    project.campaign("tick.yaml", every_10)
    project.campaign("tock.yaml", every_10)
    project.campaign("oneoff.yaml", campaign_text('at: "2026-10-25 03:00"'))
    now = utc(2026, 10, 25, 1, 10)  # 02:10 CET, the second pass
    runner = runner_for(project, now, misfire_grace_s=1800)
    # Nothing recorded; the job already points past now: every fire of the grace period.
    second_pass = datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN)  # 01:30 UTC
    lost = runner.jobs.lost_fires(job_of(runner, "tick", second_pass), now)
    assert [t.isoformat() for t in lost] == [
        "2026-10-25T02:40:00+02:00", "2026-10-25T02:50:00+02:00", "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:10:00+01:00"]
    # Recorded up to 02:40 CEST, and the job points at 02:00 CET, a fire already due.
    with runner.store.engine.begin() as conn:
        add_run(conn, "tock", "2026-10-25T00:40:00+00:00", RunStatus.FINISHED,
                scheduled_at=utc(2026, 10, 25, 0, 40))
    lost = runner.jobs.lost_fires(job_of(runner, "tock", second_pass.replace(minute=0)), now)
    assert [t.isoformat() for t in lost] == ["2026-10-25T02:50:00+02:00"]
    gone = load(project, "gone", 'cron: "*/10 * * * *"')
    assert [runner.jobs.lost_fires(job_of(runner, "gone", now, gone), now),
            runner.jobs.lost_fires(job_of(runner, "tick", None), now),
            runner.jobs.lost_fires(job_of(runner, "oneoff", utc(2026, 10, 25, 3)),
                              utc(2026, 10, 25, 2, 5))] == [[], [], []]


# --- `mailer schedule` ------------------------------------------------------------------------


def test_local_and_utc_texts(project: Project) -> None:
    settings = project.settings()
    second_pass = utc(2026, 10, 25, 1, 30)
    assert local_isoformat(second_pass, settings) == "2026-10-25T02:30:00+01:00"
    assert utc_isoformat(second_pass.astimezone(NEW_YORK)) == "2026-10-25T01:30:00+00:00"
    assert (local_isoformat(None, settings), utc_isoformat(None)) == (None, None)


def run_value(status: RunStatus, **fields: Any) -> q.Run:
    values: dict[str, Any] = dict(
        id=11, campaign_id="oneoff", occurrence=ONCE, status=status, trigger=TRIGGER,
        scheduled_at=None, created_at=utc(2026, 3, 29, 1, 15), started_at=None,
        finished_at=None, late_s=None, total=5, in_flight_recovered=0, note=None)
    return q.Run(**{**values, **fields})


def test_no_next_fire_says_why_in_local_time(project: Project) -> None:
    settings = project.settings()
    at = load(project, "oneoff", 'at: "2026-03-29 03:30"')
    numbers = {11: 4}
    reasons = [
        no_next_fire(load(project, "plain", None), settings, None, {}),
        no_next_fire(load(project, "daily", 'cron: "0 8 30 2 *"'), settings, None, {}),
        no_next_fire(at, settings, None, {}),
        no_next_fire(at, settings, run_value(RunStatus.FINISHED, trigger="send", total=7,
                                             finished_at=utc(2026, 10, 25, 0, 45)), numbers),
        no_next_fire(at, settings, run_value(RunStatus.FINISHED,
                                             created_at=utc(2026, 10, 25, 1, 50)), numbers),
        no_next_fire(at, settings, run_value(RunStatus.RUNNING), numbers),
        no_next_fire(at, settings, run_value(RunStatus.MISSED), numbers),
        no_next_fire(at, settings, run_value(RunStatus.FAILED), numbers),
    ]
    assert reasons == [
        "no schedule: it goes out only with: mailer send plain",
        "cron 0 8 30 2 * matches no future time",
        "its time 2026-03-29 03:30 has passed (mailer run sends it within misfire_grace_s=3600 "
        "s of it, else records it as missed)",
        "already sent on 2026-10-25 02:45 (run 4, by mailer send, 7 recipients)",
        "already sent on 2026-10-25 02:50 (run 4, 5 recipients)",
        "being sent since 2026-03-29 03:15 (run 4)",
        "missed at 2026-03-29 03:30 (run 4): send it with: mailer send oneoff",
        "its fire at 2026-03-29 03:30 failed (run 4): send it with: mailer send oneoff",
    ]


def test_file_problem_is_one_sentence_and_a_bug_is_logged(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    path = project.root / "campaigns" / "bug.yaml"
    assert file_problem(CampaignError("unknown field 'templat'", path=path, line=2), path) \
        == f"{path}, line 2: unknown field 'templat'"
    assert caplog.records == []  # a user error is no bug
    try:  # where schedule_overview calls it: handling the error, its traceback at hand
        raise RuntimeError("a bug\n  in   a later stage " + "y" * 400)
    except RuntimeError as exc:
        bug, problem = exc, file_problem(exc, path)
    detail = ("a bug in a later stage " + "y" * 400)[:300]
    assert problem == (f"{path}: could not be checked (RuntimeError: {detail}); "
                       "please report this")
    [logged] = caplog.records
    assert (logged.levelno, logged.getMessage()) == (
        logging.ERROR, "event=campaign-check-crashed file=bug.yaml")
    assert logged.exc_info is not None and logged.exc_info[1] is bug


async def store_jobs(runner: Runner) -> None:
    """What `mailer run` leaves in the job store: one job per good scheduled campaign."""
    scheduler = runner.jobs.make_scheduler(runner)
    scheduler.start(paused=True)
    try:
        runner.jobs.reconcile(scheduler)
    finally:
        scheduler.shutdown(wait=False)


async def test_kept_jobs_reads_the_job_store_and_skips_what_is_not_ours(
        project: Project) -> None:
    settings = project.settings()
    store = open_store(settings.database_url)
    assert kept_jobs(store, settings) == {}  # no job store yet: `mailer run` never ran
    project.campaign("later.yaml", campaign_text('at: "2030-01-07 10:00"'))
    project.campaign("summer.yaml", campaign_text('at: "2030-07-01 09:00"'))
    await store_jobs(runner_for(project, utc(2026, 11, 29)))
    # A row this version cannot read (another version wrote it; a scheduler that starts drops
    # it), read before ours: rows come back in the order they were written, so ours go again.
    with store.engine.begin() as conn:
        ours = conn.execute(text(f"SELECT id, next_run_time, job_state FROM {JOB_TABLE}")).all()
        conn.execute(text(f"DELETE FROM {JOB_TABLE}"))
        for row in [("foreign", None, b"not a pickle"), *ours]:
            conn.execute(text(f"INSERT INTO {JOB_TABLE} (id, next_run_time, job_state) "
                              "VALUES (:id, :next, :state)"),
                         dict(zip(("id", "next", "state"), row, strict=True)))
    assert kept_jobs(store, settings) == {
        "later.yaml": {"campaign": "later", "schedule": "at 2030-01-07 10:00",
                       "next_local": "2030-01-07T10:00:00+01:00",
                       "next_utc": "2030-01-07T09:00:00+00:00"},
        "summer.yaml": {"campaign": "summer", "schedule": "at 2030-07-01 09:00",
                        "next_local": "2030-07-01T09:00:00+02:00",
                        "next_utc": "2030-07-01T07:00:00+00:00"},
    }


async def test_jobs_name_the_job_function_as_existing_job_stores_hold_it(
        project: Project) -> None:
    """The job store pickles the function by reference: the text existing databases hold must
    still resolve to the job function, and a new job must be stored with that same text."""
    project.campaign("later.yaml", campaign_text('at: "2030-01-07 10:00"'))
    runner = runner_for(project, utc(2026, 11, 29))
    await store_jobs(runner)
    with runner.store.engine.connect() as conn:
        [state] = conn.execute(text(f"SELECT job_state FROM {JOB_TABLE}")).scalars()
    assert pickle.loads(state)["func"] == "mailer.scheduler:fire"
    assert ref_to_obj("mailer.scheduler:fire") is fire


async def test_schedule_overview_row_by_row(project: Project) -> None:
    settings = project.settings()
    store = open_store(settings.database_url)
    broken = project.campaign("a-broken.yaml", campaign_text('at: "2030-01-07 10:00"'))
    await store_jobs(runner_for(project, utc(2026, 11, 29)))
    broken.write_text(campaign_text('at: "2030-01-07 10:00"').replace("template:", "templat:"))
    with pytest.raises(UserError) as raised:
        check_campaign(broken, settings, with_audience=False)
    error = raised.value.sentence()
    # A bug further down (a layout the renderer does not guard): one sentence, "report this".
    (project.root / "templates" / "crash.mjml.j2").write_text("{{ 1 // 0 }}\n")
    crash = project.campaign("a-crash.yaml", campaign_text('at: "2030-01-07 10:00"').replace(
        "newsletter", "crash"))
    project.campaign("b-plain.yaml", UNSCHEDULED)
    project.campaign("c-daily.yaml", campaign_text('cron: "0 8 * * *"'))
    project.campaign("d-early.yaml", campaign_text('at: "2026-12-03 09:00"'))
    project.campaign("e-soon.yaml", campaign_text('at: "2026-12-24 18:00"'))
    project.campaign("f-past.yaml", campaign_text('at: "2026-11-01 09:00"'))
    # The list's rows are `mailer validate`'s business, not the schedule's.
    project.list_file("crowd.csv", "email,name,language\nnot-an-address,B,de\n")
    project.campaign("g-crowd.yaml", campaign_text('at: "2030-02-01 09:00"').replace(
        "[partners]", "[crowd]"))
    project.campaign("h-monthly.yaml", campaign_text('cron: "0 9 1 * *"'))  # once a one-off
    day = "2026-11-{}T07:00:00+00:00".format
    with store.engine.begin() as conn:
        add_run(conn, "zz-other", ONCE, RunStatus.FINISHED)  # ids are not run numbers
        add_run(conn, "c-daily", day(20), RunStatus.MISSED, scheduled_at=utc(2026, 11, 20, 7),
                note="missed: not running")
        failed = add_run(conn, "c-daily", day(21), RunStatus.FAILED, note="failed: list gone",
                         scheduled_at=utc(2026, 11, 21, 7))
        cut = add_run(conn, "c-daily", day(22), RunStatus.RUNNING, note="fire failed at 08:00",
                      scheduled_at=utc(2026, 11, 22, 7))
        last = add_run(conn, "c-daily", day(27), RunStatus.FINISHED,
                       scheduled_at=utc(2026, 11, 27, 7), late_s=1.5, total=7,
                       finished_at=utc(2026, 11, 27, 7, 5))
        early = add_run(conn, "d-early", ONCE, RunStatus.FINISHED, trigger="send", total=7,
                        created_at=utc(2026, 11, 25, 10), finished_at=utc(2026, 11, 25, 10, 2))
        monthly = add_run(conn, "h-monthly", ONCE, RunStatus.FINISHED, trigger="send", total=7,
                          finished_at=utc(2026, 11, 2, 8))
    nothing: dict[str, Any] = {"last_run": None, "missed": [], "failed": []}
    at = {"next_local": None, "next_utc": None}
    broken_row = {"file": "a-broken.yaml", "campaign": None, "error": error,
                  "kept": {"campaign": "a-broken", "schedule": "at 2030-01-07 10:00",
                           "next_local": "2030-01-07T10:00:00+01:00",
                           "next_utc": "2030-01-07T09:00:00+00:00"},
                  "why": f"the file is invalid: {error}"}
    crashed = (f"{crash}: could not be checked (ZeroDivisionError: integer division or modulo "
               "by zero); please report this")
    crash_row = {"file": "a-crash.yaml", "campaign": None, "error": crashed, "kept": None,
                 "why": f"the file is invalid: {crashed}"}
    plain_row = {"file": "b-plain.yaml", "campaign": "b-plain", "schedule": None, **at,
                 "why": "no schedule: it goes out only with: mailer send b-plain", **nothing}
    daily_row = {
        "file": "c-daily.yaml", "campaign": "c-daily", "schedule": "cron 0 8 * * *",
        "next_local": "2026-11-27T08:00:00+01:00", "next_utc": "2026-11-27T07:00:00+00:00",
        "why": None,
        "last_run": {"id": last, "number": 4, "occurrence": day(27), "status": "finished",
                     "trigger": "scheduler", "scheduled_utc": day(27), "late_s": 1.5,
                     "total": 7, "finished_utc": "2026-11-27T07:05:00+00:00", "note": None},
        "missed": [{"occurrence": day(20), "scheduled_utc": day(20),
                    "note": "missed: not running"}],
        "failed": [{"run": cut, "number": 3, "occurrence": day(22), "status": "running",
                    "scheduled_utc": day(22), "note": "fire failed at 08:00"},
                   {"run": failed, "number": 2, "occurrence": day(21), "status": "failed",
                    "scheduled_utc": day(21), "note": "failed: list gone"}]}
    early_row: dict[str, Any] = {  # sent by hand before its time: no fire is left
        "file": "d-early.yaml", "campaign": "d-early", "schedule": "at 2026-12-03 09:00", **at,
        "why": "already sent on 2026-11-25 11:02 (run 1, by mailer send, 7 recipients)",
        "last_run": {"id": early, "number": 1, "occurrence": ONCE, "status": "finished",
                     "trigger": "send", "scheduled_utc": None, "late_s": None, "total": 7,
                     "finished_utc": "2026-11-25T10:02:00+00:00", "note": None},
        "missed": [], "failed": []}
    soon_row = {"file": "e-soon.yaml", "campaign": "e-soon", "schedule": "at 2026-12-24 18:00",
                "next_local": "2026-12-24T18:00:00+01:00",
                "next_utc": "2026-12-24T17:00:00+00:00", "why": None, **nothing}
    past_row = {"file": "f-past.yaml", "campaign": "f-past", "schedule": "at 2026-11-01 09:00",
                **at, "why": "its time 2026-11-01 09:00 has passed (mailer run sends it within "
                "misfire_grace_s=3600 s of it, else records it as missed)", **nothing}
    crowd_row = {"file": "g-crowd.yaml", "campaign": "g-crowd", "schedule": "at 2030-02-01 09:00",
                 "next_local": "2030-02-01T09:00:00+01:00",
                 "next_utc": "2030-02-01T08:00:00+00:00", "why": None, **nothing}
    monthly_row: dict[str, Any] = {  # its one-off run does not settle the cron it became
        "file": "h-monthly.yaml", "campaign": "h-monthly", "schedule": "cron 0 9 1 * *",
        "next_local": "2026-12-01T09:00:00+01:00", "next_utc": "2026-12-01T08:00:00+00:00",
        "why": None,
        "last_run": {"id": monthly, "number": 1, "occurrence": ONCE, "status": "finished",
                     "trigger": "send", "scheduled_utc": None, "late_s": None, "total": 7,
                     "finished_utc": "2026-11-02T08:00:00+00:00", "note": None},
        "missed": [], "failed": []}
    now = utc(2026, 11, 26, 12)  # not today: the clock passed in is the one used
    rows = [broken_row, crash_row, daily_row, early_row, soon_row, past_row, crowd_row,
            monthly_row]
    assert schedule_overview(settings, store, now=now) == rows
    assert schedule_overview(settings, store, now=now, unscheduled=True) == [
        *rows[:2], plain_row, *rows[2:]]
    # Without a clock: now, which is after f-past's time and before g-crowd's.
    today = {row["file"]: row for row in schedule_overview(settings, store)}
    assert (today["f-past.yaml"], today["g-crowd.yaml"]) == (past_row, crowd_row)
    campaign = load_campaign(project.root / "campaigns" / "e-soon.yaml", settings)
    assert _overview_row(campaign, project.root / "campaigns" / "e-soon.yaml", settings, store,
                         utc(2026, 12, 24, 17, 0, 1))["why"] == (
        "its time 2026-12-24 18:00 has passed (mailer run sends it within misfire_grace_s=3600 "
        "s of it, else records it as missed)")
