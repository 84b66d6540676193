"""`mailer schedule`: each campaign's next fire or why there is none, its last run, its misses
and failed fires, and the last good schedule `mailer run` keeps for a broken file."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from .campaign import Campaign, campaign_files, resolve_local
from .checks import check_campaign
from .config import Settings
from .jobs import (
    file_problem,
    kept_jobs,
    local_isoformat,
    next_fire,
    one_off_done,
    schedule_text,
    utc_isoformat,
)
from .scheduler import TRIGGER, failed_fires
from .store import RunStatus, Store
from .store import queries as q


def schedule_overview(settings: Settings, store: Store, *, now: datetime | None = None,
                      unscheduled: bool = False) -> list[dict[str, Any]]:
    """Every scheduled campaign: next fire (local and UTC) or why there is none, last run and
    its status, misses. With `unscheduled`, campaigns without a schedule too (`schedule` None).

    Files are checked as `mailer run` checks them (list contents aside, which `mailer validate`
    reads): a broken one is listed with its error and, when the job store still holds a job for
    it, the last good schedule `mailer run` keeps.
    """
    now = now or q.utcnow()
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
        "schedule": schedule_text(campaign) if schedule else None,
        "next_local": local_isoformat(nxt, settings), "next_utc": utc_isoformat(nxt),
        "why": None if nxt else no_next_fire(campaign, settings, done, number),
        "last_run": None if last is None else {
            "id": last.id, "number": number[last.id], "occurrence": last.occurrence,
            "status": last.status, "trigger": last.trigger,
            "scheduled_utc": utc_isoformat(last.scheduled_at), "late_s": last.late_s,
            "total": last.total, "finished_utc": utc_isoformat(last.finished_at),
            "note": last.note},
        "missed": [{"occurrence": r.occurrence, "scheduled_utc": utc_isoformat(r.scheduled_at),
                    "note": r.note} for r in missed],
        "failed": [{"run": r.id, "number": number[r.id], "occurrence": r.occurrence,
                    "status": r.status, "scheduled_utc": utc_isoformat(r.scheduled_at),
                    "note": r.note}
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
