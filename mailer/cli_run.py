"""CLI: run (the scheduler) and schedule (what it will do)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_base import Ctx, pass_ctx, user_errors

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
    from .links import refuse_broken_links
    from .scheduler import serve
    from .sending import stop_on_signals

    settings = ctx.settings
    refuse_broken_links(settings)  # a real relay needs public https links; nothing written yet
    configure_logging()

    async def main() -> int:
        stop = asyncio.Event()
        with stop_on_signals(asyncio.get_running_loop(), stop):
            return await serve(settings, config_path(ctx), once=once, stop=stop)

    sys.exit(asyncio.run(main()))


@click.command("schedule")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@user_errors
def schedule(ctx: Ctx, as_json: bool) -> None:
    """Every scheduled campaign: next fire time, last run, missed occurrences."""
    from .scheduler import schedule_overview
    from .store import open_store

    settings = ctx.settings
    rows = schedule_overview(settings, open_store(settings.database_url))
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not [row for row in rows if not row.get("error")]:
        click.echo(f"no scheduled campaigns in {settings.campaigns_dir}")
    for row in rows:  # broken files on stderr, like `mailer validate` reports them
        click.echo(_line(row), err=bool(row.get("error")))


def _line(row: dict[str, Any]) -> str:
    if row.get("error"):
        kept = row.get("kept")
        if not kept:
            return f"error: {row['error']}"
        when = f"next {kept['next_local'][:16].replace('T', ' ')} local" if kept["next_local"] \
            else "no next fire"
        return (f"error: {row['error']} (mailer run keeps the last good schedule "
                f"of {kept['campaign']}: {kept['schedule']}; {when})")
    nxt = row["next_local"]
    when = "no next fire"
    if nxt:
        when = f"next {nxt[:16].replace('T', ' ')} local ({row['next_utc'][:16]}Z)"
    last = row["last_run"]
    done = (f"last run {last['id']} {last['status']} ({last['occurrence']}, {last['total']} "
            "recipients)" if last else "never run")
    missed = f", {len(row['missed'])} missed" if row["missed"] else ""
    failed = f", {len(row['failed'])} failed" if row["failed"] else ""
    lines = [f"{row['campaign']}: {row['schedule']}; {when}; {done}{missed}{failed}"]
    for fire in row["failed"][:FAILED_SHOWN]:  # what failed and what to do, newest first
        at = (fire["scheduled_utc"] or "")[:16]
        lines.append(f"  run {fire['run']} ({fire['status']}, scheduled {at}Z): {fire['note']}")
    return "\n".join(lines)


def register(main: click.Group) -> None:
    for command in (run, schedule):
        main.add_command(command)
