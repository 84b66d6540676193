"""Cron triggers across daylight saving time: every minute pattern, both transitions.

Each test computes the whole sequence of fire times the trigger gives (the way the scheduler
asks for them: the next fire after the last one) over the transition night and compares it
with what the README promises, worked out here from the crontab text by a small independent
matcher, not by the trigger:

* a cron with fixed hours fires each matching wall-clock time once: in the repeated fall-back
  hour at its first pass, in the spring-forward gap one hour later on the clock;
* a cron whose hour field is `*` runs by elapsed time (both passes of the repeated hour fire).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from mailer.triggers import cron_trigger

BERLIN = ZoneInfo("Europe/Berlin")
SPRING = datetime(2026, 3, 29)  # 02:00 CET -> 03:00 CEST: 02:00-02:59 do not exist
FALL = datetime(2026, 10, 25)  # 03:00 CEST -> 02:00 CET: 02:00-02:59 happen twice
DAYS = {"spring": SPRING, "fall": FALL}

MINUTES = ["*/5", "*", "0", "30", "15,45", "0-10", "50-59/3", "5,20-25,58", "59"]
FIXED_HOURS = ["2", "1-3", "2,3", "1,2", "2-4", "*/2", "0-5/2"]

# Other zones `timezone` may name: a half-hour shift, and shifts at midnight.
OTHER_ZONES = {  # (zone, the night's date at 00:00, hours around its shift)
    "lord-howe-fall": ("Australia/Lord_Howe", datetime(2026, 4, 5), ["1", "1,2", "0-2"]),
    "lord-howe-spring": ("Australia/Lord_Howe", datetime(2026, 10, 4), ["2", "1-3", "2,3"]),
    "santiago-fall": ("America/Santiago", datetime(2026, 4, 4, 21), ["23", "22-23", "0,23"]),
    "santiago-spring": ("America/Santiago", datetime(2026, 9, 6), ["0", "0,1", "0-2"]),
}


# --- the oracle: crontab read by hand ----------------------------------------------------------


def field_values(text: str, low: int, high: int) -> set[int]:
    """The numbers a crontab field names (numbers, *, ranges, steps, lists)."""
    out: set[int] = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            a, b = low, high
        elif "-" in span:
            a, b = (int(x) for x in span.split("-"))
        else:
            a = int(span)
            b = high if step else a
        out.update(range(a, b + 1, int(step) if step else 1))
    return out


def matches(expr: str, wall: datetime) -> bool:
    minute, hour, day, month, weekday = expr.split()
    dow = (wall.isoweekday() % 7)  # crontab: 0 = Sunday
    return (wall.minute in field_values(minute, 0, 59)
            and wall.hour in field_values(hour, 0, 23)
            and wall.day in field_values(day, 1, 31)
            and wall.month in field_values(month, 1, 12)
            and (dow in field_values(weekday, 0, 7) or (dow == 0 and 7 in
                                                         field_values(weekday, 0, 7))))


def passes(wall: datetime, zone: ZoneInfo = BERLIN) -> list[datetime]:
    """The instants (UTC) at which the clock shows `wall`: none, one or two."""
    out = set()
    for fold in (0, 1):
        instant = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == wall:
            out.add(instant)
    return sorted(out)


def walls(start: datetime, end: datetime) -> Iterator[datetime]:
    """Every minute of the (naive) wall clock from start to end."""
    wall = start
    while wall < end:
        yield wall
        wall += timedelta(minutes=1)


def window(day: datetime, zone: ZoneInfo = BERLIN) -> tuple[datetime, datetime]:
    """From the evening before to the morning after the transition night, in UTC."""
    start = (day - timedelta(hours=3)).replace(tzinfo=zone).astimezone(UTC)
    return start, (day + timedelta(hours=9)).replace(tzinfo=zone).astimezone(UTC)


def jump(day: datetime, zone: ZoneInfo) -> timedelta:
    """How far the clock moves forward in that night (zero in a fall-back night)."""
    start, end = window(day, zone)
    before, after = start.astimezone(zone).utcoffset(), end.astimezone(zone).utcoffset()
    assert before is not None and after is not None
    return max(after - before, timedelta(0))


def promised(expr: str, day: datetime, zone: ZoneInfo = BERLIN) -> list[datetime]:
    """The fire times the README promises in the window around `day`'s transition night."""
    start, end = window(day, zone)
    fixed = expr.split()[1] not in ("*", "*/1")  # every hour is no fixed hour
    out: set[datetime] = set()
    if fixed:  # one fire per matching wall-clock time
        for wall in walls(day - timedelta(hours=4), day + timedelta(hours=10)):
            if not matches(expr, wall):
                continue
            seen = passes(wall, zone)
            if seen:
                out.add(seen[0])  # the first pass of a repeated time
            else:  # in the gap: as much later on the clock as the clock jumps
                [later] = passes(wall + jump(day, zone), zone)
                out.add(later)
    else:  # elapsed time: every instant whose clock reading matches
        instant = start
        while instant < end:
            if matches(expr, instant.astimezone(zone).replace(tzinfo=None)):
                out.add(instant)
            instant += timedelta(minutes=1)
    return sorted(t for t in out if start <= t < end)


