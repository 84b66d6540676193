"""CLI: send, report, suppressions, db."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from typing import Any

import click

from .base import Ctx, fail, pass_ctx, user_errors


def _checked(ctx: Ctx, ref: str) -> Any:
    from ..campaign import find_campaign
    from ..checks import check_campaign

    # The audience is resolved (and its lists checked) once, when the run starts.
    checked = check_campaign(find_campaign(ref, ctx.settings), ctx.settings,
                             with_audience=False)
    for warning in checked.warnings:
        if "in the past" not in warning:
            click.echo(f"warning: {warning}", err=True)
    return checked


@click.command()
@click.argument("campaign")
@click.option("--dry-run", is_flag=True, help="everything but the SMTP dialogue; writes nothing")
@click.option("--to", "to", multiple=True, help="test send to this address only (repeatable)")
@click.option("--lang", "lang", default=None,
              help="with --to: the test mail in this language (default: the address's own "
                   "language on the lists, else the campaign's first)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="send at most N now")
@click.option("--again", is_flag=True, help="start a new occurrence of a campaign already sent")
@click.option("--resume", is_flag=True, help="continue the unfinished run (the default anyway)")
@click.option("--retry-failed", is_flag=True, help="give the failed rows of the last run a try")
@click.option("--workers", default=None, metavar="N|auto",
              help="processes that send (default: dispatch.workers, auto = one per core); "
                   "they share smtp.pool_size and the rate limits")
@pass_ctx
@user_errors
def send(ctx: Ctx, campaign: str, dry_run: bool, to: tuple[str, ...], lang: str | None,
         limit: int | None, again: bool, resume: bool, retry_failed: bool,
         workers: str | None) -> None:
    """Send a campaign now (resumes an unfinished run)."""
    from ..links import refuse_broken_links
    from ..sending import dry_run as do_dry_run
    from ..sending import plan_run, send_run, test_send

    settings = ctx.settings
    processes = _workers(settings, workers)
    if not dry_run:  # before anything is written: no run, no ledger rows, no SMTP session
        refuse_broken_links(settings)
    if lang and not to:
        fail("--lang chooses the language of a test send: use it with --to EMAIL")
    checked = _checked(ctx, campaign)
    # What start-up made (modules, settings, compiled templates) lives as long as the process:
    # no garbage collection needs to look at it again — in this process, nor in the workers
    # forked from it, whose first full collection would otherwise walk ~70,000 objects. The
    # collector was off while it was made (mailer/entry.py); from here on it runs.
    gc.freeze()
    gc.enable()
    if to:
        results = asyncio.run(test_send(checked, settings, list(to), lang=lang))
        for address, sent, reply in results:
            click.echo(f"test mail to {address}: {'sent' if sent else 'failed'} ({reply})")
        _where(settings)
        failed = sum(not sent for _, sent, _ in results)
        if failed:
            everyone = "all " if failed == len(results) else ""
            of = "" if everyone else f" of {len(results)}"
            click.echo(f"{everyone}{failed}{of} test mails failed")
        sys.exit(exit_code(sent=len(results) - failed, failed=failed))
    store = ctx.store()
    if dry_run:
        count, size = do_dry_run(checked, settings, store)
        click.echo(f"dry run: {count} messages would be sent "
                   f"({size / max(count, 1) / 1024:.1f} KiB each on average); nothing written")
        return
    plan = plan_run(checked, settings, store, again=again, retry_failed=retry_failed)
    click.echo(plan.message)
    if plan.run is None:
        return
    result = send_run(settings, store, checked, plan.run, limit=limit, workers=processes)
    c = result.counts
    click.echo(f"run {plan.number} of {result.run.campaign_id}: {c['sent']} sent, "
               f"{c['failed']} failed, {c['pending'] + c['sending']} left")
    if result.recovered:
        click.echo(f"{result.recovered} messages were in flight when the previous process "
                   "stopped; they were sent again (some may arrive twice)")
    _where(settings)
    if result.stopped:
        click.echo(f"stopped before the end; continue with: mailer send {campaign}")
    if c["failed"]:
        everyone = "all " if c["sent"] == 0 else ""
        of = "" if everyone else f" of {c['sent'] + c['failed']}"
        click.echo(f"{everyone}{c['failed']}{of} messages failed: see who and why with: "
                   f"mailer report {campaign} --failed")
    if result.stopped and limit is None:
        sys.exit(130)  # interrupted (Ctrl-C / SIGTERM): not done, but nothing lost
    sys.exit(exit_code(sent=c["sent"], failed=c["failed"]))


def _workers(settings: Any, given: str | None) -> int:
    """--workers N|auto, else dispatch.workers: the number of sending processes."""
    from pydantic import ValidationError

    from ..config import DispatchSettings

    here = settings.smtp.on_this_machine
    if given is None:
        return int(settings.dispatch.count(settings.smtp.pool_size, relay_here=here))
    try:
        chosen = DispatchSettings(workers=given if given == "auto" else int(given))
    except (ValueError, ValidationError):
        fail(f"--workers {given}: give a number from 1 to 64, or auto (one per core)")
    return int(chosen.count(settings.smtp.pool_size, relay_here=here))


SOME_FAILED = 3  # 1 is a user error (bad input), 2 a usage error (click), 130 an interrupt
ALL_FAILED = 4


def exit_code(*, sent: int, failed: int) -> int:
    """`mailer send`: 0 when nothing failed, 3 when some messages failed, 4 when all did."""
    if not failed:
        return 0
    return ALL_FAILED if not sent else SOME_FAILED


def _where(settings: Any) -> None:
    if settings.smtp.embedded:
        click.echo(f"messages are in the maildir {settings.outbox_dir}/new/")


@click.command()
@click.argument("campaign")
@click.option("--json", "as_json", is_flag=True)
@click.option("--failed", is_flag=True, help="list the failed recipients with code and reason")
@pass_ctx
@user_errors
def report(ctx: Ctx, campaign: str, as_json: bool, failed: bool) -> None:
    """Counts per status for the campaign's runs."""
    from ..campaign import find_campaign, load_campaign
    from ..report import build_report, print_report

    settings = ctx.settings
    path = find_campaign(campaign, settings)
    campaign_id = load_campaign(path, settings).id if path.exists() else campaign
    data = build_report(ctx.store(), campaign_id, settings=settings, failed=failed)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    else:
        print_report(data, tz=settings.tz)


