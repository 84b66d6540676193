"""Returned mail (mailer/bounces.py, mailer/mailbox.py): a real run through the embedded
capture server, then the formats real mail servers send back, read from maildirs and mbox files.

The fixtures under tests/fixtures/bounces/ carry placeholders for what our mail carried (VERP
address, Message-ID, recipient, unsubscribe token), filled in from the captured messages.
"""

from __future__ import annotations

import email
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from mailer import bounces
from mailer.checks import check_campaign
from mailer.dispatch import deliver_run, start_run
from mailer.mailbox import import_paths
from mailer.sending import audience
from mailer.store import open_store
from mailer.store import queries as q
from mailer.store.subscriber_tables import consent_events
from mailer.store.tables import deliveries, returned_mails, suppressions
from mailer.tokens import Tokens
from tests.conftest import Project, both_databases
from tests.helpers import run_mailer

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
VERP = re.compile(r"^bounces\+([a-z2-7]{42})@imag\.example\.org$")


@dataclass
class Sent:
    """What one recipient's mail carried, read back from the capture server's maildir."""

    rcpt: str
    verp: str
    message_id: str
    unsub: str
    row_id: int


@dataclass
class World:
    project: Project
    store: object
    run_id: int
    sent: dict[str, Sent]
    inbox: Path

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return self.project.settings()

    def mail(self, name: str, rcpt: str = "person0@example.org", **extra: str) -> Path:
        """Fill a fixture for `rcpt` and drop it into the inbox maildir."""
        s = self.sent[rcpt]
        text = (FIXTURES / name).read_text(encoding="utf-8")
        for key, value in {"@@VERP@@": s.verp, "@@MSGID@@": s.message_id, "@@RCPT@@": rcpt,
                           "@@UNSUB@@": s.unsub, **extra}.items():
            text = text.replace(key, value)
        return self.drop(text.encode("utf-8"), name)

    def drop(self, data: bytes, name: str) -> Path:
        path = self.inbox / "new" / f"{len(list((self.inbox / 'new').iterdir()))}.{name}"
        path.write_bytes(data)
        return path

    def read(self):  # type: ignore[no-untyped-def]
        return import_paths(self.store, self.settings, [self.inbox])  # type: ignore[arg-type]

    def conn(self):  # type: ignore[no-untyped-def]
        return self.store.engine.connect()  # type: ignore[attr-defined]


@pytest.fixture
async def world(project: Project, tmp_path: Path) -> World:
    project.crowd(4)
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    run, _ = start_run(store, campaign_id="crowd", occurrence="once", trigger="send",
                       recipients=audience(checked, settings, store))
    result = await deliver_run(settings, store, checked.rendition, run)  # embedded capture
    assert result.counts["sent"] == 4
    with store.engine.connect() as conn:
        rows = {r.email: r.id for r in conn.execute(select(deliveries.c.email, deliveries.c.id))}
    sent = {}
    for file in (settings.outbox_dir / "new").iterdir():
        msg = email.message_from_bytes(file.read_bytes())
        rcpt = str(msg["X-Envelope-To"])
        verp = str(msg["Return-Path"]).strip("<>")
        unsub = re.search(r"/unsubscribe/([^>]+)>", str(msg["List-Unsubscribe"]))
        assert unsub is not None
        sent[rcpt] = Sent(rcpt, verp, str(msg["Message-ID"]), unsub.group(1), rows[rcpt])
    inbox = tmp_path / "inbox"
    for sub in ("new", "cur", "tmp"):
        (inbox / sub).mkdir(parents=True)
    return World(project, store, run.id, sent, inbox)


def _returned(w: World) -> list[dict]:  # type: ignore[type-arg]
    with w.conn() as conn:
        return [dict(r._mapping) for r in conn.execute(select(returned_mails)
                                                       .order_by(returned_mails.c.id))]


def _suppressed(w: World) -> dict[tuple[str, str], str]:
    with w.conn() as conn:
        return {(r.email_key, r.list_name): r.reason for r in conn.execute(select(suppressions))}


def _events(w: World) -> list[tuple[str, str, str, str]]:
    with w.conn() as conn:
        return [(r.email_key, r.event, r.source, r.detail)
                for r in conn.execute(select(consent_events).order_by(consent_events.c.id))]


