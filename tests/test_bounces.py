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
