"""`mailer doctor`: is this configuration fit to send for real? And the DNS records to publish.

Each check is a `Finding`: ok, warn (worth a look) or fail (would hurt: mail that lands in spam
or nowhere, links that lead nowhere, a footer the law does not accept, a database that is not
there). `doctor` exits 1 when any check fails. It writes nothing: no database is created or
migrated, no mail is sent (the relay check connects, says EHLO, STARTTLS, logs in and QUITs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from .config import Settings, weak_secret
from .dkimkeys import DkimRecord, parse_tags, record_for, zone_line
from .errors import UserError
from .links import link_problem
from .redact import redact_addresses

Level = Literal["ok", "warn", "fail"]
DNS_TIMEOUT_S = 5.0
RELAY_TIMEOUT_S = 15.0
# Public suffixes of two labels that the organisations of this network meet (no full list:
# a wrong guess only makes two related domains look unrelated, which doctor then says).
_TWO_LABEL_SUFFIXES = {"co.uk", "org.uk", "ac.uk", "gov.uk", "co.at", "or.at", "gv.at",
                       "com.tr", "org.tr", "gen.tr", "com.pl", "org.pl", "com.ua", "org.ua",
                       "com.au", "org.au", "co.jp", "or.jp"}
_UTC_ZONES = {"UTC", "GMT", "UCT", "Zulu", "Universal", "Greenwich"}


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    text: str


@dataclass(frozen=True)
class Record:
    what: str
    name: str
    value: str
    note: str

    def zone_line(self) -> str:
        return zone_line(self.name, self.value) if self.name else ""


class DnsFailure(Exception):
    pass


class Dns:
    """TXT look-ups through the system's resolver, or the server named by --nameserver (e.g.
    the domain's authoritative server, to check records before they have propagated)."""

    def __init__(self, nameserver: str | None = None, *, timeout_s: float = DNS_TIMEOUT_S
                 ) -> None:
        import dns.resolver

        self.where = nameserver or "the system resolver"
        try:
            self._resolver = dns.resolver.Resolver(configure=nameserver is None)
        except dns.resolver.NoResolverConfiguration:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = ["127.0.0.1"]
        if nameserver:
            host, port = parse_hostport(nameserver, default_port=53)
            try:
                addresses = [str(socket.getaddrinfo(host, port)[0][4][0])]
            except OSError:
                raise UserError(f"--nameserver {nameserver}: no such host") from None
            self._resolver.nameservers = addresses
            self._resolver.port = port
        self._resolver.lifetime = timeout_s

    def txt(self, name: str) -> list[str]:
        """The TXT strings at `name` (each record's strings joined); [] when there are none."""
        import dns.exception
        import dns.resolver

        try:
            answer = self._resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"cannot look up {name} at {self.where} "
                             f"({type(exc).__name__})") from None
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


