"""Subscribers and consent in the store, and the `mailer subscribers` commands."""

from __future__ import annotations

import json
import mailbox

from click.testing import CliRunner, Result
from sqlalchemy import select

from mailer import subscribers as subs
from mailer.checks import check_campaign
from mailer.cli import main
from mailer.sending import audience
from mailer.store import open_store
from mailer.store.subscriber_tables import consent_events
from mailer.store.tables import suppressions
from tests.conftest import Project, both_databases

PEOPLE = """\
email,name,language
anna.schmidt@example.org,Anna Schmidt,de
mehmet@example.org,Mehmet Öztürk,tr
rania@example.org,Rania Al-Khatib,ar
"""

CAMPAIGN = """\
template: newsletter
audience: {lists: [newsletter-demo, newsletter]}
content:
  de: {subject: "Hallo", blocks: [{heading: "Hallo"}]}
"""


def cli(project: Project, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(project.config), *args], env=project.env)


def imported(project: Project, *extra: str) -> Result:
    path = project.root / "people.csv"
    path.write_text(PEOPLE, encoding="utf-8")
    return cli(project, "subscribers", "import", str(path), "--list", "newsletter", *extra)


@both_databases
def test_import_with_proof_subscribes_and_without_stays_pending(project: Project):
    result = imported(project, "--consent-source", "Anmeldeliste Straßenfest 2025-06-14")
    assert result.exit_code == 0, result.output
    assert "3 added as subscribed" in result.output
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        members = subs.members(conn, "newsletter")
        events = list(conn.execute(select(consent_events)))
    assert [m.email for m in members] == ["anna.schmidt@example.org", "mehmet@example.org",
                                          "rania@example.org"]
    assert members[1].language == "tr" and members[1].name == "Mehmet Öztürk"
    assert {e.event for e in events} == {"imported"}
    assert events[0].source == "import: Anmeldeliste Straßenfest 2025-06-14"
    again = imported(project)
    assert "0 added" in again.output and "3 already subscribed" in again.output


def test_import_without_proof_is_marked_and_mails_only_when_asked(project: Project):
    quiet = imported(project)
    assert quiet.exit_code == 0 and "pending (no proof of consent)" in quiet.output
    assert "--send-confirmation" in quiet.output
    settings = project.settings()
    store = open_store(settings.database_url)
    with store.engine.connect() as conn:
        assert subs.members(conn, "newsletter") == []
        rows = subs.export_members(conn, list_name="newsletter")
    assert {(r["status"], r["proof"]) for r in rows} == {("pending", "unconfirmed")}
    outbox = settings.outbox_dir
    assert not outbox.exists() or len(mailbox.Maildir(outbox)) == 0
    path = project.root / "more.csv"
    path.write_text("email,language\nnew@example.org,ar\n", encoding="utf-8")
    asked = cli(project, "subscribers", "import", str(path), "--list", "newsletter",
                "--send-confirmation")
    assert asked.exit_code == 0 and "1 of 1 confirmation mails sent" in asked.output
    (msg,) = mailbox.Maildir(outbox).values()
    assert msg["To"].strip("<>") == "new@example.org" and msg["Content-Language"] == "ar"


def test_bad_import_file_is_one_sentence_and_writes_nothing(project: Project):
    path = project.root / "bad.csv"
    path.write_text("email,name\nok@example.org,Ok\nnot-an-address,Bad\n", encoding="utf-8")
    result = cli(project, "subscribers", "import", str(path), "--list", "newsletter")
    assert result.exit_code == 1
    assert "bad.csv, line 3" in result.output and "Traceback" not in result.output
    wrong_list = cli(project, "subscribers", "import", str(path), "--list", "partners")
    assert wrong_list.exit_code == 1 and "not a managed list" in wrong_list.output
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        assert subs.export_members(conn) == []


def test_export_show_and_forget(project: Project):
    imported(project, "--consent-source", "Formular Integrationskonferenz")
    exported = cli(project, "subscribers", "export", "--format", "csv")
    header = "email,name,language,list_name,status,proof,updated_at"
    assert exported.output.splitlines()[0] == header
    assert len(exported.output.splitlines()) == 4
    as_json = json.loads(cli(project, "subscribers", "export", "--format", "json").output)
    assert {r["email"] for r in as_json} >= {"rania@example.org"}

    shown = json.loads(cli(project, "subscribers", "show", "mehmet@example.org").output)
    assert shown["subscriber"]["name"] == "Mehmet Öztürk"
    assert shown["memberships"][0]["status"] == "subscribed"
    assert shown["consent_events"][0]["source"] == "import: Formular Integrationskonferenz"

    forgot = cli(project, "subscribers", "forget", "anna.schmidt@example.org", "--yes")
    assert forgot.exit_code == 0, forgot.output
    shown = json.loads(cli(project, "subscribers", "show", "anna.schmidt@example.org").output)
    assert shown["subscriber"] is None and shown["memberships"] == []
    assert {e["event"] for e in shown["consent_events"]} == {"imported", "erased"}
    assert all(e["email_key"].startswith("sha256:") for e in shown["consent_events"])
    assert [s["reason"] for s in shown["suppressions"]] == ["erased"]
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        keys = {r.email_key for r in conn.execute(select(suppressions))}
        assert not any("anna" in k for k in keys)
    # A later import cannot add them back silently.
    again = imported(project, "--consent-source", "old spreadsheet")
    assert "skipped anna.schmidt@example.org: erased" in again.output


def test_audience_takes_confirmed_members_and_respects_erasure(project: Project):
    imported(project, "--consent-source", "Formular")
    path = project.root / "pending.csv"
    path.write_text("email\npending@example.org\n", encoding="utf-8")
    cli(project, "subscribers", "import", str(path), "--list", "newsletter")
    settings = project.settings()
    campaign = project.campaign("mixed.yaml", CAMPAIGN)
    store = open_store(settings.database_url)
    checked = check_campaign(campaign, settings)
    before = {r.email: r.list for r in audience(checked, settings, store)}
    assert before["rania@example.org"] == "newsletter"
    assert before["anna.schmidt@example.org"] == "newsletter-demo"  # the first list wins
    assert "pending@example.org" not in before
    with store.engine.begin() as conn:
        subs.forget(conn, email="anna.schmidt@example.org")
        subs.unsubscribe(conn, settings, email="rania@example.org", list_name="newsletter",
                         origin=subs.Origin("test"))
    after = {r.email for r in audience(checked, settings, store)}
    # Erased: gone from the file list too (only the hash is left to recognise it).
    assert "anna.schmidt@example.org" not in after and "rania@example.org" not in after
    assert "mehmet@example.org" in after


def test_mailto_subject_carries_the_token():
    assert subs.mailto_token("unsubscribe abc.DEF-_1") == "abc.DEF-_1"
    assert subs.mailto_token("Re: hello") is None