def _status(w: World, rcpt: str) -> tuple[str, str | None]:
    with w.conn() as conn:
        row = conn.execute(select(deliveries.c.status, deliveries.c.smtp_text)
                           .where(deliveries.c.email == rcpt)).one()
    return row.status, row.smtp_text


# --- the return path ------------------------------------------------------------------------


async def test_envelope_sender_is_a_verp_address_naming_run_and_row(world: World) -> None:
    tokens = Tokens(world.settings.secret())
    for rcpt, s in world.sent.items():
        found = VERP.match(s.verp)
        assert found, s.verp
        assert tokens.read_verp(found.group(1)) == (world.run_id, s.row_id)
        assert rcpt.split("@")[0] not in s.verp  # the token reveals nothing of the address
    outbox = world.settings.outbox_dir / "new"
    for file in outbox.iterdir():  # From: stays the sender
        assert email.message_from_bytes(file.read_bytes())["From"].endswith(
            "<newsletter@imag.example.org>")


# --- the formats --------------------------------------------------------------------------

HARD = [("gmail-dsn-hard.eml", "verp", "5.1.1"), ("exim.eml", "verp", "5.1.1"),
        ("qmail.eml", "verp", "5.1.1"), ("exchange.eml", "message-id", "")]


@pytest.mark.parametrize(("name", "matched_by", "status"), HARD)
async def test_hard_bounce_suppresses_and_marks_the_row(world: World, name: str,
                                                       matched_by: str, status: str) -> None:
    world.mail(name)
    summary = world.read()
    assert summary.kinds == {"hard_bounce": 1} and summary.actions == {"suppressed": 1}
    (row,) = _returned(world)
    assert (row["kind"], row["matched_by"], row["delivery_id"], row["run_id"]) == (
        "hard_bounce", matched_by, world.sent["person0@example.org"].row_id, world.run_id)
    assert _suppressed(world) == {("person0@example.org", "*"): "hard_bounce"}
    state, reason = _status(world, "person0@example.org")
    assert state == "bounced" and reason and reason.startswith("returned: ")
    assert status in reason and "@" not in reason  # the evidence, without the address
    ((key, event, source, detail),) = _events(world)
    assert (key, event, source) == ("person0@example.org", "bounced", "dsn")
    assert status in detail
    for other in ("person1@example.org", "person2@example.org"):
        assert _status(world, other)[0] == "sent"


@pytest.mark.parametrize("name", ["dsn-delayed.eml", "dsn-mailbox-full.eml"])
async def test_soft_bounce_is_counted_not_suppressed(world: World, name: str) -> None:
    world.mail(name)
    summary = world.read()
    assert summary.kinds == {"soft_bounce": 1} and summary.actions == {"counted": 1}
    assert _suppressed(world) == {} and _events(world) == []
    assert _status(world, "person0@example.org")[0] == "sent"


async def test_soft_bounces_suppress_after_the_limit_within_the_window(world: World) -> None:
    settings = world.settings
    assert (settings.bounces.soft_limit, settings.bounces.soft_window_days) == (3, 30)
    for i in range(2):
        world.mail("dsn-delayed.eml", **{"<20261203101500.4C1D2@mx.example.org>":
                                         f"<delayed{i}@mx.example.org>"})
    world.read()
    # Those two are older than the window: the next one is the first that counts.
    with world.store.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(update(returned_mails).values(received_at=q.utcnow() - timedelta(days=31)))
    for i in range(2, 4):
        world.mail("dsn-delayed.eml", **{"<20261203101500.4C1D2@mx.example.org>":
                                         f"<delayed{i}@mx.example.org>"})
    world.read()
    assert _suppressed(world) == {}
    world.mail("dsn-mailbox-full.eml")  # a 5.2.2 counts as soft as well: the third in 30 days
    summary = world.read()
    assert summary.actions == {"suppressed": 1}
    assert _suppressed(world) == {("person0@example.org", "*"): "soft_bounce"}
    ((_, event, _, detail),) = _events(world)
    assert event == "bounced" and detail.startswith("3 soft bounces within 30 days")


@pytest.mark.parametrize(("name", "matched_by"), [("arf-yahoo.eml", "verp"),
                                                  ("arf-aol-redacted.eml", "message-id")])