def parse_hostport(text: str, *, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address."""
    host, port = text.strip(), default_port
    if host.startswith("["):
        inside, _, rest = host[1:].partition("]")
        host = inside
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif host.count(":") == 1:
        host, _, raw = host.partition(":")
        port = _port(raw, text)
    if not host:
        raise UserError(f"--nameserver '{text}' names no host: use HOST or HOST:PORT")
    return host, port


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UserError(f"--nameserver '{text}': the port must be a number from 1 to 65535")
    return int(raw)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")


def org_domain(domain: str) -> str:
    """The registered domain, approximately: the last two labels (three under a known
    two-label public suffix)."""
    labels = domain.lower().rstrip(".").split(".")
    keep = 3 if ".".join(labels[-2:]) in _TWO_LABEL_SUFFIXES else 2
    return ".".join(labels[-keep:])


def reserved(domain: str) -> bool:
    labels = domain.lower().rstrip(".").split(".")
    return "example" in labels[-2:] or labels[-1] in {"test", "invalid", "localhost", "local"}


def list_id_domain(list_id: str) -> str:
    inside = list_id.rpartition("<")[2].partition(">")[0] if "<" in list_id else list_id
    return inside.strip().lower()


# --- the checks -------------------------------------------------------------------------------


def check_base_url(settings: Settings) -> list[Finding]:
    problem = link_problem(settings.base_url)
    if problem:
        return [Finding("base URL", "fail",
                        f"base_url (MAILER_BASE_URL) is {settings.base_url}, {problem}: "
                        "unsubscribe and confirmation links would lead nowhere; set the public "
                        "https address of `mailer serve`")]
    found = [Finding("base URL", "ok", f"{settings.base_url} is public https")]
    if not settings.web.trusted_proxies:
        found.append(Finding("base URL", "warn",
                             "web.trusted_proxies is empty: behind the TLS proxy every visitor "
                             "shares one rate limit and the consent log records the proxy's "
                             "address; set it to the proxy's address (e.g. 127.0.0.1)"))
    return found


def check_secrets(settings: Settings, env: Mapping[str, str]) -> list[Finding]:
    found = []
    if settings.secret_key:
        found.append(Finding("secret key", "ok", "MAILER_SECRET_KEY comes from the environment"))
    else:
        found.append(Finding(
            "secret key", "fail",
            f"MAILER_SECRET_KEY is not set, so links are signed with {settings.var_dir}/"
            "secret.key, which another machine does not have and a lost disk takes with it; "
            "put MAILER_SECRET_KEY in the service's environment file"))
    token = env.get("MAILER_METRICS_TOKEN")
    if token:
        problem = weak_secret(token)
        if problem:
            found.append(Finding("metrics token", "fail",
                                 f"MAILER_METRICS_TOKEN {problem}: make one with python3 -c "
                                 "'import secrets; print(secrets.token_urlsafe(48))'"))
        else:
            found.append(Finding("metrics token", "ok",
                                 "/metrics is served to requests with the bearer token"))
    return found


async def check_relay(settings: Settings) -> list[Finding]:
    """Connect to the relay, EHLO, TLS with the certificate verified, AUTH if configured."""
    import aiosmtplib

    smtp = settings.smtp
    if smtp.embedded:
        return [Finding("relay", "fail",
                        "smtp.host is 'embedded': mails go to the capture server's maildir "
                        f"{settings.outbox_dir}/, not to anyone; set MAILER_SMTP_HOST (and "
                        "_PORT, _TLS, _USERNAME, _PASSWORD) to your relay")]
    port = smtp.port or (465 if smtp.tls == "tls" else 25)
    where = f"{smtp.host}:{port}"
    if smtp.username and not smtp.password:
        return [Finding("relay", "fail", "smtp.username is set but MAILER_SMTP_PASSWORD is "
                                         "not: put it in the service's environment file")]
    helo = smtp.helo or await asyncio.to_thread(socket.getfqdn)
    context = ssl.create_default_context()  # the system's CAs; host name checked
    client = aiosmtplib.SMTP(hostname=smtp.host, port=port, timeout=RELAY_TIMEOUT_S,
                             use_tls=smtp.tls == "tls", start_tls=False, tls_context=context,
                             local_hostname=helo)
    step = "connect"
    try:
        await client.connect()
        step = "EHLO"
        await client.ehlo()
        if smtp.tls != "tls":
            if not client.supports_extension("starttls"):
                return [Finding("relay", "fail",
                                f"the relay {where} offers no STARTTLS, so mail (and any "
                                "password) would cross the network unencrypted; use its TLS "
                                "port (smtp.tls: tls, port 465) or a relay that offers "
                                "STARTTLS")]
            step = "STARTTLS"
            await client.starttls(tls_context=context)
            await client.ehlo()
        ssl_object = client.transport.get_extra_info("ssl_object") if client.transport else None
        version = ssl_object.version() if ssl_object is not None else "TLS"
        text = f"{where}: {version}, certificate verified for {smtp.host}"
        if smtp.username:
            step = "AUTH"
            if not client.supports_extension("auth"):
                return [Finding("relay", "fail", f"the relay {where} offers no AUTH, so "
                                                 "smtp.username cannot log in")]
            await client.login(smtp.username, smtp.password or "")
            text += ", login accepted"
        return [Finding("relay", "ok", text)]
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
        detail = redact_addresses(" ".join(str(exc).split()))[:200] or type(exc).__name__
        if "CERTIFICATE" in detail.upper():
            hint = ("the relay's certificate does not verify: name the relay by the host name "
                    "its certificate is for (MAILER_SMTP_HOST), or ask its provider")
        elif step == "AUTH":
            hint = "the login was refused: check MAILER_SMTP_USERNAME and MAILER_SMTP_PASSWORD"
        elif step == "connect":
            hint = "check MAILER_SMTP_HOST, MAILER_SMTP_PORT and MAILER_SMTP_TLS"
        else:
            hint = "check MAILER_SMTP_TLS against what the relay offers"
        return [Finding("relay", "fail", f"{step} with {where} failed ({detail}): {hint}")]
    finally:
        if client.is_connected:
            try:
                await client.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


def check_dkim(settings: Settings, dns: Dns | None) -> tuple[list[Finding], DkimRecord | None]:
    cfg = settings.smtp.dkim
    if cfg is None:
        domain = domain_of(settings.sender.address)
        return [Finding("DKIM", "fail",
                        "smtp.dkim is not set, so mails go out unsigned and the big providers "
                        "file bulk mail without DKIM as spam; make a key with 'mailer dkim keygen "
                        f"--selector imag1 --domain {domain} --out /etc/imag-mailer/dkim.pem' "
                        "and set smtp.dkim: {selector, domain, key_file}")], None
    try:
        record = record_for(cfg.key_file, selector=cfg.selector, domain=cfg.domain)
    except UserError as exc:
        return [Finding("DKIM", "fail", exc.sentence())], None
    found = []
    if dns is None:
        found.append(Finding("DKIM", "warn", f"{record.name}: not looked up (--offline)"))
        return found, record
    try:
        published = dns.txt(record.name)
    except DnsFailure as exc:
        return [Finding("DKIM", "fail", f"{exc}: publish the DKIM record below")], record
    keys = [parse_tags(txt).get("p") for txt in published if "p=" in txt]
    if not keys:
        found.append(Finding("DKIM", "fail", f"no DKIM record at {record.name}: publish the "
                                             "record below"))
    elif record.public_key in keys:
        found.append(Finding("DKIM", "ok", f"{record.name} publishes the key in "
                                           f"{cfg.key_file}"))
    elif keys == [""]:
        found.append(Finding("DKIM", "fail", f"the record at {record.name} revokes its key "
                                             "(empty p=): publish the record below"))
    else:
        found.append(Finding("DKIM", "fail",
                             f"the record at {record.name} holds another key than "
                             f"{cfg.key_file}: mails would fail DKIM; publish the record below "
                             "or point smtp.dkim.key_file at the matching key"))
    return found, record


def check_domains(settings: Settings) -> list[Finding]:
    """From, Reply-To, List-Id, the unsubscribe mailto, Message-IDs, the envelope sender (where
    bounces go) and DKIM's d= all in one organisation's domain (DMARC alignment)."""
    base = domain_of(settings.sender.address)
    fields = {
        "sender.address (From, envelope sender for bounces)": base,
        "sender.reply_to": domain_of(settings.sender.reply_to or settings.sender.address),
        "list_id": list_id_domain(settings.list_id),
        "unsubscribe_mailto": domain_of(settings.unsubscribe_mailto),
        "message_id_domain": settings.msgid_domain.lower(),
    }
    if settings.smtp.dkim is not None:
        fields["smtp.dkim.domain"] = settings.smtp.dkim.domain.lower().rstrip(".")
    reserved_at: dict[str, list[str]] = {}
    foreign_at: dict[str, list[str]] = {}
    for name, domain in fields.items():
        if reserved(domain):
            reserved_at.setdefault(domain, []).append(name)
        elif org_domain(domain) != org_domain(base):
            foreign_at.setdefault(domain, []).append(name)
    problems = []
    if reserved_at:
        problems.append(_at(reserved_at) + ": reserved domains nobody receives mail at")
    if foreign_at:
        problems.append(_at(foreign_at) + f": outside {org_domain(base)}, the sender's domain")
    if problems:
        return [Finding("domains", "fail",
                        "; ".join(problems) + ": use addresses and names of your own domain, "
                        "so that DMARC aligns and replies and unsubscribes reach you")]
    return [Finding("domains", "ok",
                    f"sender, reply-to, list-id, unsubscribe, Message-ID and DKIM domains are "
                    f"all in {org_domain(base)}")]


def _at(fields_by_domain: dict[str, list[str]]) -> str:
    return "; ".join(f"{', '.join(names)} at {domain}"
                     for domain, names in fields_by_domain.items())


def check_impressum(settings: Settings) -> list[Finding]:
    """§ 5 DDG and § 18 MStV: who sends, where they are, how to reach them, who is responsible."""
    from email_validator import EmailNotValidError, validate_email

    org = settings.organisation
    problems = []
    for name in ("name", "body", "street", "postcode", "city", "email", "responsible"):
        value = getattr(org, name)
        if not value or not str(value).strip():
            problems.append(f"organisation.{name} is empty")
    if org.email:
        try:
            validate_email(org.email, check_deliverability=False)
        except EmailNotValidError:
            problems.append(f"organisation.email '{org.email}' is not an address")
        else:
            if reserved(domain_of(org.email)):
                problems.append(f"organisation.email is at the reserved domain "
                                f"{domain_of(org.email)}")
    if org.website:
        problem = link_problem(org.website)
        if problem:
            problems.append(f"organisation.website {org.website} is {problem}")
    if org.postcode and not org.postcode.strip().isdigit():
        problems.append(f"organisation.postcode '{org.postcode}' is not a postcode")
    if problems:
        return [Finding("Impressum", "fail", "; ".join(problems) + ": every mail's footer must "
                        "say who sends it and how to reach them (§ 5 DDG, § 18 MStV)")]
    return [Finding("Impressum", "ok", f"{org.name}, {org.street}, {org.postcode} {org.city}, "
                                       f"{org.email}, responsible: {org.responsible}")]


def check_database(settings: Settings) -> list[Finding]:
    """Reachable and at the newest migration; nothing is created or migrated here."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    from .store.db import MIGRATIONS, _redact

    url = settings.database_url
    shown = _redact(url)
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url.split("///", 1)[1])
        if not path.exists():
            return [Finding("database", "fail", f"there is no database at {path} yet: run "
                                                "'mailer db upgrade' as the service's user")]
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    heads = set(script.get_heads())
    known = {rev.revision for rev in script.walk_revisions()}
    args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args=args)
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
        engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
        return [Finding("database", "fail", f"cannot open {shown} ({detail}): check "
                                            "database_url / MAILER_DATABASE_URL")]
    if current == heads:
        return [Finding("database", "ok", f"{shown} answers and is at migration "
                                          f"{', '.join(sorted(heads))}")]
    if current <= known:
        return [Finding("database", "fail",
                        f"{shown} is at migration {', '.join(sorted(current)) or 'none'}, not "
                        f"{', '.join(sorted(heads))}: run 'mailer db upgrade' (back it up first)")]
    return [Finding("database", "fail",
                    f"{shown} is at migration {', '.join(sorted(current))}, which this version "
                    "does not know: it was upgraded by a newer mailer; install that version")]


