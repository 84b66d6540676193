"""`mailer doctor` against real parts: a relay with STARTTLS and AUTH (tests/smtpd.py, its
certificate trusted through SSL_CERT_FILE), a DNS server on loopback (tests/dnsd.py) holding
the records keygen printed, a migrated database. A production-ready setup passes; each way of
breaking it fails with exit 1 and a FAIL line naming what to fix."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailer.config import Settings
from tests.conftest import Project, both_databases
from tests.dnsd import DnsServer
from tests.helpers import mailer
from tests.smtpd import Faults, FaultServer, fault_server, make_tls_contexts  # noqa: F401

DOMAIN = "imag-dortmund.de"
LOGIN = ("imag", "relay-password-1234")
SPF = "v=spf1 ip4:127.0.0.1 ~all"
DMARC = f"v=DMARC1; p=none; rua=mailto:rgv@{DOMAIN}"


def mailer_sync(project: Project, *args: str, **env: str) -> tuple[int, str, str]:
    import subprocess

    full = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config), **env}
    done = subprocess.run([sys.executable, "-m", "mailer", *args], capture_output=True,
                          text=True, env=full, cwd=project.root, timeout=120)
    return done.returncode, done.stdout, done.stderr




def keygen(project: Project, out: Path, selector: str = "imag1") -> str:
    """`mailer dkim keygen`; returns the TXT value it printed."""
    code, text, err = mailer_sync(project, "dkim", "keygen", "--selector", selector,
                                  "--domain", DOMAIN, "--out", str(out))
    assert code == 0, err
    match = re.search(r"^value: (v=DKIM1; k=rsa; p=\S+)$", text, re.M)
    assert match, text
    return match.group(1)


def make_production(project: Project, key: Path) -> None:
    """The shipped config, made ready: public https links, own domains, DKIM, proxy."""
    text = project.config.read_text(encoding="utf-8")
    text = text.replace("base_url: http://127.0.0.1:8000", f"base_url: https://newsletter.{DOMAIN}")
    text = text.replace("imag.example.org", DOMAIN)
    text = text.replace("smtp:\n", f"smtp:\n  dkim: {{selector: imag1, domain: {DOMAIN}, "
                                   f"key_file: {key}}}\n", 1)
    text = text.replace("trusted_proxies: []", "trusted_proxies: [127.0.0.1]")
    project.config.write_text(text, encoding="utf-8")


@dataclass
class Setup:
    project: Project
    relay: FaultServer
    dns: DnsServer
    key: Path
    dkim_value: str
    env: dict[str, str] = field(default_factory=dict)

    async def doctor(self, *args: str, **env: str) -> tuple[int, str, str]:
        return await mailer(self.project, "doctor", "--nameserver", self.dns.address, *args,
                            **{**self.env, **env})


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
async def setup(project: Project, fault_server, dns: DnsServer,  # noqa: F811
                tmp_path: Path) -> Setup:
    server_tls, _ = make_tls_contexts(tmp_path)
    relay = await fault_server(Faults(auth=LOGIN), starttls=server_tls)
    key = tmp_path / "dkim.pem"
    value = keygen(project, key)
    make_production(project, key)
    dns.records.update({f"imag1._domainkey.{DOMAIN}": [value], DOMAIN: [SPF, "google-x=1"],
                        f"_dmarc.{DOMAIN}": [DMARC]})
    env = {"MAILER_SMTP_HOST": relay.host, "MAILER_SMTP_PORT": str(relay.port),
           "MAILER_SMTP_TLS": "starttls", "MAILER_SMTP_USERNAME": LOGIN[0],
           "MAILER_SMTP_PASSWORD": LOGIN[1], "SSL_CERT_FILE": str(tmp_path / "cert.pem")}
    code, _, err = await mailer(project, "db", "upgrade")
    assert code == 0, err
    return Setup(project, relay, dns, key, value, env)


def lines(out: str, level: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(level)]


@both_databases
async def test_a_production_setup_passes_and_gets_its_records(setup: Setup) -> None:
    code, out, err = await setup.doctor()
    assert code == 0, out + err
    assert "ready to send for real" in out
    assert lines(out, "FAIL") == []
    checks = {line.split()[1] for line in lines(out, "ok")}
    assert {"base", "secret", "relay", "DKIM", "domains", "SPF", "DMARC", "Impressum",
            "database", "time"} <= checks, out
    assert "certificate verified" in out and "login accepted" in out
    assert setup.relay.auth_attempts == 1 and setup.relay.messages == []  # logged in, sent nothing
    # The records to publish: DKIM from the key (the one keygen printed), SPF, DMARC.
    value = setup.dkim_value
    assert (f'imag1._domainkey.{DOMAIN}. 3600 IN TXT ( "{value[:255]}" "{value[255:]}" )'
            in out)
    assert f'{DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 ~all"' in out
    assert f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=none; rua=mailto:rgv@{DOMAIN}"' in out
    assert f"imag1._domainkey.{DOMAIN}" in setup.dns.queries  # really looked up


def _set_config(project: Project, old: str, new: str) -> None:
    text = project.config.read_text(encoding="utf-8")
    assert old in text
    project.config.write_text(text.replace(old, new, 1), encoding="utf-8")


async def _fails(setup: Setup, check: str, words: str, **env: str) -> None:
    code, out, err = await setup.doctor(**env)
    assert code == 1, out
    failed = lines(out, "FAIL")
    assert len(failed) == 1, out + err
    assert failed[0].split()[1] == check and words in failed[0], failed[0]
    assert "1 check fails" in err and "Traceback" not in err


async def test_base_url_must_be_public_https(setup: Setup) -> None:
    await _fails(setup, "base", "not https", MAILER_BASE_URL=f"http://newsletter.{DOMAIN}")
    await _fails(setup, "base", "private address", MAILER_BASE_URL="https://10.0.0.8")


async def test_secret_key_must_come_from_the_environment(setup: Setup) -> None:
    await _fails(setup, "secret", "MAILER_SECRET_KEY is not set", MAILER_SECRET_KEY="")
    await _fails(setup, "metrics", "fewer than the 32", MAILER_METRICS_TOKEN="short-token")


async def test_relay_needs_tls_with_a_verified_certificate_and_the_right_login(
        setup: Setup, fault_server) -> None:  # noqa: F811
    await _fails(setup, "relay", "certificate does not verify", SSL_CERT_FILE="/nonexistent")
    await _fails(setup, "relay", "login was refused", MAILER_SMTP_PASSWORD="wrong-password")
    plain = await fault_server()
    await _fails(setup, "relay", "offers no STARTTLS", MAILER_SMTP_PORT=str(plain.port),
                 MAILER_SMTP_TLS="none", MAILER_SMTP_USERNAME="", MAILER_SMTP_PASSWORD="")
    assert plain.connections == 1 and plain.messages == []
    await _fails(setup, "relay", "embedded", MAILER_SMTP_HOST="embedded")


async def test_dkim_key_must_match_the_published_record(setup: Setup, tmp_path: Path) -> None:
    other = keygen(setup.project, tmp_path / "other.pem")
    setup.dns.records[f"imag1._domainkey.{DOMAIN}"] = [other]
    await _fails(setup, "DKIM", "holds another key")
    del setup.dns.records[f"imag1._domainkey.{DOMAIN}"]
    await _fails(setup, "DKIM", "no DKIM record")
    setup.dns.records[f"imag1._domainkey.{DOMAIN}"] = [setup.dkim_value]
    setup.key.chmod(0o644)
    await _fails(setup, "DKIM", "can be read by other users")


async def test_domains_must_agree(setup: Setup) -> None:
    _set_config(setup.project, f"reply_to: rgv@{DOMAIN}", "reply_to: imag.dortmund@gmail.com")
    await _fails(setup, "domains", "sender.reply_to at gmail.com")


async def test_the_impressum_must_be_filled_in(setup: Setup) -> None:
    _set_config(setup.project, "  responsible: Pfarrer Friedrich Stiller (Referatsleiter)\n", "")
    await _fails(setup, "Impressum", "organisation.responsible is empty")


async def test_spf_and_dmarc_must_be_published(setup: Setup) -> None:
    setup.dns.records[DOMAIN] = ["google-x=1"]
    await _fails(setup, "SPF", f"no SPF record at {DOMAIN}")
    setup.dns.records[DOMAIN] = [SPF]
    del setup.dns.records[f"_dmarc.{DOMAIN}"]
    await _fails(setup, "DMARC", f"no DMARC record at _dmarc.{DOMAIN}")


async def test_database_must_be_reachable_and_migrated(setup: Setup, tmp_path: Path) -> None:
    db = setup.project.root / "var" / "mailer.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    await _fails(setup, "database", "run 'mailer db upgrade'")
    await _fails(setup, "database", "there is no database",
                 MAILER_DATABASE_URL=f"sqlite:///{tmp_path}/none.db")
    assert not (tmp_path / "none.db").exists()  # doctor creates nothing
    await _fails(setup, "database", "cannot open",
                 MAILER_DATABASE_URL="postgresql+psycopg://mailer@127.0.0.1:1/mailer")


async def test_time_zone_must_be_the_staffs(setup: Setup) -> None:
    await _fails(setup, "time", "timezone is UTC", MAILER_TIMEZONE="UTC")


def test_the_shipped_config_fails_offline_with_every_problem_named(project: Project) -> None:
    code, out, err = mailer_sync(project, "doctor", "--offline", MAILER_SECRET_KEY="")
    assert code == 1 and "Traceback" not in err
    failed = {line.split()[1] for line in lines(out, "FAIL")}
    assert failed == {"base", "secret", "DKIM", "domains", "Impressum", "database"}, out
    assert "not checked (--offline)" in out
    assert "mailer dkim keygen" in out and "_dmarc.imag.example.org." in out


def test_keygen_writes_a_private_key_once(project: Project, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    keygen(project, key)
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    assert b"BEGIN RSA PRIVATE KEY" in before
    code, _, err = mailer_sync(project, "dkim", "keygen", "--selector", "imag1", "--domain",
                               DOMAIN, "--out", str(key))
    assert code == 1 and "--force" in err and len(err.strip().splitlines()) == 1
    assert key.read_bytes() == before
    code, _, err = mailer_sync(project, "dkim", "keygen", "--selector", "imag1", "--domain",
                               DOMAIN, "--out", str(key), "--force")
    assert code == 0, err
    assert key.read_bytes() != before and key.stat().st_mode & 0o777 == 0o600
    for args, words in [(["--selector", "a b"], "--selector 'a b' is not a DNS label"),
                        (["--domain", "localhost"], "--domain 'localhost' is not a domain"),
                        (["--out", str(tmp_path / "no" / "k.pem")], "does not exist")]:
        base = {"--selector": "imag1", "--domain": DOMAIN, "--out": str(tmp_path / "n.pem")}
        base[args[0]] = args[1]
        code, _, err = mailer_sync(project, "dkim", "keygen",
                                   *[x for kv in base.items() for x in kv])
        assert code == 1 and words in err and "Traceback" not in err, err


def test_keygen_key_size(project: Project, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    keygen(project, tmp_path / "k.pem")
    key = load_pem_private_key((tmp_path / "k.pem").read_bytes(), None)
    assert key.key_size == 2048  # type: ignore[union-attr]


# --- single checks, in process: each way a check can go, and the sentence it says -------------


def production(project: Project, tmp_path: Path, **env: str) -> Settings:
    """Settings of the shipped config made production-ready (a fresh DKIM key), plus `env`."""
    from mailer.dkimkeys import generate

    key = tmp_path / "dkim.pem"
    if not key.exists():
        generate(key, selector="imag1", domain=DOMAIN)
        make_production(project, key)
    return project.settings(**env)


def test_nameserver_forms_and_their_mistakes() -> None:
    from mailer.doctor import parse_hostport
    from mailer.errors import UserError

    assert parse_hostport("[::1]:5353", default_port=53) == ("::1", 5353)
    assert parse_hostport("[::1]", default_port=53) == ("::1", 53)
    assert parse_hostport("::1", default_port=53) == ("::1", 53)
    assert parse_hostport("ns1.example.org:5353", default_port=53) == ("ns1.example.org", 5353)
    for text, words in [
        ("ns1.example.org:99999", "--nameserver 'ns1.example.org:99999': the port must be a "
                                  "number from 1 to 65535"),
        ("[::1]:dns", "--nameserver '[::1]:dns': the port must be a number from 1 to 65535"),
        (":53", "--nameserver ':53' names no host: use HOST or HOST:PORT"),
    ]:
        with pytest.raises(UserError) as caught:
            parse_hostport(text, default_port=53)
        assert caught.value.sentence() == words


def test_an_unknown_nameserver_is_one_sentence(project: Project) -> None:
    code, out, err = mailer_sync(project, "doctor", "--nameserver", "no-such-host.invalid")
    assert code == 1 and "Traceback" not in err and out == ""
    assert err.strip() == "error: --nameserver no-such-host.invalid: no such host", err


def test_a_nameserver_that_does_not_answer_fails_the_dns_checks(project: Project,
                                                              tmp_path: Path) -> None:
    import socket

    from mailer.doctor import Dns, check_dkim, check_published

    settings = production(project, tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        dns = Dns(where, timeout_s=0.3)
        found, record = check_dkim(settings, dns)
        assert record is not None and [(f.level, f.text) for f in found] == [
            ("fail", f"cannot look up imag1._domainkey.{DOMAIN} at {where} (LifetimeTimeout): "
                     "publish the DKIM record below")]
        published = check_published(settings, dns)
    assert [(f.check, f.level, f.text) for f in published] == [
        ("SPF, DMARC", "fail", f"cannot look up {DOMAIN} at {where} (LifetimeTimeout)")]


def test_dkim_offline_and_a_revoked_key(project: Project, tmp_path: Path,
                                        dns: DnsServer) -> None:
    from mailer.doctor import Dns, check_dkim

    settings = production(project, tmp_path)
    found, record = check_dkim(settings, None)
    assert [(f.level, f.text) for f in found] == [
        ("warn", f"imag1._domainkey.{DOMAIN}: not looked up (--offline)")]
    assert record is not None  # the record to publish is printed all the same
    dns.records[f"imag1._domainkey.{DOMAIN}"] = ["v=DKIM1; k=rsa; p="]
    found, _ = check_dkim(settings, Dns(dns.address))
    assert [(f.level, f.text) for f in found] == [
        ("fail", f"the record at imag1._domainkey.{DOMAIN} revokes its key (empty p=): "
                 "publish the record below")]


def test_spf_twice_dmarc_at_the_parent_and_a_reserved_sender(project: Project, tmp_path: Path,
                                                             dns: DnsServer) -> None:
    from mailer.doctor import Dns, check_published

    dns.records.update({DOMAIN: [SPF, "v=spf1 mx -all"], f"_dmarc.{DOMAIN}": [DMARC]})
    settings = production(project, tmp_path)
    found = check_published(settings, Dns(dns.address))
    assert [(f.check, f.level) for f in found] == [("SPF", "fail"), ("DMARC", "ok")]
    assert found[0].text == (f"{DOMAIN} has 2 SPF records; receivers treat that as an error: "
                             "merge them")
    # A sender at a subdomain is covered by the organisation's DMARC record.
    news = f"news.{DOMAIN}"
    _set_config(project, f"address: newsletter@{DOMAIN}", f"address: newsletter@{news}")
    dns.records[news] = [SPF]
    found = check_published(project.settings(), Dns(dns.address))
    assert [(f.check, f.level, f.text) for f in found] == [
        ("SPF", "ok", f"{news}: {SPF}"), ("DMARC", "ok", f"_dmarc.{DOMAIN}: {DMARC}")]
    assert f"_dmarc.{news}" in dns.queries  # its own name first
    # A reserved sender domain: the domains check says it, SPF and DMARC say nothing.
    _set_config(project, f"address: newsletter@{news}", "address: newsletter@imag.example.org")
    before = list(dns.queries)
    assert check_published(project.settings(), Dns(dns.address)) == []
    assert dns.queries == before


def test_proxies_and_the_metrics_token(project: Project, tmp_path: Path) -> None:
    from mailer.doctor import check_base_url, check_secrets

    settings = production(project, tmp_path)
    assert [f.level for f in check_base_url(settings)] == ["ok"]
    _set_config(project, "trusted_proxies: [127.0.0.1]", "trusted_proxies: []")
    found = check_base_url(project.settings())
    assert [f.level for f in found] == ["ok", "warn"]
    assert found[1].text.startswith("web.trusted_proxies is empty: behind the TLS proxy every "
                                    "visitor shares one rate limit")
    token = "Xq3vN8pL2mR7tY1wK5zB9cD4fG6hJ0sA-eU_iO"
    found = check_secrets(settings, {"MAILER_METRICS_TOKEN": token})
    assert [(f.check, f.level, f.text) for f in found][1] == (
        "metrics token", "ok", "/metrics is served to requests with the bearer token")


async def test_relay_login_without_password_and_relays_that_cannot_do_it(
        project: Project, tmp_path: Path, fault_server,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from mailer.doctor import check_relay

    server_tls, _ = make_tls_contexts(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    no_auth = await fault_server(starttls=server_tls)
    base = {"MAILER_SMTP_HOST": no_auth.host, "MAILER_SMTP_PORT": str(no_auth.port),
            "MAILER_SMTP_TLS": "starttls", "MAILER_SMTP_USERNAME": LOGIN[0]}

    async def relay(**env: str) -> str:
        (finding,) = await check_relay(production(project, tmp_path, **{**base, **env}))
        assert finding.level == "fail" and finding.check == "relay", finding
        return finding.text

    assert await relay() == ("smtp.username is set but MAILER_SMTP_PASSWORD is not: put it in "
                             "the service's environment file")
    assert no_auth.connections == 0  # said before connecting
    # A relay on implicit TLS that offers no AUTH (and hangs up on QUIT without a reply).
    async def no_auth_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 relay.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith((b"EHLO", b"HELO")):
                writer.write(b"250-relay.test\r\n250 8BITMIME\r\n")
            elif line.upper().startswith(b"QUIT"):
                break
            else:
                writer.write(b"502 5.5.1 no\r\n")
            await writer.drain()
        writer.close()

    plain = await asyncio.start_server(no_auth_relay, "127.0.0.1", 0, ssl=server_tls)
    port = plain.sockets[0].getsockname()[1]
    try:
        assert await relay(MAILER_SMTP_PASSWORD=LOGIN[1], MAILER_SMTP_TLS="tls",
                           MAILER_SMTP_PORT=str(port)) == (
            f"the relay 127.0.0.1:{port} offers no AUTH, so smtp.username cannot log in")
    finally:
        plain.close()
    closed = socket_port()
    text = await relay(MAILER_SMTP_PORT=str(closed), MAILER_SMTP_USERNAME="")
    assert text.startswith(f"connect with {no_auth.host}:{closed} failed (")
    assert text.endswith("): check MAILER_SMTP_HOST, MAILER_SMTP_PORT and MAILER_SMTP_TLS")
    # STARTTLS offered, but no TLS version both sides speak: not a certificate problem.
    old_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    old_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with warnings.catch_warnings():  # deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old_tls.minimum_version = old_tls.maximum_version = ssl.TLSVersion.TLSv1_1
    legacy = await fault_server(starttls=old_tls)
    text = await relay(MAILER_SMTP_PORT=str(legacy.port), MAILER_SMTP_USERNAME="")
    assert text.startswith(f"STARTTLS with {legacy.host}:{legacy.port} failed ("), text
    assert text.endswith("): check MAILER_SMTP_TLS against what the relay offers"), text


def socket_port() -> int:
    """A port on 127.0.0.1 nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_impressum_address_and_postcode_must_be_real(project: Project, tmp_path: Path) -> None:
    from mailer.doctor import check_impressum

    production(project, tmp_path)
    _set_config(project, f"email: rgv@{DOMAIN}", "email: rgv-at-imag")
    _set_config(project, 'postcode: "44145"', 'postcode: "D-44145"')
    (finding,) = check_impressum(project.settings())
    assert finding.level == "fail" and finding.text == (
        "organisation.email 'rgv-at-imag' is not an address; organisation.postcode 'D-44145' is "
        "not a postcode: every mail's footer must say who sends it and how to reach them "
        "(§ 5 DDG, § 18 MStV)")