async def test_complaint_unsubscribes_from_that_list(world: World, name: str,
                                                    matched_by: str) -> None:
    world.mail(name)
    summary = world.read()
    assert summary.kinds == {"complaint": 1} and summary.actions == {"unsubscribed": 1}
    assert _returned(world)[0]["matched_by"] == matched_by
    # crowd is a file list: a list-scoped suppression, as the web unsubscribe makes.
    assert _suppressed(world) == {("person0@example.org", "crowd"): "unsubscribed"}
    ((key, event, source, detail),) = _events(world)
    assert (key, event, source) == ("person0@example.org", "unsubscribed", "complaint")
    assert "feedback-type abuse" in detail


async def test_mailto_unsubscribe_with_the_token(world: World) -> None:
    s = world.sent["person2@example.org"]
    world.drop(f"From: <person2@example.org>\nTo: unsubscribe@imag.example.org\n"
               f"Subject: unsubscribe {s.unsub}\nMessage-ID: <u1@mail.example.org>\n\n"
               "\n".encode(), "mailto")
    summary = world.read()
    assert summary.kinds == {"unsubscribe": 1} and summary.actions == {"unsubscribed": 1}
    assert _suppressed(world) == {("person2@example.org", "crowd"): "unsubscribed"}
    assert _events(world)[0][1:3] == ("unsubscribed", "mailto")
    # A token altered by one character is nobody's.
    bad = s.unsub[:-2] + ("AA" if not s.unsub.endswith("AA") else "BB")
    world.drop(f"To: unsubscribe@imag.example.org\nSubject: unsubscribe {bad}\n"
               "Message-ID: <u2@mail.example.org>\n\n\n".encode(), "forged")
    summary = world.read()
    assert summary.actions == {"unmatched": 1} and len(_events(world)) == 1


@pytest.mark.parametrize(("name", "kind"), [
    ("out-of-office.eml", "auto_reply"), ("out-of-office-subject.eml", "auto_reply"),
    ("reply.eml", "reply"), ("arf-not-spam.eml", "report")])
async def test_replies_and_other_reports_are_left_alone(world: World, name: str,
                                                       kind: str) -> None:
    world.mail(name)
    summary = world.read()
    assert summary.kinds == {kind: 1} and summary.actions == {"left alone": 1}
    assert _suppressed(world) == {} and _events(world) == []
    assert _status(world, "person0@example.org")[0] == "sent"


# --- reading twice, hostile input, bad input ----------------------------------------------


@both_databases
async def test_reading_the_same_mail_twice_changes_nothing(world: World, tmp_path: Path) -> None:
    world.mail("gmail-dsn-hard.eml")
    world.mail("dsn-delayed.eml", rcpt="person1@example.org")
    first = world.read()
    assert first.read == 2 and first.already == 0
    before = (_returned(world), _suppressed(world), _events(world))
    # The same mails again, and once more as an mbox file (LF line ends, From_ lines).
    mbox = tmp_path / "again.mbox"
    mbox.write_bytes(b"".join(b"From MAILER-DAEMON Thu Dec  3 10:00:00 2026\n" + f.read_bytes()
                              + b"\n" for f in sorted((world.inbox / "new").iterdir())))
    second = world.read()
    third = import_paths(world.store, world.settings, [mbox])  # type: ignore[arg-type]
    assert (second.already, third.already) == (2, 2) and not second.kinds and not third.kinds
    assert (_returned(world), _suppressed(world), _events(world)) == before
    with world.conn() as conn:
        assert q.soft_bounces(conn, "person1@example.org", since=q.utcnow() - timedelta(1)) == 1