def check_timezone(settings: Settings, now: datetime | None = None) -> list[Finding]:
    zone = ZoneInfo(settings.timezone)
    name = settings.timezone
    if name in _UTC_ZONES or name.startswith(("Etc/", "UTC")):
        return [Finding("time zone", "fail",
                        f"timezone is {name}: staff write schedules in wall time, so a campaign "
                        "for 09:00 would go out at 10:00 or 11:00 in Dortmund; set timezone to "
                        "where the staff are (Europe/Berlin)")]
    local = (now or datetime.now(zone)).astimezone(zone)
    found = [Finding("time zone", "ok", f"{name}: now {local:%Y-%m-%d %H:%M} "
                                        f"(UTC{local:%z}), schedules are read in it")]
    synced = _clock_synchronised()
    if synced is False:
        found.append(Finding("time zone", "warn",
                             "the system clock is not synchronised (timedatectl): enable "
                             "systemd-timesyncd or chrony so schedules fire on time"))
    return found


def _clock_synchronised() -> bool | None:
    if shutil.which("timedatectl") is None:
        return None
    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return None if out.returncode or value not in ("yes", "no") else value == "yes"


def check_published(settings: Settings, dns: Dns | None) -> list[Finding]:
    """SPF at the envelope sender's domain and DMARC at the From domain (or its parent)."""
    if dns is None:
        return [Finding("SPF, DMARC", "warn", "not looked up (--offline)")]
    domain = domain_of(settings.sender.address)
    if reserved(domain):
        return []  # the domains check has said it
    found = []
    try:
        spf = [t for t in dns.txt(domain) if t.lower().startswith("v=spf1")]
        if not spf:
            found.append(Finding("SPF", "fail", f"no SPF record at {domain}: publish the SPF "
                                                "record below"))
        elif len(spf) > 1:
            found.append(Finding("SPF", "fail", f"{domain} has {len(spf)} SPF records; "
                                                "receivers treat that as an error: merge them"))
        else:
            found.append(Finding("SPF", "ok", f"{domain}: {spf[0]}"))
        names = [f"_dmarc.{domain}"]
        if org_domain(domain) != domain:
            names.append(f"_dmarc.{org_domain(domain)}")
        for name in names:
            dmarc = [t for t in dns.txt(name) if t.lower().startswith("v=dmarc1")]
            if dmarc:
                found.append(Finding("DMARC", "ok", f"{name}: {dmarc[0]}"))
                break
        else:
            found.append(Finding("DMARC", "fail", f"no DMARC record at {names[0]}: publish the "
                                                  "DMARC record below"))
    except DnsFailure as exc:
        found.append(Finding("SPF, DMARC", "fail", str(exc)))
    return found