def test_a_database_upgraded_by_a_newer_mailer(project: Project, tmp_path: Path) -> None:
    from mailer.doctor import check_database

    code, _, err = mailer_sync(project, "db", "upgrade")
    assert code == 0, err
    with sqlite3.connect(project.root / "var" / "mailer.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    (finding,) = check_database(project.settings())
    assert finding.level == "fail" and finding.text.endswith(
        "is at migration 9999_from_the_future, which this version does not know: it was "
        "upgraded by a newer mailer; install that version"), finding.text


@pytest.mark.parametrize(("script", "warned"), [
    ("#!/bin/sh\necho no\n", True),                 # synchronisation off
    ("#!/bin/sh\necho yes\n", False),
    ("#!/bin/sh\necho maybe\n", False),             # an answer it does not know: no claim
    ("#!/nonexistent/interpreter\n", False),        # cannot run it: no claim
    (None, False),                                  # no timedatectl (a container): no claim
])
def test_an_unsynchronised_clock_is_worth_a_look(project: Project, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 script: str | None, warned: bool) -> None:
    from mailer.doctor import check_timezone

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        tool = bin_dir / "timedatectl"
        tool.write_text(script, encoding="utf-8")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    found = check_timezone(project.settings())
    assert [f.level for f in found] == (["ok", "warn"] if warned else ["ok"])
    if warned:
        assert found[1].text.startswith("the system clock is not synchronised (timedatectl)")


def test_records_for_a_relay_by_name_and_a_report_address_elsewhere(project: Project,
                                                                    tmp_path: Path) -> None:
    from mailer.doctor import records

    settings = production(project, tmp_path, MAILER_SMTP_HOST="relay.imag-dortmund.de")
    spf = {r.what: r for r in records(settings, None)}
    assert spf["SPF"].value == "v=spf1 a:relay.imag-dortmund.de ~all"
    assert spf["DMARC"].value == f"v=DMARC1; p=none; rua=mailto:rgv@{DOMAIN}"
    assert spf["DKIM"].name == ""  # no key named: keygen's hint instead
    _set_config(project, f"email: rgv@{DOMAIN}", "email: rgv@kirche-dortmund.de")
    dmarc = {r.what: r for r in records(project.settings(), None)}["DMARC"]
    assert dmarc.value == f"v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"