def sequence(trigger: CronTrigger, day: datetime, zone: ZoneInfo = BERLIN) -> list[datetime]:
    """The trigger's fire times in the window, asked for as the scheduler asks (UTC)."""
    start, end = window(day, zone)
    out: list[datetime] = []
    prev, now = None, start - timedelta(microseconds=1)
    for _ in range(5000):
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None or nxt.astimezone(UTC) >= end:
            return out
        out.append(nxt.astimezone(UTC))
        prev = now = nxt
    raise AssertionError(f"{trigger} does not advance: {out[-3:]}")


def clock(instants: list[datetime], zone: ZoneInfo = BERLIN) -> list[str]:
    return [f"{t.astimezone(zone):%d %H:%M %Z}" for t in instants]


def check_wall_clock_order(expr: str, fires: list[datetime], zone: ZoneInfo = BERLIN) -> None:
    """No fire repeats a wall-clock time already fired; none goes back in wall time."""
    shown = [t.astimezone(zone).replace(tzinfo=None) for t in fires]
    for before, after, instant in zip(shown, shown[1:], fires[1:], strict=False):
        assert after > before, (f"'{expr}' fires at {instant.astimezone(zone):%H:%M %Z} "
                                f"after {before:%H:%M}: the clock repeats or goes back")


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transition", DAYS)
@pytest.mark.parametrize("hour", FIXED_HOURS)
@pytest.mark.parametrize("minute", MINUTES)
def test_fixed_hour_crons_fire_each_wall_time_once(minute: str, hour: str,
                                                   transition: str) -> None:
    expr = f"{minute} {hour} * * *"
    day = DAYS[transition]
    fires = sequence(cron_trigger(expr, BERLIN), day)
    assert clock(fires) == clock(promised(expr, day))
    assert len(set(fires)) == len(fires)
    check_wall_clock_order(expr, fires)


@pytest.mark.parametrize("case", OTHER_ZONES)
@pytest.mark.parametrize("minute", MINUTES)
def test_other_zones_fire_each_wall_time_once(minute: str, case: str) -> None:
    name, day, hours = OTHER_ZONES[case]
    zone = ZoneInfo(name)
    for hour in hours:
        expr = f"{minute} {hour} * * *"
        fires = sequence(cron_trigger(expr, zone), day, zone)
        assert clock(fires, zone) == clock(promised(expr, day, zone), zone), expr
        check_wall_clock_order(expr, fires, zone)


@pytest.mark.parametrize("expr", [
    "*/5 2 * * 0", "15,45 2 * * 0", "* 2 29 3 *", "*/5 2 25 10 *", "0-10 1-3 * 3,10 *",
    "30 2 * * 1-6",  # not on Sundays: nothing that night
])
@pytest.mark.parametrize("transition", DAYS)
def test_fixed_hour_crons_with_day_fields(expr: str, transition: str) -> None:
    day = DAYS[transition]
    fires = sequence(cron_trigger(expr, BERLIN), day)
    assert clock(fires) == clock(promised(expr, day))
    check_wall_clock_order(expr, fires)


@pytest.mark.parametrize("transition", DAYS)
@pytest.mark.parametrize("expr", ["*/5 * * * *", "* * * * *", "0 * * * *", "15,45 * * * *",
                                  "30 */1 * * *", "0-10 * * * *"])
def test_any_hour_crons_run_by_elapsed_time(expr: str, transition: str) -> None:
    day = DAYS[transition]
    fires = sequence(cron_trigger(expr, BERLIN), day)
    assert clock(fires) == clock(promised(expr, day))
    assert all(b > a for a, b in zip(fires, fires[1:], strict=False))