# --- the records ------------------------------------------------------------------------------


def records(settings: Settings, dkim: DkimRecord | None) -> list[Record]:
    domain = domain_of(settings.sender.address)
    out = []
    cfg = settings.smtp.dkim
    if dkim is not None and cfg is not None:
        out.append(Record("DKIM", dkim.name, dkim.value, f"the public half of {cfg.key_file}"))
    else:
        out.append(Record("DKIM", "", "", "'mailer dkim keygen' makes a key and prints its "
                                          "record; doctor prints it once smtp.dkim names it"))
    relay = settings.smtp.host
    if settings.smtp.embedded:
        mechanism = "mx"
    else:
        try:
            ip = ipaddress.ip_address(relay)
            mechanism = f"ip{ip.version}:{ip}"
        except ValueError:
            mechanism = f"a:{relay}"
    out.append(Record("SPF", domain, f"v=spf1 {mechanism} ~all",
                      "who may send for the envelope sender's domain; if your relay's provider "
                      "documents an include: use that instead, and keep one SPF record only"))
    rua = settings.organisation.email
    if not rua or org_domain(domain_of(rua)) != org_domain(domain):
        rua = f"postmaster@{domain}"
    out.append(Record("DMARC", f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:{rua}",
                      "p=none to start: read the reports sent to rua for a few weeks, then "
                      "move to p=quarantine"))
    return out


@dataclass
class Diagnosis:
    findings: list[Finding]
    records: list[Record]

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "fail"]


def diagnose(settings: Settings, *, env: Mapping[str, str] | None = None,
             nameserver: str | None = None, offline: bool = False) -> Diagnosis:
    env = os.environ if env is None else env
    dns = None if offline else Dns(nameserver)
    findings = check_base_url(settings) + check_secrets(settings, env)
    if offline:
        findings.append(Finding("relay", "warn", "not checked (--offline)"))
    else:
        findings += asyncio.run(check_relay(settings))
    dkim_findings, dkim = check_dkim(settings, dns)
    findings += dkim_findings
    findings += check_domains(settings)
    findings += check_published(settings, dns)
    findings += check_impressum(settings)
    findings += check_database(settings)
    findings += check_timezone(settings)
    return Diagnosis(findings, records(settings, dkim))
