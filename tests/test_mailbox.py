"""Returned mail from real servers: postfix sends our run and writes its own DSNs, dovecot serves
them over IMAP, `mailer mailbox fetch` and `mailer run` read them (tests/mta.py starts both)."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mailer.checks import check_campaign
from mailer.config import MailboxSettings, Settings
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


# --- files: what is read and what is one sentence -----------------------------------------

REPLY = (b"From: anna@example.org\nSubject: Re: news\nMessage-ID: <reply@example.org>\n\n"
         b"thanks\n")


def test_summary_line_names_mails_read_before() -> None:
    from mailer.mailbox import Summary

    assert Summary(read=3, already=2).line() == "3 mails read; 2 read before (nothing changed)"
    assert Summary(read=1).line() == "1 mails read"


def test_a_maildir_with_cur_only_skips_dotfiles_folders_and_empty_mails(
        project: Project, tmp_path: Path) -> None:
    from mailer.mailbox import import_paths

    box = tmp_path / "box"
    cur = box / "cur"
    cur.mkdir(parents=True)  # no new/: what some clients leave behind
    (cur / ".hidden").write_bytes(REPLY.replace(b"reply@", b"hidden@"))
    (cur / "folder").mkdir()
    (cur / "1.empty").write_bytes(b" \n\n")
    (cur / "2.reply").write_bytes(REPLY)
    settings = project.settings()
    summary = import_paths(open_store(settings.database_url), settings, [box])
    assert (summary.read, dict(summary.kinds)) == (1, {"reply": 1})
    assert summary.problems == [f"{cur / '1.empty'}: skipped: the mail is empty"]


def test_a_mail_too_large_in_an_mbox_is_skipped_and_the_next_is_read(tmp_path: Path) -> None:
    from mailer.mailbox import read_paths

    mbox = tmp_path / "in.mbox"
    mbox.write_bytes(b"From a Thu Dec  3 10:00:00 2026\nSubject: big\n\n" + b"x" * 3000 + b"\n"
                     b"From b Thu Dec  3 10:00:00 2026\n" + REPLY)
    items = list(read_paths([mbox], max_bytes=2048))
    assert [i.ref for i in items] == [f"{mbox}, message 1", f"{mbox}, message 2"]
    assert items[0].data is None and items[0].problem == (
        "skipped: 3 KB is more than the 2 KB a returned mail may have "
        "(bounces.max_message_bytes); it was left as it is")
    assert items[1].data is not None and b"thanks" in items[1].data


def test_a_path_that_cannot_be_opened_is_one_sentence(tmp_path: Path) -> None:
    import socket

    from mailer.mailbox import _file_item, read_paths

    sock_path = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX) as sock:  # there, not a folder, cannot be opened
        sock.bind(str(sock_path))
        (item,) = read_paths([sock_path], max_bytes=1 << 20)
    assert item.data is None
    assert item.problem == "cannot be read (No such device or address)"
    # A maildir file another client moved away between listing and reading.
    gone = _file_item(tmp_path / "new" / "moved", max_bytes=1 << 20)
    assert gone.data is None and gone.problem == "cannot be read (No such file or directory)"


# --- IMAP: configuration, connection, the server's answers --------------------------------


def _cfg(**values: object) -> MailboxSettings:
    base: dict[str, object] = {"host": "127.0.0.1", "tls": "none", "username": "bounces",
                               "password": "pw", "timeout_s": 5}
    return MailboxSettings(**{**base, **values})  # type: ignore[arg-type]


def test_an_unencrypted_login_is_only_accepted_on_this_machine() -> None:
    from mailer.errors import ConfigError
    from mailer.mailbox import _check

    for host in ("localhost", "127.0.0.1", "::1"):
        assert _check(_cfg(host=host)).host == host
    with pytest.raises(ConfigError) as err:
        _check(_cfg(host="imap.example.org"))
    assert "the login to imap.example.org would cross the network unencrypted" in str(err.value)
    assert _check(_cfg(host="imap.example.org", tls="tls")).tls == "tls"


@pytest.mark.parametrize("tls", ["tls", "none"])
async def test_a_server_that_cannot_be_reached_is_one_sentence(tls: str) -> None:
    from mailer.mailbox import MailboxError, _connect
    from tests.mta import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(MailboxError) as err:
        await _connect(_cfg(port=port, tls=tls))
    assert str(err.value).startswith(
        f"cannot reach the IMAP server 127.0.0.1:{port} (ConnectionRefusedError: ")


def test_a_folder_that_is_not_there_is_one_sentence(project: Project, dovecot: Dovecot) -> None:
    _configure(project, dovecot, folder="Nowhere")
    dovecot.deliver(b"Subject: hello\r\nMessage-ID: <h@example.org>\r\n\r\nhi\r\n", "hello")
    result = run_mailer(project, "mailbox", "fetch", MAILER_MAILBOX_PASSWORD=PASSWORD)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: the IMAP server 127.0.0.1:{dovecot.port} has no folder 'Nowhere' "
        "(mailbox.folder)")
    assert dovecot.count("INBOX") == 1


@dataclass
class Response:
    result: str
    lines: list[Any]


class FakeImap:
    """An IMAP server's answers, scripted: what fetch does with each of them."""

    def __init__(self, *, search: Response, mails: dict[str, bytes | None],
                 sizes: dict[str, bytes]) -> None:
        self.search, self.mails, self.sizes = search, mails, sizes
        self.calls: list[tuple[str, ...]] = []

    async def create(self, name: str) -> Response:
        return Response("NO", [])

    async def uid_search(self, criteria: str, charset: object = None) -> Response:
        return self.search

    def has_capability(self, name: str) -> bool:
        return name == "MOVE"

    async def uid(self, command: str, uid: str, *args: str) -> Response:
        self.calls.append((command, uid, *args))
        if command == "fetch" and args == ("(RFC822.SIZE)",):
            return Response("OK", [self.sizes.get(uid, b"FETCH completed"), b"done"])
        if command == "fetch":
            data = self.mails[uid]
            if data is None:
                return Response("NO", [b"message vanished"])
            return Response("OK", [b"1 FETCH (UID " + uid.encode() + b" BODY[] {99}",
                                   bytearray(data), b")", b"done"])
        return Response("OK", [])

    async def logout(self) -> Response:
        raise ConnectionResetError("the server hung up first")


