"""Cron triggers that read crontab the way staff expect, in the configured time zone.

* `CronTrigger.from_crontab` numbers weekdays from Monday (0 = Monday; apscheduler#286, kept in
  3.x). In crontab 0 and 7 are Sunday: `crontab_weekdays` translates numbers into names.
* A cron with fixed hours (any hour field but `*` or `*/1`) names wall-clock times; each matching
  wall-clock time fires exactly once, at the instant `zoneinfo` gives it with `fold=0`:
  - in the fall-back night, at the first pass of the repeated hour (APScheduler alone fires
    both passes);
  - in the spring-forward gap, as much later on the clock as the clock jumps (read with the
    offset before the jump; an hour in Berlin): `*/5 2 * * *` fires at 03:00, 03:05, … 03:55
    CEST (APScheduler alone fires only 03:00). A gap time that lands on a time the cron names
    anyway fires once.
* A cron whose hour field is `*` runs by elapsed time: it fires in both passes of the repeated
  hour (an hourly job stays hourly), as Vixie cron does, and the gap simply does not happen.
* Crontab fires when the day of month *or* the weekday matches if both are restricted;
  APScheduler needs both. Rather than guess, such expressions are refused with a clear message.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.cron import CronTrigger

WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")  # crontab: 0 and 7 = Sunday
NEAR = timedelta(hours=3)  # wider than any shift of the clock
MAX_CANDIDATES = 10_000  # wall-clock times looked at; a shift's night needs ~100 at most


def crontab_weekdays(value: str) -> str:
    """A crontab day-of-week field (0/7 = Sunday) in APScheduler's terms (names)."""
    if not any(c.isdigit() for c in value):
        return value
    days: list[int] = []
    for part in value.split(","):
        span, _, step = part.partition("/")
        if not (span.replace("-", "").isdigit() or span == "*"):
            raise ValueError(f"mixing names and numbers in the weekday field ('{value}')")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            low, high = (int(x) for x in span.split("-", 1))
        else:
            low = int(span)
            high = 7 if step else low
        if not 0 <= low <= high <= 7:
            raise ValueError(f"weekday '{part}' is out of range (0-7, 0 and 7 are Sunday)")
        days.extend(range(low, high + 1, int(step) if step else 1))
    names = list(dict.fromkeys(WEEKDAYS[d] for d in days))
    return "*" if len(names) == 7 else ",".join(names)


def wall_instant(wall: datetime, zone: tzinfo) -> datetime:
    """The instant (UTC) a wall-clock time stands for: the first pass of a repeated time, and
    a time in the spring-forward gap read with the offset before the jump (PEP 495, fold=0)."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _offsets_near(when: datetime, zone: tzinfo) -> tuple[timedelta, timedelta]:
    """The zone's UTC offsets a few hours before and after `when`."""
    before, after = (when - NEAR).astimezone(zone).utcoffset(), \
        (when + NEAR).astimezone(zone).utcoffset()
    assert before is not None and after is not None
    return before, after


class CampaignCronTrigger(CronTrigger):
    """Crontab with crontab's weekdays and one fire per wall-clock time (see the module doc)."""

    __slots__ = ("expr", "fixed_hours")

    def __init__(self, expr: str, *, timezone: tzinfo) -> None:
        values = expr.split()
        if len(values) != 5:
            raise ValueError(f"wrong number of fields; got {len(values)}, expected 5")
        minute, hour, day, month, weekday = values
        if day != "*" and weekday != "*":
            raise ValueError(
                "restrict either the day of month or the weekday, not both (crontab would fire "
                "when either matches); use two campaigns if you need both")
        super().__init__(minute=minute, hour=hour, day=day, month=month,
                         day_of_week=crontab_weekdays(weekday), timezone=timezone)
        self.expr = expr
        self.fixed_hours = hour not in ("*", "*/1")

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime
                           ) -> datetime | None:
        if not self.fixed_hours:
            return super().get_next_fire_time(previous_fire_time, now)
        return self._by_wall_time(self._search_start(previous_fire_time, now))

    def _search_start(self, previous: datetime | None, now: datetime) -> datetime:
        """The earliest instant the next fire may be, as CronTrigger computes it (UTC)."""
        if previous is not None:
            previous = previous.astimezone(UTC)
            start = min(now.astimezone(UTC), previous + timedelta(microseconds=1))
            return start + timedelta(microseconds=1) if start == previous else start
        return now.astimezone(UTC)  # no start_date: cron_trigger never sets one

    def _by_wall_time(self, start: datetime) -> datetime | None:
        """The earliest instant at or after `start` that a matching wall-clock time stands for.

        Wall-clock times are enumerated on a copy of this trigger in UTC, where wall-clock
        arithmetic knows no shifts. A wall time w stands for w - offset(w): only w from
        start + (the smallest offset near start) on can stand for an instant at or after start,
        and no w later than (best instant + the largest offset near it) for one before it.
        Away from a shift that is one or two steps; in a shift's night, an hour's fires at most.
        """
        zone = self.timezone
        walls = CronTrigger.__new__(CronTrigger)
        walls.__setstate__({"version": 2, "timezone": UTC, "start_date": None,
                            "end_date": None, "fields": self.fields, "jitter": None})
        wall = walls.get_next_fire_time(None, start + min(_offsets_near(start, zone)))
        best: datetime | None = None
        limit: datetime | None = None
        for _ in range(MAX_CANDIDATES):
            if wall is None or (limit is not None and wall > limit):
                break
            instant = wall_instant(wall.replace(tzinfo=None), zone)
            if instant >= start and (best is None or instant < best):
                best = instant
                limit = instant + max(_offsets_near(instant, zone))
            wall = walls.get_next_fire_time(wall, wall)
        return None if best is None else best.astimezone(zone)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state.update(expr=self.expr, fixed_hours=self.fixed_hours)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.expr = state.get("expr", "")
        self.fixed_hours = state.get("fixed_hours", True)


def cron_trigger(expr: str, zone: tzinfo) -> CampaignCronTrigger:
    return CampaignCronTrigger(expr, timezone=zone)
