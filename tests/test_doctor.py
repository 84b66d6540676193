"""`mailer doctor` against real parts: a relay with STARTTLS and AUTH (tests/smtpd.py, its
certificate trusted through SSL_CERT_FILE), a DNS server on loopback (tests/dnsd.py) holding
the records keygen printed, a migrated database. A production-ready setup passes; each way of
breaking it fails with exit 1 and a FAIL line naming what to fix."""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
