"""CLI: status (every campaign at a glance)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .base import Ctx, pass_ctx, user_errors


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="one JSON document instead of text")
@pass_ctx
@user_errors
def status(ctx: Ctx, as_json: bool) -> None:
    """Every campaign: audience, schedule and next fire, last run, problems.

    Exit code 0 when no campaign has a problem, 1 when one has (an invalid file, a missed fire).
    """
    from ..status import campaign_status

    settings = ctx.settings
    rows = campaign_status(settings, ctx.store())
    troubled = [row for row in rows if row["problems"]]
    if as_json:
        click.echo(json.dumps({"timezone": settings.timezone, "campaigns": rows,
                               "with_problems": len(troubled)}, indent=2, ensure_ascii=False))
    elif not rows:
        click.echo(f"no campaign files in {settings.campaigns_dir}")
    else:
        click.echo("\n\n".join(_block(row, settings.timezone) for row in rows))
    if troubled:
        if not as_json:
            click.echo(f"{len(troubled)} of {len(rows)} campaigns have problems", err=True)
        sys.exit(1)


def _block(row: dict[str, Any], zone: str) -> str:
    head = f"{row['campaign']} – {row['title']}" if row["campaign"] else f"{row['file']} – invalid"
    lines = [head, f"  file:      {row['file']}"]
    if row["campaign"]:
        a = row["audience"]
        lines += [f"  languages: {', '.join(row['languages'])}",
                  f"  audience:  {a['recipients']} recipients ({a['from_list_files']} in list "
                  f"files, {a['subscribers']} subscribers; each address once, suppressed ones "
                  "left out)",
                  f"  schedule:  {_schedule(row, zone)}",
                  f"  last run:  {_last_run(row['last_run'])}"]
    lines += [f"  warning:   {w}" for w in row["warnings"]]
    lines += [f"  PROBLEM:   {p}" for p in row["problems"]]
    return "\n".join(lines)


def _when(iso: str | None) -> str:
    """`2026-12-03T09:00+01:00` as staff read it: `2026-12-03 09:00`."""
    return (iso or "")[:16].replace("T", " ")


def _schedule(row: dict[str, Any], zone: str) -> str:
    s = row["schedule"]
    if s is None:
        return "none (goes out only with mailer send)"
    what = f"at {s['at']}" if "at" in s else f"cron {s['cron']}"
    nxt = f"next fire {_when(row['next_fire'])} ({zone})" if row["next_fire"] else "no next fire"
    return f"{what}; {nxt}"


def _last_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    waiting = f", {run['waiting']} waiting" if run["waiting"] else ""
    return (f"run {run['number']} ({run['status']}, started {_when(run['started'])}): "
            f"{run['sent']} sent, {run['failed']} failed, {run['bounced']} bounced{waiting} "
            f"of {run['recipients']}")


def register(main: click.Group) -> None:
    main.add_command(status)