@pytest.mark.parametrize("case", OTHER_ZONES)
@pytest.mark.parametrize("expr", ["*/5 * * * *", "0 * * * *", "15,45 * * * *", "0-10 * * * *"])
def test_any_hour_crons_run_by_elapsed_time_in_other_zones(expr: str, case: str) -> None:
    name, day, _ = OTHER_ZONES[case]
    zone = ZoneInfo(name)
    fires = sequence(cron_trigger(expr, zone), day, zone)
    assert clock(fires, zone) == clock(promised(expr, day, zone), zone)


def test_the_repeated_hour_as_the_issue_reports_it() -> None:
    """`*/5 2` fired at 02:55 CEST and again at 02:40 CET; `* 2` six times in the repeat."""
    five = sequence(cron_trigger("*/5 2 * * *", BERLIN), FALL)
    assert clock(five) == [f"25 02:{m:02d} CEST" for m in range(0, 60, 5)]
    every = sequence(cron_trigger("* 2 * * *", BERLIN), FALL)
    assert clock(every) == [f"25 02:{m:02d} CEST" for m in range(60)]


def test_the_gap_moves_every_fire_one_hour_later_on_the_clock() -> None:
    five = sequence(cron_trigger("*/5 2 * * *", BERLIN), SPRING)
    assert clock(five) == [f"29 03:{m:02d} CEST" for m in range(0, 60, 5)]
    both = sequence(cron_trigger("15,45 2,3 * * *", BERLIN), SPRING)
    assert clock(both) == ["29 03:15 CEST", "29 03:45 CEST"]  # 02:15 is 03:15: once


STARTS = [  # (zone, night, cron)
    *[("Europe/Berlin", day, expr) for day in (SPRING, FALL)
      for expr in ("*/5 2 * * *", "15,45 1-3 * * *", "* 2 * * *", "0-10 2,3 * * *")],
    ("Australia/Lord_Howe", datetime(2026, 10, 4), "5,33 2 * * *"),
    ("Australia/Lord_Howe", datetime(2026, 4, 5), "5,33 1 * * *"),
    ("America/Santiago", datetime(2026, 9, 6), "*/10 0 * * *"),
]


@pytest.mark.parametrize(("name", "day", "expr"), STARTS)
def test_a_scheduler_started_at_any_minute_of_the_night_agrees(name: str, day: datetime,
                                                               expr: str) -> None:
    """`mailer run` started (or `is_fire_time` asking) mid-transition finds the same fires."""
    zone = ZoneInfo(name)
    trigger = cron_trigger(expr, zone)
    expected = promised(expr, day, zone)
    start = (day - timedelta(hours=1)).replace(tzinfo=zone).astimezone(UTC)
    for step in range(0, 6 * 60 * 2):  # every minute, on it and half-way through
        now = start + timedelta(seconds=30 * step)
        nxt = trigger.get_next_fire_time(None, now.astimezone(zone))
        want = next((t for t in expected if t >= now), None)
        if want is None:
            continue  # beyond the window; the sequence tests cover the next day
        assert nxt is not None and nxt.astimezone(UTC) == want, (
            f"'{expr}' asked at {now.astimezone(zone):%H:%M:%S %Z}: "
            f"{clock([nxt], zone) if nxt else None} instead of {clock([want], zone)}")


@pytest.mark.parametrize("transition", DAYS)
def test_fires_missed_while_not_running_are_all_found(transition: str) -> None:
    """APScheduler asks for the fire after the last one with `now` hours later (misfires)."""
    day = DAYS[transition]
    trigger = cron_trigger("*/5 2 * * *", BERLIN)
    expected = promised("*/5 2 * * *", day)
    later = expected[-1] + timedelta(hours=5)
    found, prev = [], expected[0]
    while (nxt := trigger.get_next_fire_time(prev, later)) is not None and nxt <= later:
        found.append(nxt.astimezone(UTC))
        prev = nxt
    assert found == expected[1:]


@pytest.mark.parametrize("transition", DAYS)
def test_the_trigger_survives_the_job_store_pickle(transition: str) -> None:
    day = DAYS[transition]
    trigger = pickle.loads(pickle.dumps(cron_trigger("*/5 2 * * *", BERLIN)))
    assert clock(sequence(trigger, day)) == clock(promised("*/5 2 * * *", day))


def test_apscheduler_alone_breaks_the_promise() -> None:
    """The reason for CampaignCronTrigger: the plain trigger repeats and loses fires."""
    plain = CronTrigger.from_crontab("*/5 2 * * *", timezone=BERLIN)
    assert len(sequence(plain, FALL)) == 24
    assert len(sequence(plain, SPRING)) == 1