@click.group()
def suppressions() -> None:
    """The global suppression list."""


@suppressions.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@user_errors
def suppressions_list(ctx: Ctx, as_json: bool) -> None:
    from ..store import queries as q

    with ctx.store().engine.connect() as conn:
        rows = q.list_suppressions(conn)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    for r in rows:
        when = r["created_at"]
        click.echo(f"{r['email_key']}\t{r['list_name']}\t{r['reason']}\t{when:%Y-%m-%d %H:%M}"
                   f"\t{r['detail']}")
    click.echo(f"{len(rows)} suppressed", err=True)


@suppressions.command("add")
@click.argument("emails", nargs=-1, required=True)
@click.option("--reason", default="manual")
@click.option("--list", "list_name", default="*", help="only for this list (default: all)")
@pass_ctx
@user_errors
def suppressions_add(ctx: Ctx, emails: tuple[str, ...], reason: str, list_name: str) -> None:
    from ..audience import email_key, normalise_address
    from ..store import queries as q

    keys = []
    for raw in emails:
        try:
            keys.append(email_key(normalise_address(raw)))
        except ValueError as exc:
            fail(f"'{raw}' is not a valid address ({exc})")
    with ctx.store().engine.begin() as conn:
        added = sum(q.suppress(conn, k, reason=reason, source="cli", list_name=list_name)
                    for k in keys)
    click.echo(f"{added} added, {len(keys) - added} were already suppressed")


@suppressions.command("remove")
@click.argument("emails", nargs=-1, required=True)
@pass_ctx
@user_errors
def suppressions_remove(ctx: Ctx, emails: tuple[str, ...]) -> None:
    from ..audience import email_key
    from ..store import queries as q

    with ctx.store().engine.begin() as conn:
        removed = sum(q.unsuppress(conn, email_key(e)) for e in emails)
    click.echo(f"{removed} removed")
    if removed == 0:
        sys.exit(1)


@click.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@pass_ctx
@user_errors
def db_upgrade(ctx: Ctx) -> None:
    """Apply migrations (also done automatically on first use)."""
    ctx.store()
    click.echo("database is up to date")


def register(main: click.Group) -> None:
    for command in (send, report, suppressions, db):
        main.add_command(command)