async def test_crafted_dsns_do_nothing_to_addresses(world: World) -> None:
    """A DSN anyone could write: naming an address we mailed without our token or
    Message-ID, with a forged token, or a Message-ID that is not ours."""
    forged = world.sent["person3@example.org"].verp.replace("bounces+", "bounces+a")[:-1]
    dsn = (FIXTURES / "gmail-dsn-hard.eml").read_text(encoding="utf-8")
    cases = {
        "no-proof": {"@@VERP@@": "bounces@imag.example.org", "@@MSGID@@": "<x@y.example.org>",
                     "@@UNSUB@@": "nothing"},
        "forged-token": {"@@VERP@@": forged, "@@MSGID@@": "<z@y.example.org>",
                         "@@UNSUB@@": "nothing"},
        "other-unsub-token": {"@@VERP@@": "bounces@imag.example.org",
                              "@@MSGID@@": "<w@y.example.org>",
                              "@@UNSUB@@": world.sent["person1@example.org"].unsub},
    }
    for i, (name, fill) in enumerate(cases.items()):
        text = dsn.replace("@@RCPT@@", "person3@example.org").replace(
            "<5fe6e3b8.gmail-dsn-hard@mx.google.com>", f"<crafted{i}@x.example.org>")
        for key, value in fill.items():
            text = text.replace(key, value)
        world.drop(text.encode(), name)
    summary = world.read()
    assert summary.kinds == {"hard_bounce": 3} and summary.actions == {"unmatched": 3}
    assert _suppressed(world) == {} and _events(world) == []
    assert {_status(world, r)[0] for r in world.sent} == {"sent"}


async def test_the_token_decides_which_address_not_the_named_one(world: World) -> None:
    """person0's VERP address, a DSN naming person3: only person0's delivery is acted on."""
    world.mail("gmail-dsn-hard.eml", **{"Final-Recipient: rfc822; person0@example.org":
                                        "Final-Recipient: rfc822; person3@example.org"})
    world.read()
    assert set(_suppressed(world)) == {("person0@example.org", "*")}


async def test_a_dsn_for_an_address_never_mailed(world: World, project: Project) -> None:
    text = (FIXTURES / "gmail-dsn-hard.eml").read_text(encoding="utf-8")
    for key, value in {"@@VERP@@": "bounces@imag.example.org", "@@MSGID@@": "<n@x.example.org>",
                       "@@RCPT@@": "stranger@example.org", "@@UNSUB@@": "x"}.items():
        text = text.replace(key, value)
    world.drop(text.encode(), "stranger")
    world.mail("qmail.eml")  # and the rest of the mailbox is still read
    result = run_mailer(project, "mailbox", "import", str(world.inbox))
    assert result.returncode == 0, result.stderr
    assert "2 mails read" in result.stdout and "1 suppressed" in result.stdout
    with world.conn() as conn:
        actions = dict(conn.execute(select(returned_mails.c.action, returned_mails.c.detail)).all())
    assert set(actions) == {"unmatched", "suppressed"}
    # INFO log lines name what happened, never an address.
    assert "never mailed" in result.stderr and "@example.org" not in result.stderr


async def test_bad_input_is_one_sentence_each_and_the_rest_is_read(world: World, project: Project,
                                                                  tmp_path: Path) -> None:
    world.mail("qmail.eml")
    big = world.inbox / "new" / "huge"
    with big.open("wb") as fh:  # a 50 MB mail (sparse: quick to make, never read)
        fh.truncate(50 * 1024 * 1024)
    not_mbox = tmp_path / "notes.txt"
    not_mbox.write_bytes(b"\x00\x01 binary junk, not an mbox\n")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    mbox = tmp_path / "mixed.mbox"
    mbox.write_bytes(b"From x Thu Dec  3 10:00:00 2026\n\x00\xff\xfe garbage \x00 headers\n\n"
                     b"From y Thu Dec  3 10:00:00 2026\n"
                     + (FIXTURES / "reply.eml").read_bytes().replace(b"@@RCPT@@", b"p@example.org")
                     .replace(b"@@MSGID@@", b"<r@example.org>"))
    result = run_mailer(project, "mailbox", "import", str(tmp_path / "missing"), str(world.inbox),
                        str(not_mbox), str(plain_dir), str(mbox))
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'missing'}: no such file or folder",
        f"error: {big}: skipped: 50.0 MB is more than the 10 MB a returned mail may have "
        "(bounces.max_message_bytes); it was left as it is",
        f"error: {not_mbox}: is neither a maildir nor an mbox file (an mbox starts with a "
        "'From ' line); nothing in it was read",
        f"error: {plain_dir}: is a folder but not a maildir (it has no cur/ or new/)",
    ]
    assert "Traceback" not in result.stderr
    # qmail bounce, the garbage message (read as a reply: left alone) and the real reply.
    assert result.stdout.startswith("3 mails read; 1 hard bounce, 2 reply")
    assert set(_suppressed(world)) == {("person0@example.org", "*")}