def _imap_settings(project: Project) -> Settings:
    return project.settings().model_copy(update={"mailbox": _cfg()})


async def test_fetch_reads_what_the_server_gives_and_leaves_the_rest(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import mailbox

    fake = FakeImap(search=Response("OK", [b"7 8", b"SEARCH completed"]),
                    mails={"7": None, "8": REPLY}, sizes={"7": b"7 FETCH (RFC822.SIZE 80)"})

    async def connect(cfg: MailboxSettings) -> FakeImap:
        return fake

    monkeypatch.setattr(mailbox, "_connect", connect)
    settings = _imap_settings(project)
    summary = await mailbox.fetch(open_store(settings.database_url), settings)
    # UID 8 reports no size (read as 0, not skipped); UID 7 cannot be fetched: left unmarked.
    assert (summary.read, dict(summary.kinds)) == (1, {"reply": 1})
    assert summary.problems == ["IMAP INBOX UID 7: could not be fetched"]
    assert [c for c in fake.calls if c[0] in ("move", "store")] == [
        ("move", "8", '"Processed"')]


async def test_fetch_stops_when_the_server_refuses_to_list(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import mailbox

    fake = FakeImap(search=Response("NO", [b"SEARCH failed"]), mails={}, sizes={})

    async def connect(cfg: MailboxSettings) -> FakeImap:
        return fake

    monkeypatch.setattr(mailbox, "_connect", connect)
    settings = _imap_settings(project)
    with pytest.raises(mailbox.MailboxError, match="refused to list the mails of the folder"):
        await mailbox.fetch(open_store(settings.database_url), settings)
    assert fake.calls == []  # nothing fetched, nothing marked


# --- mailer run: the poll -------------------------------------------------------------------


async def test_poll_without_a_mailbox_says_so_once_and_stops(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    from mailer.mailbox import poll

    settings = project.settings()
    assert settings.mailbox is None
    stop = asyncio.Event()
    await asyncio.wait_for(poll(open_store(settings.database_url), settings, stop), 5)
    assert [r.getMessage() for r in caplog.records if r.name == "mailer.mailbox"] == [
        "mailbox: field 'mailbox': no mailbox is configured: add a 'mailbox:' block (host, "
        "username, folder) to the config; returned mail is not read"]


async def test_a_failed_poll_round_is_logged_and_the_next_round_tries_again(
        project: Project, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from mailer import mailbox

    settings = project.settings().model_copy(update={
        "mailbox": _cfg().model_copy(update={"poll_s": 0.01})})  # below the minimum: quick
    stop = asyncio.Event()
    rounds: list[int] = []

    async def fetch(store: object, settings: object) -> mailbox.Summary:
        rounds.append(1)
        if len(rounds) == 1:
            raise mailbox.MailboxError("cannot reach the IMAP server")
        if len(rounds) == 2:
            raise RuntimeError("a bug")
        stop.set()
        return mailbox.Summary(read=1, problems=["IMAP INBOX UID 3: could not be fetched"])

    monkeypatch.setattr(mailbox, "fetch", fetch)
    caplog.set_level("INFO", logger="mailer.mailbox")
    await asyncio.wait_for(mailbox.poll(object(), settings, stop), 10)  # type: ignore[arg-type]
    assert len(rounds) == 3
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mailer.mailbox"]
    assert logged == [
        ("WARNING", "mailbox: cannot reach the IMAP server; trying again in 0 s"),
        ("ERROR", "mailbox: the poll failed (RuntimeError)"),
        ("INFO", "mailbox: 1 mails read; 1 skipped"),
        ("WARNING", "mailbox: IMAP INBOX UID 3: could not be fetched"),
    ]
