"""CLI: `mailer doctor` and `mailer dkim keygen` — getting ready to send for real."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .base import Ctx, pass_ctx, user_errors

MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


@click.command()
@click.option("--nameserver", default=None, metavar="HOST[:PORT]",
              help="ask this DNS server (e.g. your domain's own) instead of the system resolver")
@click.option("--offline", is_flag=True, help="skip what needs the network (DNS, the relay)")
@pass_ctx
@user_errors
def doctor(ctx: Ctx, nameserver: str | None, offline: bool) -> None:
    """Check the configuration for production; print the DNS records to publish."""
    from ..doctor import diagnose

    result = diagnose(ctx.settings, nameserver=nameserver, offline=offline)
    width = max(len(f.check) for f in result.findings)
    for f in result.findings:
        click.echo(f"{MARK[f.level]}  {f.check:<{width}}  {f.text}")
    click.echo("\nDNS records to publish (zone-file syntax):")
    for record in result.records:
        click.echo(f"\n; {record.what}: {record.note}")
        if record.name:
            click.echo(record.zone_line())
    failed = result.failed
    if failed:
        click.echo(f"\n{len(failed)} {'check fails' if len(failed) == 1 else 'checks fail'}: "
                   f"fix {'it' if len(failed) == 1 else 'them'} before sending for real "
                   "(README, 'Running it for real')", err=True)
        sys.exit(1)
    click.echo("\nready to send for real")


@click.group()
def dkim() -> None:
    """DKIM signing keys."""


@dkim.command("keygen")
@click.option("--selector", required=True, help="the DNS label the key is published under")
@click.option("--domain", required=True, help="the signing domain (d=), sender.address's")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="the private key file to write (mode 600)")
@click.option("--force", is_flag=True, help="replace an existing key file")
@user_errors
def dkim_keygen(selector: str, domain: str, out: Path, force: bool) -> None:
    """Make a 2048-bit RSA key and print the TXT record to publish."""
    from ..dkimkeys import generate

    record = generate(out, selector=selector, domain=domain, force=force)
    click.echo(f"wrote {out} (RSA 2048, mode 600); publish this TXT record:\n")
    click.echo(record.zone_line())
    click.echo(f"\nname:  {record.name}\nvalue: {record.value}\n")
    click.echo("then sign with it in config.yaml:\n\nsmtp:\n  dkim:\n"
               f"    selector: {record.selector}\n    domain: {record.domain}\n"
               f"    key_file: {out.resolve()}\n\nand check with: mailer doctor")


def register(main: click.Group) -> None:
    main.add_command(doctor)
    main.add_command(dkim)
