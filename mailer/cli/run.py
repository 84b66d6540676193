"""CLI: run (the scheduler) and schedule (what it will do)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import click

from .base import Ctx, error_line, pass_ctx, user_errors

FAILED_SHOWN = 5  # failed fires listed under a campaign by `mailer schedule` (--json: all 20)


class UtcFormatter(logging.Formatter):
    """`2026-12-01T08:00:00.123Z INFO event=fire campaign=… run=…` on stderr."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure_logging() -> None:
    """On top of cli.setup_logging (level, stderr): UTC ISO timestamps, quiet libraries."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(UtcFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    # aiosmtpd logs every SMTP command, addresses included, at INFO on 'mail.log'; APScheduler's
    # own INFO lines repeat ours unstructured.
    for noisy in ("mail.log", "apscheduler", "alembic", "mailer.capture"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_path(ctx: Ctx) -> str:
    """The absolute config path: what jobs in the store carry to find their settings."""
    raw = ctx.config_path or os.environ.get("MAILER_CONFIG") or "config.yaml"
    return str(Path(raw).resolve())


@click.command("run")
@click.option("--once", is_flag=True, help="fire what is due now (and unfinished runs), then exit")
@pass_ctx
@user_errors
def run(ctx: Ctx, once: bool) -> None:
    """The scheduler: fires every scheduled campaign on time, exactly once."""
    from ..dispatch import stop_on_signals
    from ..links import refuse_broken_links
    from ..scheduler import serve

    settings = ctx.settings
    refuse_broken_links(settings)  # a real relay needs public https links; nothing written yet
    configure_logging()

    def invalid(path: Path, error: str) -> None:
        named = error if path.name in error else f"{path}: {error}"
        error_line(f"{named} (this file was skipped; the other campaigns ran)")

    async def main() -> int:
        stop = asyncio.Event()
        with stop_on_signals(asyncio.get_running_loop(), stop):
            return await serve(settings, config_path(ctx), once=once, stop=stop,
                               on_invalid=invalid if once else None)

    sys.exit(asyncio.run(main()))


@click.command("schedule")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@user_errors
def schedule(ctx: Ctx, as_json: bool) -> None:
    """Every scheduled campaign: next fire time, last run, missed occurrences."""
    from ..schedule_view import schedule_overview

    settings = ctx.settings
    rows = schedule_overview(settings, ctx.store(), unscheduled=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not [row for row in rows if row.get("schedule")]:
        click.echo(f"no scheduled campaigns in {settings.campaigns_dir}")
    for row in rows:  # broken files on stderr, like `mailer validate` reports them
        click.echo(_line(row, settings.tz), err=bool(row.get("error")))


def _line(row: dict[str, Any], tz: tzinfo) -> str:
    from ..report import describe_occurrence

    if row.get("error"):
        kept = row.get("kept")
        if not kept:
            return f"error: {row['error']} (no next fire: the file is invalid)"
        when = f"next {_local(kept['next_local'], tz)}" if kept["next_local"] \
            else "no next fire"
        return (f"error: {row['error']} (mailer run keeps the last good schedule "
                f"of {kept['campaign']}: {kept['schedule']}; {when})")
    when = f"next {_local(row['next_local'], tz)}" if row["next_local"] \
        else f"no next fire: {row['why']}"
    last = row["last_run"]
    done = (f"last run {last['number']} {last['status']} "
            f"({describe_occurrence(last['occurrence'], tz)}, {last['total']} recipients)"
            if last else "never run")
    missed = f", {len(row['missed'])} missed" if row["missed"] else ""
    failed = f", {len(row['failed'])} failed" if row["failed"] else ""
    head = f"{row['campaign']}: {row['schedule']}; {when}" if row["schedule"] \
        else f"{row['campaign']}: {row['why']}"
    lines = [f"{head}; {done}{missed}{failed}"]
    for fire in row["failed"][:FAILED_SHOWN]:  # what failed and what to do, newest first
        at = _local(fire["scheduled_utc"], tz) or "-"
        lines.append(f"  run {fire['number']} ({fire['status']}, scheduled {at}): {fire['note']}")
    return "\n".join(lines)


def _local(iso: str | None, tz: tzinfo) -> str | None:
    """An ISO time from the overview as staff read it (the configured zone, to the minute)."""
    from ..report import local_time

    return local_time(datetime.fromisoformat(iso), tz) if iso else None


def register(main: click.Group) -> None:
    for command in (run, schedule):
        main.add_command(command)
