"""`mailer status`: every campaign under campaigns/ at a glance, as data the CLI prints.

Per campaign file: id, title, languages, audience, schedule and next fire, the last run with its
counts, and problems: the error sentence of a file that does not validate, or a missed fire (a
one-off whose time has passed and that has not gone out, or a cron fire that was missed or
failed). One broken file does not stop the others.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from .campaign import Campaign, campaign_files, resolve_local
from .checks import Checked, check_campaign
from .config import Settings
from .report import local_iso
from .store import ONCE, RunStatus, Store
from .store import queries as q


def minute(when: datetime | None, tz: tzinfo) -> str | None:
    """A time in the configured zone to the minute, ISO 8601 with its offset."""
    return local_iso(when, tz, timespec="minutes")


def campaign_status(settings: Settings, store: Store, *, now: datetime | None = None
                    ) -> list[dict[str, Any]]:
    now = now or q.utcnow()
    return [_status(path, settings, store, now) for path in campaign_files(settings)]


def _status(path: Path, settings: Settings, store: Store, now: datetime) -> dict[str, Any]:
    from .jobs import file_problem  # the sentence `mailer schedule` shows for a bad file

    entry: dict[str, Any] = {"file": path.name, "campaign": None, "title": None,
                             "languages": [], "audience": None, "schedule": None,
                             "next_fire": None, "last_run": None, "problems": [],
                             "warnings": []}
    try:
        checked = check_campaign(path, settings)
        audience = _audience(checked, settings, store)
    except Exception as exc:  # listed with its problem; the other files still are
        entry["problems"].append(file_problem(exc, path))
        return entry
    campaign = checked.campaign
    with store.engine.connect() as conn:
        runs = q.runs_of(conn, campaign.id)
        last = _last_run(conn, runs, settings.tz)
        nxt, problem = _schedule(conn, campaign, runs, settings, now)
    entry.update(campaign=campaign.id, title=campaign.display_title,
                 languages=campaign.languages, audience=audience,
                 schedule=campaign.schedule.model_dump(exclude_none=True)
                 if campaign.schedule else None,
                 next_fire=minute(nxt, settings.tz), last_run=last,
                 problems=[problem] if problem else [], warnings=checked.warnings)
    return entry


def _audience(checked: Checked, settings: Settings, store: Store) -> dict[str, int]:
    """Who would get it now (duplicates once, suppressed addresses left out), and from where:
    the list files (as `mailer validate` counts them) and the managed lists' subscribers."""
    from .sending import audience
    from .subscribers import is_managed, member_count

    with store.engine.connect() as conn:
        subscribers = sum(member_count(conn, name) for name in checked.campaign.audience.lists
                          if is_managed(settings, name))
    return {"recipients": sum(1 for _ in audience(checked, settings, store)),
            "from_list_files": len(checked.recipients), "subscribers": subscribers}


def _last_run(conn: Connection, runs: list[q.Run], tz: tzinfo) -> dict[str, Any] | None:
    if not runs:
        return None
    run = runs[-1]
    counts = q.status_counts(conn, run.id)
    return {"number": len(runs), "id": run.id, "occurrence": run.occurrence,
            "status": run.status, "started": minute(run.created_at, tz),
            "finished": minute(run.finished_at, tz), "recipients": run.total,
            "sent": counts["sent"], "failed": counts["failed"],
            "waiting": counts["pending"] + counts["sending"],
            "bounced": q.bounced_count(conn, run.id)}


def _schedule(conn: Connection, campaign: Campaign, runs: list[q.Run], settings: Settings,
              now: datetime) -> tuple[datetime | None, str | None]:
    """The next fire as `mailer schedule` computes it, and a missed fire as a problem."""
    from .jobs import next_fire, one_off_done

    schedule = campaign.schedule
    if schedule is None:
        return None, None
    send = f"send it with: mailer send {campaign.id}"
    if schedule.at is not None:
        done = one_off_done(conn, campaign.id)
        if done is not None and done.occurrence == ONCE:
            return None, None  # sent, or being sent
        if done is None and resolve_local(schedule.at, settings) > now:
            return next_fire(campaign, settings, now), None
        why = f" ({done.note})" if done is not None and done.note else ""
        return None, (f"missed: it was due at {schedule.at} ({settings.timezone}) and has not "
                      f"gone out{why}; {send}")
    last = runs[-1] if runs else None
    problem = None
    if last is not None and last.status in (RunStatus.MISSED, RunStatus.FAILED):
        problem = (f"the fire at {minute(last.scheduled_at, settings.tz)} was "
                   f"{last.status}{f' ({last.note})' if last.note else ''}")
    return next_fire(campaign, settings, now), problem
