"""The `mailer` command: thin; parses, calls a stage, prints."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import click

from ..errors import UserError
from ..logs import ENV as LOG_FORMAT_ENV
from ..logs import FORMATS
from .base import Ctx, fail, pass_ctx, user_errors


@click.group()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="config file (default: $MAILER_CONFIG, else ./config.yaml)")
@click.option("--log-format", "log_format", type=click.Choice(FORMATS), default="text",
              envvar=LOG_FORMAT_ENV, show_envvar=True,
              help="log lines on stderr as text or as JSON objects, one per line (run, serve)")
@click.version_option(package_name="imag-mailer")
@click.pass_context
def main(ctx: click.Context, config: str | None, log_format: str) -> None:
    """imag-mailer: campaigns from YAML to subscribers' inboxes."""
    if ctx.invoked_subcommand != "send":  # send: once its campaign is checked
        gc.enable()  # off while the command started (mailer/entry.py)
    setup_logging(log_format)
    ctx.obj = Ctx(config)


def setup_logging(fmt: str = "text") -> None:
    """Lines on stderr (mailer/logs.py), at MAILER_LOG_LEVEL (default INFO)."""
    import os

    from ..logs import setup

    setup(fmt, os.environ.get("MAILER_LOG_LEVEL", "INFO").upper())


@main.command()
@click.argument("campaigns", nargs=-1)
@pass_ctx
@user_errors
def validate(ctx: Ctx, campaigns: tuple[str, ...]) -> None:
    """Check campaign files (all of campaigns/ when none given)."""
    import logging

    from ..campaign import CampaignProblems, campaign_files, find_campaign
    from ..checks import check_campaign

    log = logging.getLogger("mailer.cli")
    settings = ctx.settings
    targets: list[str | Path] = [*campaigns] or [*campaign_files(settings)]
    if not targets:
        fail(f"no campaign files in {settings.campaigns_dir}")
    problems = 0
    for target in targets:  # one broken file is reported; the others are still checked
        try:
            path = find_campaign(target, settings) if isinstance(target, str) else target
            checked = check_campaign(path, settings)
        except UserError as exc:  # every problem of the file, in line order
            problems += 1
            for each in exc.problems if isinstance(exc, CampaignProblems) else [exc]:
                click.echo(f"error: {each.sentence()}", err=True)
            continue
        except Exception as exc:  # a bug further down: report it, then check the other files
            problems += 1
            log.debug("checking %s crashed", target, exc_info=True)  # MAILER_LOG_LEVEL=DEBUG
            detail = " ".join(str(exc).split())[:300]
            click.echo(f"error: {target}: could not be checked ({type(exc).__name__}: "
                       f"{detail}); please report this", err=True)
            continue
        for warning in checked.warnings:
            click.echo(f"warning: {warning}", err=True)
        c = checked.campaign
        managed = [n for n in c.audience.lists if n in settings.web.subscribe_lists]
        extra = f" + the subscribers of {', '.join(managed)}" if managed else ""
        click.echo(f"ok: {path} — {c.id}, {', '.join(c.languages)}, "
                   f"{len(checked.recipients)} recipients from list files{extra}")
    if problems:
        click.echo(f"{problems} of {len(targets)} campaign files have problems", err=True)
        sys.exit(1)


@main.command()
@pass_ctx
@user_errors
def schema(ctx: Ctx) -> None:
    """Print the JSON Schema of a campaign file (for editor completion and hover help)."""
    from ..campaign import json_schema, template_names

    schema = json_schema(template_names(ctx.settings))
    click.echo(json.dumps(schema, indent=2, ensure_ascii=False))


@main.command()
@click.argument("campaign")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="the folder to write to (needed unless --watch)")
@click.option("--lang", "langs", multiple=True, help="only this language (repeatable)")
@click.option("--recipient", "recipient", default=None, help="personalise for this address")
@click.option("--png", is_flag=True, help="also screenshots at 600 and 375 px (chromium)")
@click.option("--watch", is_flag=True,
              help="serve a live preview on 127.0.0.1 that follows every save")
@click.option("--port", "port", type=click.IntRange(0, 65535), default=None,
              help="with --watch: the port (default 8025, else a free one; 0: any free one)")
@pass_ctx
@user_errors
def preview(ctx: Ctx, campaign: str, out: str | None, langs: tuple[str, ...],
            recipient: str | None, png: bool, watch: bool, port: int | None) -> None:
    """Write .html, .txt and .eml per language: exactly what subscribers get.

    With --watch, show them in the browser instead, rendered again on every save.
    """
    if watch:
        if out is not None or png:
            raise click.UsageError("--watch shows the preview in the browser: leave out "
                                   "--out and --png")
        from ..watch import run_watch

        run_watch(ctx.settings, campaign, port=port, langs=list(langs), recipient=recipient,
                  echo=click.echo)
        return
    if out is None:
        raise click.UsageError("--out DIR is needed (or --watch for a live preview)")
    if port is not None:
        raise click.UsageError("--port goes with --watch")
    from ..preview import write_preview

    for path in write_preview(ctx.settings, campaign, Path(out), langs=list(langs),
                              recipient=recipient, png=png):
        click.echo(str(path))


def _register() -> None:
    from . import mailbox, ops, run, send, status, web

    ops.register(main)
    send.register(main)
    run.register(main)
    web.register(main)
    status.register(main)
    mailbox.register(main)


_register()