@both_databases
async def test_one_transaction_per_mail_nothing_half_applied(world: World,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    world.mail("gmail-dsn-hard.eml")
    world.mail("arf-yahoo.eml", rcpt="person1@example.org")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(bounces, "record_event", broken)  # after suppress and mark_bounced
    summary = world.read()
    assert summary.actions == {"unsubscribed": 1}  # the complaint went through
    assert summary.problems == [f"{sorted((world.inbox / 'new').iterdir())[0]}: could not be "
                                "processed (RuntimeError); nothing of it was applied"]
    assert _suppressed(world) == {("person1@example.org", "crowd"): "unsubscribed"}
    assert _status(world, "person0@example.org")[0] == "sent"
    assert [r["kind"] for r in _returned(world)] == ["complaint"]
    monkeypatch.undo()
    again = world.read()  # the failed one is read again later, whole
    assert again.actions == {"suppressed": 1} and again.already == 1
    assert _status(world, "person0@example.org")[0] == "bounced"


@both_databases
async def test_report_status_and_bounces_list_count_it(world: World, project: Project) -> None:
    world.mail("gmail-dsn-hard.eml")
    world.mail("arf-yahoo.eml", rcpt="person1@example.org")
    s = world.sent["person2@example.org"]
    world.drop(f"To: unsubscribe@imag.example.org\nSubject: unsubscribe {s.unsub}\n"
               "Message-ID: <u3@mail.example.org>\n\n\n".encode(), "mailto")
    world.mail("dsn-delayed.eml", rcpt="person3@example.org")
    world.mail("reply.eml", rcpt="person3@example.org")
    world.read()
    data = json.loads(run_mailer(project, "report", "crowd", "--json").stdout)
    (entry,) = data["runs"]
    assert entry["counts"] == {"pending": 0, "sending": 0, "sent": 3, "failed": 0, "bounced": 1}
    assert entry["returned"] == {"bounced": 1, "soft_bounced": 1, "complained": 1,
                                 "unsubscribed": 1}
    text = run_mailer(project, "report", "crowd").stdout
    assert "  returned: 1 bounced, 1 soft bounces, 1 complained, 1 unsubscribed by mail" in text
    status = json.loads(run_mailer(project, "status", "--json").stdout)
    (crowd,) = [c for c in status["campaigns"] if c["campaign"] == "crowd"]
    assert crowd["last_run"]["bounced"] == 1
    from mailer.metrics import render

    metrics = render(world.store).decode()  # type: ignore[arg-type]
    assert 'mailer_deliveries{status="bounced"} 1.0' in metrics
    assert 'mailer_bounces{reason="hard_bounce"} 1.0' in metrics
    listed = json.loads(run_mailer(project, "bounces", "list", "--json").stdout)
    assert [r["kind"] for r in listed] == ["reply", "soft_bounce", "unsubscribe", "complaint",
                                           "hard_bounce"]
    assert listed[-1]["email"] == "person0@example.org" and "5.1.1" in listed[-1]["detail"]
    assert listed[-1]["campaign_id"] == "crowd" and listed[-1]["action"] == "suppressed"
    only = run_mailer(project, "bounces", "list", "--kind", "complaint").stdout.splitlines()
    assert len(only) == 1 and "complaint" in only[0] and "unsubscribed" in only[0]


def test_migration_0004_downgrades_and_upgrades(tmp_path: Path) -> None:
    from sqlalchemy import inspect

    from mailer.store.db import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    assert "returned_mails" in inspect(engine).get_table_names()
    migrate_down(engine, "0003")
    assert "returned_mails" not in inspect(engine).get_table_names()
    migrate(engine)
    assert "returned_mails" in inspect(engine).get_table_names()


def migrate_down(engine: object, revision: str) -> None:
    from alembic import command

    from mailer.store.db import _config

    cfg = _config()
    with engine.begin() as conn:  # type: ignore[attr-defined]
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


# --- reading the mail: what each kind looks like --------------------------------------------

OURS = "<20261203.abc123@imag.example.org>"
FAILED = "Final-Recipient: rfc822; anna@example.org\nAction: failed\nStatus: 5.1.1\n"


def _mail(*headers: str, body: str = "hello\n") -> bytes:
    return ("\n".join(headers) + "\n\n" + body).encode("utf-8")


def _report_in_mixed(part_type: str, fields: str) -> bytes:
    """A report whose outer type is multipart/mixed, not multipart/report (some relays)."""
    return _mail("From: MAILER-DAEMON@mx.example.org", "Message-ID: <r1@mx.example.org>",
                 'Content-Type: multipart/mixed; boundary="B"', body=(
                     "--B\nContent-Type: text/plain\n\nsee the report\n\n"
                     f"--B\nContent-Type: {part_type}\n\n{fields}\n"
                     f"--B\nContent-Type: text/rfc822-headers\n\nMessage-ID: {OURS}\n\n--B--\n"))


def test_a_report_part_is_found_when_the_outer_type_does_not_name_it(project: Project) -> None:
    settings = project.settings()
    dsn = bounces.classify(_report_in_mixed(
        "message/delivery-status", "Reporting-MTA: dns; mx.example.org\n\n"
        "Final-Recipient: rfc822; anna@example.org\nAction: failed\nStatus: 5.1.1\n"), settings)
    assert dsn.kind == bounces.ReturnedKind.HARD_BOUNCE
    assert dsn.recipients == {"anna@example.org"} and dsn.message_ids == (OURS,)
    arf = bounces.classify(_report_in_mixed(
        "message/feedback-report", "Feedback-Type: abuse\nUser-Agent: SomeISP/1.0\n"
        "Original-Rcpt-To: anna@example.org\n"), settings)
    assert arf.kind == bounces.ReturnedKind.COMPLAINT
    assert arf.recipients == {"anna@example.org"}
    assert arf.evidence == "ARF feedback-type abuse from SomeISP/1.0"


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_a_dsn_without_a_failure_is_a_report_that_asks_for_nothing(project: Project,
                                                                   action: str) -> None:
    raw = _report_in_mixed("message/delivery-status", "Reporting-MTA: dns; mx.example.org\n\n"
                           f"Final-Recipient: rfc822; anna@example.org\nAction: {action}\n"
                           "Status: 2.0.0\n")
    returned = bounces.classify(raw, project.settings())
    assert returned.kind == bounces.ReturnedKind.REPORT and returned.failures == ()
    assert returned.evidence.startswith("a delivery notice that reports no failure")


@pytest.mark.parametrize(("report_type", "evidence"), [
    ("delivery-status", "a delivery notice that reports no failure"),
    ("feedback-report", "ARF feedback-type missing")])
def test_a_report_without_its_machine_readable_part_asks_for_nothing(
        project: Project, report_type: str, evidence: str) -> None:
    """multipart/report names its kind, but the part that would say what happened is missing:
    nothing in it names a failure or a complaint, whatever the text part claims."""
    raw = _mail("From: MAILER-DAEMON@mx.example.org",
                f'Content-Type: multipart/report; report-type={report_type}; boundary="B"',
                body=("--B\nContent-Type: text/plain\n\n550 5.1.1 user unknown; this is abuse\n"
                      f"--B\nContent-Type: text/rfc822-headers\n\nMessage-ID: {OURS}\n--B--\n"))
    returned = bounces.classify(raw, project.settings())
    assert returned.kind == bounces.ReturnedKind.REPORT and returned.failures == ()
    assert returned.evidence.startswith(evidence)


@pytest.mark.parametrize(("header", "kind"), [
    ("X-Autoreply: yes", "auto_reply"), ("X-Autorespond: on", "auto_reply"),
    ("Precedence: auto_reply", "auto_reply"), ("Precedence: bulk", "reply"),
    ("Auto-Submitted: no", "reply")])
def test_auto_reply_headers_other_than_rfc_3834(project: Project, header: str,
                                                kind: str) -> None:
    raw = _mail("From: anna@example.org", "Subject: Re: news", header, "Message-ID: <a@x.org>")
    assert bounces.classify(raw, project.settings()).kind.value == kind


def test_an_undecodable_subject_is_read_as_written(project: Project) -> None:
    """An encoded word in an unknown charset: the raw subject is still what is matched."""
    raw = _mail("From: anna@example.org", "Subject: Automatic reply: =?x-bogus?q?weg?=")
    returned = bounces.classify(raw, project.settings())
    assert returned.kind == bounces.ReturnedKind.AUTO_REPLY


def test_a_part_in_an_unknown_charset_is_still_searched(project: Project) -> None:
    verp = "bounces+" + "a" * 42 + "@imag.example.org"
    raw = _mail("From: MAILER-DAEMON@mx.example.org", 'Content-Type: multipart/mixed; boundary="B"',
                body=("--B\nContent-Type: message/delivery-status\n\n"
                      "Final-Recipient: rfc822; anna@example.org\nAction: failed\n"
                      "Status: 5.1.1\n\n--B\nContent-Type: text/plain; charset=x-unheard-of\n\n"
                      f"Return-Path: <{verp}>\nMessage-ID: {OURS}\n--B--\n"))
    returned = bounces.classify(raw, project.settings())
    assert returned.kind == bounces.ReturnedKind.HARD_BOUNCE
    assert returned.message_ids == (OURS,) and returned.verp_tokens == ("a" * 42,)


def test_only_the_text_budget_is_searched(project: Project,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _mail("From: MAILER-DAEMON@mx.example.org", 'Content-Type: multipart/mixed; boundary="B"',
                body=("--B\nContent-Type: text/plain\n\n" + "x" * 5000 + "\n"
                      f"--B\nContent-Type: message/delivery-status\n\n{FAILED}\n"
                      f"--B\nContent-Type: text/rfc822-headers\n\nMessage-ID: {OURS}\n--B--\n"))
    settings = project.settings()
    assert bounces.classify(raw, settings).message_ids == (OURS,)
    monkeypatch.setattr(bounces, "TEXT_BUDGET", 1000)  # spent on the first part
    assert bounces.classify(raw, settings).message_ids == ()


def test_without_a_bounce_address_no_verp_token_is_read(project: Project) -> None:
    raw = _report_in_mixed("message/delivery-status", FAILED).replace(
        b"From:", b"To: bounces+" + b"b" * 42 + b"@imag.example.org\nFrom:")
    settings = project.settings()
    assert bounces.classify(raw, settings).verp_tokens == ("b" * 42,)
    plain = settings.model_copy(update={
        "bounces": settings.bounces.model_copy(update={"address": None})})
    assert bounces.classify(raw, plain).verp_tokens == ()


def test_mail_from_a_mail_system_that_reports_no_failure_is_no_bounce(project: Project) -> None:
    settings = project.settings()
    notice = _mail("From: MAILER-DAEMON@mx.example.org", "Return-Path: <>",
                   "Subject: Your mailbox quota", "Message-ID: <n1@mx.example.org>",
                   body="Your mailbox is 80 % full. Please tidy up.\n")
    assert bounces.classify(notice, settings).kind == bounces.ReturnedKind.REPLY
    auto = notice.replace(b"Subject:", b"Auto-Submitted: auto-generated\nSubject:")
    assert bounces.classify(auto, settings).kind == bounces.ReturnedKind.AUTO_REPLY


def test_a_detector_that_trips_leaves_the_mail_unread_as_a_bounce(
        project: Project, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import flufl.bounce

    raw = (FIXTURES / "qmail.eml").read_bytes()
    settings = project.settings()
    assert bounces.classify(raw, settings).kind == bounces.ReturnedKind.HARD_BOUNCE

    def tripped(msg: object) -> object:
        raise IndexError("hostile input")

    monkeypatch.setattr(flufl.bounce, "all_failures", tripped)
    returned = bounces.classify(raw, settings)
    assert returned.kind not in (bounces.ReturnedKind.HARD_BOUNCE,
                                 bounces.ReturnedKind.SOFT_BOUNCE)
    assert returned.failures == ()
    assert "could not be read by the bounce detectors" in caplog.text


# --- matching and acting: the rarer paths ---------------------------------------------------


def _forged(token: str) -> str:
    """The same length and alphabet, the first character changed: the seal no longer fits.
    (Not the last: its low bits are base32 padding, and some changes there decode alike.)"""
    return ("a" if token[0] != "a" else "b") + token[1:]


async def test_proofs_are_tried_in_turn_and_a_bad_one_is_skipped(world: World) -> None:
    # person1: a VERP token that fails its seal, then our Message-ID.
    s1 = world.sent["person1@example.org"]
    token = VERP.match(s1.verp).group(1)  # type: ignore[union-attr]
    world.mail("gmail-dsn-hard.eml", rcpt="person1@example.org",
               **{s1.verp: s1.verp.replace(token, _forged(token)),
                  "<5fe6e3b8.gmail-dsn-hard@mx.google.com>": "<other@mx.google.com>"})
    # person0: no VERP token, a Message-ID that is not ours, an unsubscribe token that is not
    # ours, then person0's own for the very address the DSN names.
    s0 = world.sent["person0@example.org"]
    text = (FIXTURES / "gmail-dsn-hard.eml").read_text(encoding="utf-8")
    text = text.replace("List-Unsubscribe: <http", "X-Old-Link: <http://127.0.0.1:8000/"
                        "unsubscribe/AAAAAAAAAAAAAAAAAAAAAAAA>\nList-Unsubscribe: <http")
    for key, value in {"@@VERP@@": "bounces@imag.example.org", "@@MSGID@@": "<f@x.example.org>",
                       "@@RCPT@@": s0.rcpt, "@@UNSUB@@": s0.unsub}.items():
        text = text.replace(key, value)
    world.drop(text.encode(), "final-recipient")
    summary = world.read()
    assert summary.problems == [] and summary.actions == {"suppressed": 2}
    how = {r["delivery_id"]: r["matched_by"] for r in _returned(world)}
    assert how == {s1.row_id: "message-id", s0.row_id: "final-recipient"}
    assert set(_suppressed(world)) == {(s0.rcpt, "*"), (s1.rcpt, "*")}


async def test_an_address_suppressed_already_is_not_suppressed_twice(world: World) -> None:
    world.mail("gmail-dsn-hard.eml")
    world.mail("exim.eml")  # a second hard bounce for the same address
    summary = world.read()
    assert summary.kinds == {"hard_bounce": 2}
    assert [r["action"] for r in _returned(world)] == ["suppressed", "already"]
    for i in range(3):  # soft bounces reach the limit for an address suppressed already
        world.mail("dsn-delayed.eml", **{"<20261203101500.4C1D2@mx.example.org>":
                                         f"<later{i}@mx.example.org>"})
    world.read()
    assert [r["action"] for r in _returned(world)][2:] == ["counted", "counted", "already"]
    assert _suppressed(world) == {("person0@example.org", "*"): "hard_bounce"}
    assert [e[1] for e in _events(world)] == ["bounced"]  # one event, not three


async def test_a_bounce_for_an_erased_address_changes_nothing(world: World) -> None:
    from mailer.subscribers import forget

    with world.store.engine.begin() as conn:  # type: ignore[attr-defined]
        forget(conn, email="person0@example.org")
    before = (_suppressed(world), _events(world))
    world.mail("gmail-dsn-hard.eml")
    summary = world.read()
    assert summary.kinds == {"hard_bounce": 1} and summary.actions == {"erased": 1}
    (row,) = _returned(world)
    assert (row["matched_by"], row["delivery_id"]) == (
        "verp", world.sent["person0@example.org"].row_id)
    assert (_suppressed(world), _events(world)) == before  # the address is not brought back
    assert not any("person0" in key for key, _ in _suppressed(world))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=26, max_size=26))
def test_verp_base32_is_rfc_4648_in_lower_case(data: bytes) -> None:
    import base64

    from mailer.tokens import _b32_lower

    assert _b32_lower(data) == base64.b32encode(data).rstrip(b"=").decode("ascii").lower()


def test_a_verp_token_has_one_spelling() -> None:
    """Base32's last character has two padding bits; a variant in them is not our token."""
    import secrets

    from mailer.tokens import TokenError, Tokens

    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    tokens = Tokens(secrets.token_urlsafe(48))
    for row in range(40):
        token = tokens.verp(7, row)
        assert tokens.read_verp(token) == (7, row) and tokens.read_verp(token.upper()) == (7, row)
        last = alphabet.index(token[-1])
        for other in {alphabet[(last & ~3) | low] for low in range(4)} - {token[-1]}:
            with pytest.raises(TokenError):
                tokens.read_verp(token[:-1] + other)
