"""Cron triggers that read crontab the way staff expect, in the configured time zone.

* `CronTrigger.from_crontab` numbers weekdays from Monday (0 = Monday; apscheduler#286, kept in
  3.x). In crontab 0 and 7 are Sunday: `crontab_weekdays` translates numbers into names.
* In the fall-back night a fixed-hour cron fires once, at the first pass of the repeated hour;
  APScheduler alone fires it twice. In the spring-forward gap it fires once, one hour later on
  the clock (APScheduler's reading of a non-existent local time).
* Crontab fires when the day of month *or* the weekday matches if both are restricted;
  APScheduler needs both. Rather than guess, such expressions are refused with a clear message.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any

from apscheduler.triggers.cron import CronTrigger

WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")  # crontab: 0 and 7 = Sunday


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


def _repeated_wall_time(when: datetime, zone: tzinfo) -> bool:
    """Is this the second pass of a wall-clock time the fall-back night repeats?"""
    local = when.astimezone(zone)
    naive = local.replace(tzinfo=None)
    first = naive.replace(tzinfo=zone, fold=0)
    return first.utcoffset() != local.utcoffset() and first.astimezone(UTC) < local.astimezone(UTC)


class CampaignCronTrigger(CronTrigger):
    """Crontab with crontab's weekdays and one fire per wall-clock time (see the module doc)."""

    __slots__ = ("expr", "fixed_hours")

    def __init__(self, expr: str, *, timezone: tzinfo, start_date: datetime | None = None) -> None:
        values = expr.split()
        if len(values) != 5:
            raise ValueError(f"wrong number of fields; got {len(values)}, expected 5")
        minute, hour, day, month, weekday = values
        if day != "*" and weekday != "*":
            raise ValueError(
                "restrict either the day of month or the weekday, not both (crontab would fire "
                "when either matches); use two campaigns if you need both")
        super().__init__(minute=minute, hour=hour, day=day, month=month,
                         day_of_week=crontab_weekdays(weekday), timezone=timezone,
                         start_date=start_date)
        self.expr = expr
        self.fixed_hours = hour not in ("*", "*/1")

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime
                           ) -> datetime | None:
        nxt = super().get_next_fire_time(previous_fire_time, now)
        for _ in range(8):  # a repeated hour holds at most 60 fire times of a fixed-hour cron
            if nxt is None or not self.fixed_hours or not _repeated_wall_time(nxt, self.timezone):
                return nxt
            nxt = super().get_next_fire_time(nxt, max(now, nxt, key=lambda d: d.astimezone(UTC)))
        return nxt

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state.update(expr=self.expr, fixed_hours=self.fixed_hours)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.expr = state.get("expr", "")
        self.fixed_hours = state.get("fixed_hours", True)


def cron_trigger(expr: str, zone: tzinfo, *, start_date: datetime | None = None
                 ) -> CampaignCronTrigger:
    return CampaignCronTrigger(expr, timezone=zone, start_date=start_date)
