"""`mailer report`: what happened in a campaign's runs."""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

import click
from sqlalchemy import Connection

from .config import Settings
from .store import FAILED_ONCE, MISSED_ONCE, ONCE, Store
from .store import queries as q


def local_time(when: datetime | None, tz: tzinfo, *, seconds: bool = False) -> str | None:
    """A time as staff read it: the configured zone, to the minute (or second), no zone name."""
    if when is None:
        return None
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def local_iso(when: datetime | None, tz: tzinfo, *, timespec: str = "seconds") -> str | None:
    """The same time for --json: ISO 8601 with the zone's offset, to the second (or minute)."""
    return when.astimezone(tz).isoformat(timespec=timespec) if when else None


def run_numbers(conn: Connection, campaign_id: str) -> dict[int, int]:
    """Database run id → the run's number within its campaign (1, 2, 3 … in order of start):
    what staff are shown, since the database id counts the runs of every campaign."""
    return {run.id: n for n, run in enumerate(q.runs_of(conn, campaign_id), start=1)}


def describe_occurrence(occurrence: str, tz: tzinfo) -> str:
    """The occurrence key of a run as words: `once`, `manual-20261203T…`, a cron fire time…"""
    named = {ONCE: "one-off", MISSED_ONCE: "one-off, missed", FAILED_ONCE: "one-off, fire failed"}
    if occurrence in named:
        return named[occurrence]
    if occurrence.startswith("manual-"):
        return "manual send"
    if occurrence.startswith("again-"):
        return "sent anew (--again)"
    try:
        fire = datetime.fromisoformat(occurrence)
    except ValueError:
        return occurrence
    if fire.tzinfo is None:
        return occurrence
    return f"scheduled {local_time(fire, tz)}"


def build_report(store: Store, campaign_id: str, *, settings: Settings, failed: bool = False
                 ) -> dict[str, Any]:
    tz = settings.tz
    out: dict[str, Any] = {"campaign": campaign_id, "runs": [], "totals": {}}
    totals: dict[str, int] = {}
    returned: dict[str, int] = {}
    with store.engine.connect() as conn:
        for number, run in enumerate(q.runs_of(conn, campaign_id), start=1):
            counts = q.status_counts(conn, run.id)
            first, last = q.send_window(conn, run.id)
            entry: dict[str, Any] = {
                "run": run.id,  # the database id
                "number": number,  # the run's number within the campaign, as the text shows it
                "occurrence": run.occurrence,
                "status": run.status,
                "trigger": run.trigger,
                "started": local_iso(run.created_at, tz),
                "scheduled_at": local_iso(run.scheduled_at, tz),
                "late_s": run.late_s,
                "counts": counts,
                "returned": returned_counts(conn, run.id),
                "first_sent": local_iso(first, tz),
                "last_sent": local_iso(last, tz),
                "in_flight_recovered": run.in_flight_recovered,
                "sent_by": q.sent_by(conn, run.id),  # worker (host:pid:tag) -> rows
                "failures": [{"code": code, "count": n, "example": text}
                             for code, n, text in q.failures_by_code(conn, run.id)],
                "note": run.note,
            }
            if failed:
                entry["failed"] = [{"email": e, "code": c, "reason": t}
                                   for _, e, c, t in q.failed_rows(conn, run.id, limit=100_000)]
            out["runs"].append(entry)
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
            for kind, n in entry["returned"].items():
                returned[kind] = returned.get(kind, 0) + n
    out["totals"] = totals
    out["returned"] = returned
    return out


def returned_counts(conn: Connection, run_id: int) -> dict[str, int]:
    """What came back for a run: bounced recipients (returned as a hard bounce, or refused
    with 5.1.x during the run, as `mailer status` counts them), soft bounces, complaints and
    unsubscribes by mail (mailbox.py)."""
    kinds = q.returned_counts(conn, run_id)
    return {"bounced": q.bounced_count(conn, run_id), "soft_bounced": kinds["soft_bounce"],
            "complained": kinds["complaint"], "unsubscribed": kinds["unsubscribe"]}


def print_report(data: dict[str, Any], *, tz: tzinfo) -> None:
    if not data["runs"]:
        click.echo(f"{data['campaign']}: no runs yet")
        return
    for run in data["runs"]:
        c = run["counts"]
        late = f", started {run['late_s']:.0f} s late" if run.get("late_s") else ""
        what = describe_occurrence(run["occurrence"], tz)
        click.echo(f"run {run['number']} ({what}, {run['status']}{late}): "
                   f"{c['sent']} sent, {c['failed']} failed, {c['pending']} pending, "
                   f"{c['sending']} sending")
        if run["first_sent"]:
            first, last = (local_time(datetime.fromisoformat(run[k]), tz, seconds=True)
                           for k in ("first_sent", "last_sent"))
            click.echo(f"  first sent {first}, last sent {last}")
        if len(run["sent_by"]) > 1:  # one worker is the usual case: nothing to say
            workers = ", ".join(f"{w} {n}" for w, n in run["sent_by"].items())
            click.echo(f"  sent by {len(run['sent_by'])} workers: {workers}")
        if run["in_flight_recovered"]:
            click.echo(f"  {run['in_flight_recovered']} caught in flight by a crash and sent "
                       "again (those the relay had already taken may have arrived twice)")
        for f in run["failures"]:
            click.echo(f"  {f['count']} × {f['code'] or 'no reply'}: {f['example']}")
        if "failed" in run and not run["failed"]:
            click.echo(f"  no failed deliveries in run {run['number']}")
        for f in run.get("failed", []):
            code = f"{f['code']} " if f["code"] else ""
            click.echo(f"  failed {f['email']}: {code}{f['reason']}")
        r = run["returned"]
        click.echo(f"  returned: {r['bounced']} bounced, {r['soft_bounced']} soft bounces, "
                   f"{r['complained']} complained, {r['unsubscribed']} unsubscribed by mail")
    t = data["totals"]
    click.echo("totals: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    r = data["returned"]
    click.echo("returned: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r.items()))