def test_the_oracle_reads_crontab() -> None:
    assert field_values("5,20-25,58", 0, 59) == {5, 20, 21, 22, 23, 24, 25, 58}
    assert field_values("50-59/3", 0, 59) == {50, 53, 56, 59}
    assert field_values("*/2", 0, 23) == set(range(0, 24, 2))
    assert matches("0 9 * * 0", datetime(2026, 12, 6, 9, 0))  # a Sunday
    assert matches("0 9 * * 7", datetime(2026, 12, 6, 9, 0))
    assert not matches("0 9 * * 1", datetime(2026, 12, 6, 9, 0))
    assert passes(datetime(2026, 3, 29, 2, 30)) == []
    assert len(passes(datetime(2026, 10, 25, 2, 30))) == 2


@pytest.mark.parametrize("expr", ["*/5 2 * * *", "0 * * * *", "30 9 * * 1-5"])
def test_the_pickle_keeps_the_expression_and_the_reading(expr: str) -> None:
    original = cron_trigger(expr, BERLIN)
    trigger = pickle.loads(pickle.dumps(original))
    assert (trigger.expr, trigger.fixed_hours) == (expr, original.fixed_hours)
    assert trigger.fixed_hours is (expr.split()[1] != "*")
    for day in DAYS.values():
        assert clock(sequence(trigger, day)) == clock(promised(expr, day))


def test_a_stored_trigger_from_before_the_expression_was_kept() -> None:
    """A job row pickled without our two fields reads as a fixed-hour cron, with no expression."""
    state = cron_trigger("*/5 2 * * *", BERLIN).__getstate__()
    del state["expr"], state["fixed_hours"]
    trigger = cron_trigger("0 * * * *", BERLIN)
    trigger.__setstate__(state)
    assert (trigger.expr, trigger.fixed_hours) == ("", True)
    assert clock(sequence(trigger, FALL)) == clock(promised("*/5 2 * * *", FALL))


@pytest.mark.parametrize(("field", "names"), [
    ("1,3,5", "mon,wed,fri"), ("0", "sun"), ("7", "sun"), ("0,7", "sun"), ("3", "wed"),
    ("1-5", "mon,tue,wed,thu,fri"), ("1-5/2", "mon,wed,fri"), ("*/2", "sun,tue,thu,sat"),
    ("5/1", "fri,sat,sun"), ("0-6", "*"), ("1-7", "*"), ("*", "*"), ("mon-fri", "mon-fri"),
])
def test_crontab_weekdays_in_apschedulers_names(field: str, names: str) -> None:
    from mailer.triggers import crontab_weekdays

    assert crontab_weekdays(field) == names


@pytest.mark.parametrize(("field", "message"), [
    ("mon,1", "mixing names and numbers in the weekday field ('mon,1')"),
    ("8", "weekday '8' is out of range (0-7, 0 and 7 are Sunday)"),
    ("5-3", "weekday '5-3' is out of range"),
    ("1-9/2", "weekday '1-9/2' is out of range"),
])
def test_crontab_weekdays_refused_with_a_sentence(field: str, message: str) -> None:
    from mailer.triggers import crontab_weekdays

    with pytest.raises(ValueError) as caught:
        crontab_weekdays(field)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("expr", "message"), [
    ("0 9 * *", "wrong number of fields; got 4, expected 5"),
    ("0 9 1 * 1", "restrict either the day of month or the weekday, not both (crontab would "
                  "fire when either matches); use two campaigns if you need both"),
])
def test_crontab_expressions_refused_with_a_sentence(expr: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        cron_trigger(expr, BERLIN)
    assert str(caught.value) == message


@pytest.mark.parametrize(("expr", "first"), [
    ("0 9 1 * *", datetime(2026, 12, 1, 9, 0)),     # day of month
    ("0 9 * 12 *", datetime(2026, 12, 1, 9, 0)),    # month
    ("30 8 15 3 *", datetime(2027, 3, 15, 8, 30)),  # both
    ("0 * * 1 *", datetime(2027, 1, 1, 0, 0)),      # any hour, in one month
])
def test_day_and_month_fields_are_read(expr: str, first: datetime) -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=BERLIN)
    nxt = cron_trigger(expr, BERLIN).get_next_fire_time(None, now)
    assert nxt is not None and nxt.replace(tzinfo=None) == first
    assert nxt.tzinfo is BERLIN  # in the configured zone, as APScheduler's own triggers answer


def test_a_cron_that_never_matches_has_no_next_fire() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=BERLIN)
    assert cron_trigger("0 9 30 2 *", BERLIN).get_next_fire_time(None, now) is None
