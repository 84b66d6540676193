"""CLI: `mailer serve` and `mailer subscribers import|export|show|forget`."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import json
import logging
import socket
from pathlib import Path
from typing import Any

import click

from .base import Ctx, fail, pass_ctx, user_errors


@click.command()
@click.option("--host", default=None, help="address to listen on (default: web.host)")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="port (default: web.port)")
@pass_ctx
@user_errors
def serve(ctx: Ctx, host: str | None, port: int | None) -> None:
    """Run the subscriber web app (subscribe, confirm, unsubscribe, preferences)."""
    import uvicorn

    from ..links import refuse_broken_links
    from ..logs import json_enabled
    from ..web import create_app
    from ..web.server import uvicorn_config

    settings = ctx.settings
    refuse_broken_links(settings)  # confirmation mails carry links under base_url
    app = create_app(settings)
    host = host or settings.web.host
    port = port or settings.web.port
    sock = listen(host, port)  # before the banner: a busy port is one sentence, not a claim
    line = f"serving on http://{host}:{port}/subscribe (links in mails use {settings.base_url})"
    if json_enabled():  # stdout too stays one JSON object per line
        logging.getLogger("mailer.web").info(line)
    else:
        click.echo(line)
    # The client's address comes from the app (X-Forwarded-For only from web.trusted_proxies),
    # not from uvicorn's proxy_headers, which believes 127.0.0.1 by default. Access lines show
    # paths without tokens; repeated lines are throttled.
    uvicorn.Server(uvicorn_config(app, settings, host=host, port=port,
                                  json_logs=json_enabled())).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound (uvicorn listens on it), or exit 1 with the reason."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        fail(f"cannot listen on {host}: {exc.strerror}; set web.host / --host")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is already in use: stop the other program or set "
                 "web.port / --port")
        hint = " (ports below 1024 need root)" if exc.errno == errno.EACCES else ""
        fail(f"cannot listen on port {port} on {host} ({exc.strerror}){hint}: set web.port "
             "/ --port")
    sock.set_inheritable(True)
    return sock


@click.group()
def subscribers() -> None:
    """Subscribers of the managed lists and their consent."""


def _managed(ctx: Ctx, list_name: str) -> None:
    if list_name not in ctx.settings.web.subscribe_lists:
        fail(f"'{list_name}' is not a managed list: add it to web.subscribe_lists in the config "
             f"(managed lists: {', '.join(ctx.settings.web.subscribe_lists)})")


@subscribers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--list", "list_name", required=True, help="the managed list to add them to")
@click.option("--consent-source", default=None,
              help="where they agreed (kept as proof); without it they stay unconfirmed")
@click.option("--send-confirmation", is_flag=True,
              help="mail the unconfirmed a link to confirm (double opt-in)")
@pass_ctx
@user_errors
def subscribers_import(ctx: Ctx, file: str, list_name: str, consent_source: str | None,
                       send_confirmation: bool) -> None:
    """Add the addresses of a CSV/YAML file (as in lists/) to a managed list."""
    from .. import subscribers as subs
    from ..audience import load_list

    _managed(ctx, list_name)
    if send_confirmation:
        from ..links import refuse_broken_links

        refuse_broken_links(ctx.settings)
    if consent_source is not None and (not consent_source.strip() or len(consent_source) > 500):
        fail("--consent-source must say where they agreed, in at most 500 characters")
    people = load_list(Path(file))  # validates the whole file before anything is written
    with ctx.store().engine.begin() as conn:
        result = subs.import_members(conn, people, list_name=list_name,
                                     consent_source=consent_source,
                                     send_confirmation=send_confirmation)
    state = "subscribed" if consent_source else "pending (no proof of consent)"
    click.echo(f"{len(result.added)} added as {state}, {len(result.already)} already subscribed, "
               f"{len(result.skipped)} skipped")
    for address, why in result.skipped:
        click.echo(f"skipped {address}: {why}", err=True)
    if result.to_confirm:
        sent = asyncio.run(_send_confirmations(ctx, result.to_confirm, list_name))
        click.echo(f"{sent} of {len(result.to_confirm)} confirmation mails sent")
    elif not consent_source and result.added:
        click.echo("they get no mail until they confirm: use --send-confirmation to ask them")


async def _send_confirmations(ctx: Ctx, people: list[Any], list_name: str) -> int:
    from ..relay import open_transport
    from ..tokens import Tokens
    from ..transport import Outcome
    from ..web.mails import send_confirmation

    settings = ctx.settings
    tokens = Tokens(settings.secret())
    sent = 0
    async with open_transport(settings) as transport:
        for recipient, nonce in people:
            result = await send_confirmation(
                transport, settings, tokens, email=recipient.email, name=recipient.name,
                language=recipient.language or "de", lists=[list_name], nonce=nonce)
            sent += result.outcome == Outcome.SENT
            if result.outcome != Outcome.SENT:
                click.echo(f"not sent to {recipient.email}: {result.code} {result.text}", err=True)
    return sent


@subscribers.command("export")
@click.option("--list", "list_name", default=None, help="only this list")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv")
@pass_ctx
@user_errors
def subscribers_export(ctx: Ctx, list_name: str | None, fmt: str) -> None:
    """Print the members of the managed lists with their status."""
    from .. import subscribers as subs

    with ctx.store().engine.connect() as conn:
        rows = subs.export_members(conn, list_name=list_name)
    if fmt == "json":
        click.echo(json.dumps(rows, default=str, indent=2, ensure_ascii=False))
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["email", "name", "language", "list_name", "status",
                                             "proof", "updated_at"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
    click.echo(out.getvalue(), nl=False)


def spreadsheet_safe(value: object) -> object:
    """A cell starting with = + - @ (or tab, CR) would run as a formula in a spreadsheet (CSV
    injection, OWASP); `=cmd@example.org` is a valid address, so every field is checked."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@subscribers.command("show")
@click.argument("email")
@pass_ctx
@user_errors
def subscribers_show(ctx: Ctx, email: str) -> None:
    """Everything stored about an address (right of access), as JSON."""
    from .. import subscribers as subs

    with ctx.store().engine.connect() as conn:
        data = subs.show(conn, email)
    click.echo(json.dumps(data, default=str, indent=2, ensure_ascii=False))


@subscribers.command("forget")
@click.argument("email")
@click.option("--yes", is_flag=True, help="do not ask")
@pass_ctx
@user_errors
def subscribers_forget(ctx: Ctx, email: str, yes: bool) -> None:
    """Erase an address's personal data (right to erasure); a hashed suppression stays."""
    from .. import subscribers as subs

    if not yes:
        click.confirm(f"Erase everything about {email}?", abort=True)
    with ctx.store().engine.begin() as conn:
        counts = subs.forget(conn, email=email)
    click.echo("erased: " + ", ".join(f"{n} {what}" for what, n in counts.items())
               + "; a hashed suppression keeps the address from being added again")


def register(main: click.Group) -> None:
    main.add_command(serve)
    main.add_command(subscribers)
