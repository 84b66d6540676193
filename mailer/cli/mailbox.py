"""CLI: mailbox import|fetch (returned mail) and bounces list."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from .base import Ctx, error_line, pass_ctx, user_errors


@click.group("mailbox")
def mailbox_group() -> None:
    """Returned mail: bounces, complaints, unsubscribes by mail."""


@mailbox_group.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@pass_ctx
@user_errors
def mailbox_import(ctx: Ctx, paths: tuple[Path, ...]) -> None:
    """Read maildirs (cur/ and new/) and mbox files; reading a mail again changes nothing."""
    from ..mailbox import import_paths

    summary = import_paths(ctx.store(), ctx.settings, paths)
    _finish(summary)


@mailbox_group.command("fetch")
@pass_ctx
@user_errors
def mailbox_fetch(ctx: Ctx) -> None:
    """Read the new mails of the configured IMAP folder (config 'mailbox:')."""
    from ..mailbox import fetch

    summary = asyncio.run(fetch(ctx.store(), ctx.settings))
    _finish(summary)


def _finish(summary: Any) -> None:
    for problem in summary.problems:
        error_line(problem)
    click.echo(summary.line())


@click.group("bounces")
def bounces_group() -> None:
    """What came back: bounces, complaints, unsubscribes by mail, replies."""


@bounces_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--kind", "kinds", multiple=True,
              type=click.Choice(["hard_bounce", "soft_bounce", "complaint", "unsubscribe",
                                 "auto_reply", "reply", "report"]),
              help="only these kinds (repeatable)")
@pass_ctx
@user_errors
def bounces_list(ctx: Ctx, as_json: bool, limit: int, kinds: tuple[str, ...]) -> None:
    """The most recent returned mails, newest first, with what was done and why."""
    from ..report import local_iso, local_time
    from ..store import queries as q

    settings = ctx.settings
    with ctx.store().engine.connect() as conn:
        rows = q.recent_returned(conn, limit=limit, kinds=kinds)
    if as_json:
        for row in rows:
            row["received_at"] = local_iso(row["received_at"], settings.tz)
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for r in rows:
        who = r["email"] or "-"
        campaign = r["campaign_id"] or "-"
        click.echo(f"{local_time(r['received_at'], settings.tz)}  {r['kind']:<11}  "
                   f"{r['action'] or '-':<12}  {who}  {campaign}  {r['detail']}")
    click.echo(f"{len(rows)} returned mails shown", err=True)


def register(main: click.Group) -> None:
    for command in (mailbox_group, bounces_group):
        main.add_command(command)
