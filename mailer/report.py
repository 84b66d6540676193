"""`mailer report`: what happened in a campaign's runs."""

from __future__ import annotations

from typing import Any

import click

from .config import Settings
from .store import Store
from .store import queries as q


def build_report(store: Store, campaign_id: str, *, settings: Settings, failed: bool = False
                 ) -> dict[str, Any]:
    tz = settings.tz
    out: dict[str, Any] = {"campaign": campaign_id, "runs": [], "totals": {}}
    totals: dict[str, int] = {}
    with store.engine.connect() as conn:
        for run in q.runs_of(conn, campaign_id):
            counts = q.status_counts(conn, run.id)
            first, last = q.send_window(conn, run.id)
            entry: dict[str, Any] = {
                "run": run.id,
                "occurrence": run.occurrence,
                "status": run.status,
                "trigger": run.trigger,
                "scheduled_at": run.scheduled_at.astimezone(tz).isoformat()
                if run.scheduled_at else None,
                "late_s": run.late_s,
                "counts": counts,
                "first_sent": first.astimezone(tz).isoformat() if first else None,
                "last_sent": last.astimezone(tz).isoformat() if last else None,
                "in_flight_recovered": run.in_flight_recovered,
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
    out["totals"] = totals
    return out


def print_report(data: dict[str, Any]) -> None:
    if not data["runs"]:
        click.echo(f"{data['campaign']}: no runs yet")
        return
    for run in data["runs"]:
        c = run["counts"]
        late = f", started {run['late_s']:.0f} s late" if run.get("late_s") else ""
        click.echo(f"run {run['run']} ({run['occurrence']}, {run['status']}{late}): "
                   f"{c['sent']} sent, {c['failed']} failed, {c['pending']} pending, "
                   f"{c['sending']} sending")
        if run["first_sent"]:
            click.echo(f"  first sent {run['first_sent']}, last sent {run['last_sent']}")
        if run["in_flight_recovered"]:
            click.echo(f"  {run['in_flight_recovered']} caught in flight by a crash and sent "
                       "again (those the relay had already taken may have arrived twice)")
        for f in run["failures"]:
            click.echo(f"  {f['count']} × {f['code'] or 'no reply'}: {f['example']}")
        for f in run.get("failed", []):
            code = f"{f['code']} " if f["code"] else ""
            click.echo(f"  failed {f['email']}: {code}{f['reason']}")
    t = data["totals"]
    click.echo("totals: " + ", ".join(f"{k} {v}" for k, v in t.items()))
