"""Returned mail from real servers: postfix sends our run and writes its own DSNs, dovecot serves
them over IMAP, `mailer mailbox fetch` and `mailer run` read them (tests/mta.py starts both)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer.checks import check_campaign
from mailer.dispatch import deliver_run, start_run
from mailer.sending import audience
from mailer.store import open_store
from mailer.store.tables import deliveries, returned_mails, suppressions
from tests.conftest import Project
from tests.helpers import finish, run_mailer, start_mailer
from tests.mta import PASSWORD, USER, Dovecot, dovecot, start_postfix, stop_postfix

__all__ = ["dovecot"]  # the fixture, used by name
pytestmark = pytest.mark.mta


def _configure(project: Project, dc: Dovecot, **extra: str) -> None:
    lines = ["mailbox:", "  host: 127.0.0.1", f"  port: {dc.port}", "  tls: none",
             f"  username: {USER}", "  folder: INBOX", "  processed_folder: Processed",
             "  poll_s: 5"]
    lines = [ln for ln in lines if ln.split(":")[0].strip() not in extra]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    with project.config.open("a") as fh:
        fh.write("\n" + "\n".join(lines) + "\n")


def _wait(check, timeout_s: float = 40.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


async def test_postfix_dsns_read_over_imap_suppress_and_mark_bounced(
        project: Project, dovecot: Dovecot) -> None:
    pf = start_postfix(dovecot.root)
    try:
        project.crowd(3, special={0: "ghost@lists.example.org",
                                  1: "nobody-here@lists.example.org",
                                  2: "reader@imag.example.org"})
        settings = project.settings(MAILER_SMTP_HOST="127.0.0.1", MAILER_SMTP_PORT=str(pf.port))
        checked = check_campaign(settings.campaigns_dir / "crowd.yaml", settings)
        store = open_store(settings.database_url)
        run, _ = start_run(store, campaign_id="crowd", occurrence="once", trigger="send",
                           recipients=audience(checked, settings, store))
        result = await deliver_run(settings, store, checked.rendition, run)
        assert result.counts["sent"] == 3  # postfix takes all; two come back later
        # Two DSNs written by postfix itself, plus our mail to reader@ (same mailbox).
        await asyncio.to_thread(_wait, lambda: dovecot.count() == 3)
    finally:
        stop_postfix(pf)
    _configure(project, dovecot)
    env = {"MAILER_MAILBOX_PASSWORD": PASSWORD}
    fetched = run_mailer(project, "mailbox", "fetch", **env)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == ("3 mails read; 2 hard bounce, 1 reply; actions: "
                                      "1 left alone, 2 suppressed")
    with store.engine.connect() as conn:
        states = dict(conn.execute(select(deliveries.c.email, deliveries.c.status)).all())
        supp = {r.email_key: r.reason for r in conn.execute(select(suppressions))}
        how = {r.matched_by for r in conn.execute(select(returned_mails))
               if r.kind == "hard_bounce"}
    assert states == {"ghost@lists.example.org": "bounced",
                      "nobody-here@lists.example.org": "bounced",
                      "reader@imag.example.org": "sent"}
    assert supp == {"ghost@lists.example.org": "hard_bounce",
                    "nobody-here@lists.example.org": "hard_bounce"}
    assert how == {"verp"}
    # Moved, not deleted; a second fetch finds nothing new.
    assert (dovecot.count("INBOX"), dovecot.count("Processed")) == (0, 3)
    again = run_mailer(project, "mailbox", "fetch", **env)
    assert again.stdout.strip() == "0 mails read" and again.returncode == 0


def test_imap_login_refused_and_server_unreachable(project: Project, dovecot: Dovecot) -> None:
    _configure(project, dovecot)
    dovecot.deliver(b"Subject: hello\r\nMessage-ID: <h@example.org>\r\n\r\nhi\r\n", "hello")
    wrong = run_mailer(project, "mailbox", "fetch", MAILER_MAILBOX_PASSWORD="wrong")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f"error: the IMAP server 127.0.0.1:{dovecot.port} refused the login of 'bounces': "
        "check mailbox.username and MAILER_MAILBOX_PASSWORD")
    assert dovecot.count("INBOX") == 1  # untouched
    missing = run_mailer(project, "mailbox", "fetch")
    assert missing.returncode == 1 and missing.stderr.strip() == (
        "error: field 'mailbox': the mailbox password is missing: set MAILER_MAILBOX_PASSWORD")


def test_too_large_mail_is_flagged_and_the_rest_is_read(project: Project,
                                                        dovecot: Dovecot) -> None:
    _configure(project, dovecot, processed_folder="''")
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(text.replace("max_message_bytes: 10485760",
                                           "max_message_bytes: 65536"), encoding="utf-8")
    dovecot.deliver(b"Subject: big\r\nMessage-ID: <big@example.org>\r\n\r\n"
                    + b"x" * 100 + b"\r\n" * 1200 + b"y" * 70_000 + b"\r\n", "big")
    dovecot.deliver(b"From: a@example.org\r\nSubject: Re: news\r\nMessage-ID: <r@example.org>"
                    b"\r\n\r\nthanks\r\n", "reply")
    env = {"MAILER_MAILBOX_PASSWORD": PASSWORD}
    first = run_mailer(project, "mailbox", "fetch", **env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1 mails read; 1 reply; actions: 1 left alone; 1 skipped"
    (line,) = [ln for ln in first.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: IMAP INBOX UID ") and line.endswith(
        ": skipped: 71 KB is more than the 64 KB a returned mail may have "
        "(bounces.max_message_bytes); it was left as it is")
    # processed_folder empty: both stay where they are, flagged; nothing is read twice.
    assert dovecot.count("INBOX") == 2
    again = run_mailer(project, "mailbox", "fetch", **env)
    assert again.stdout.strip() == "0 mails read" and "error" not in again.stderr


async def test_mailer_run_polls_the_mailbox(project: Project, dovecot: Dovecot) -> None:
    _configure(project, dovecot)
    dovecot.deliver(b"From: a@example.org\r\nSubject: Automatic reply: news\r\n"
                    b"Message-ID: <ooo@example.org>\r\n\r\naway\r\n", "ooo")
    proc = await start_mailer(project, "run", MAILER_MAILBOX_PASSWORD=PASSWORD)
    store = open_store(project.settings().database_url)

    def read() -> bool:
        with store.engine.connect() as conn:
            return conn.execute(select(returned_mails.c.kind)).first() is not None

    try:
        await asyncio.to_thread(_wait, read, 30.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _, err = await finish(proc, 60)
    with store.engine.connect() as conn:
        assert conn.execute(select(returned_mails.c.kind)).scalar() == "auto_reply"
    assert dovecot.count("Processed") == 1
    assert "@example.org" not in err  # the log names no address
    assert code == 0, err


def test_no_mailbox_configured_is_one_sentence(project: Project, tmp_path: Path) -> None:
    result = run_mailer(project, "mailbox", "fetch")
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: field 'mailbox': no mailbox is configured: add a 'mailbox:' block (host, "
        "username, folder) to the config")
