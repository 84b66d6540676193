"""Calendar entries: one per event and language, read back with the icalendar library; one UID
per event across languages and campaigns; SEQUENCE grows with an edit."""

from __future__ import annotations

import email
import email.policy
import os
import re
from email.message import EmailMessage
from pathlib import Path

import icalendar
import pytest

from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.compose import Composer
from mailer.tokens import Tokens
from tests.conftest import REPO, Project

NEWSLETTER = "wir-alle-sind-dortmund-2026-12.yaml"
INVITATION = "integrationskonferenz-2027.yaml"


@pytest.fixture
def shipped(project: Project) -> Project:
    for name in (NEWSLETTER, INVITATION):
        (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    return project


def mail(project: Project, name: str, lang: str) -> EmailMessage:
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / name, settings, with_audience=False)
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))
    data = composer.compose(Recipient("r@example.org", "Rana", lang, list="partners"),
                            message_id="<cal@imag.example.org>").data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def entries(msg: EmailMessage) -> dict[str, icalendar.Event]:
    """File name → its one VEVENT, parsed by an independent iCalendar reader."""
    out = {}
    for part in msg.iter_attachments():
        if part.get_content_type() != "text/calendar":
            continue
        assert part.get_param("charset") == "utf-8" and part.get_param("method") == "PUBLISH"
        name = part.get_filename()
        assert name and name.isascii() and re.fullmatch(r"[a-z0-9-]+\.ics", name), name
        cal = icalendar.Calendar.from_ical(part.get_payload(decode=True))
        (event,) = cal.walk("VEVENT")
        out[name] = event
    return out


def test_every_language_gets_its_own_calendar_entries(shipped: Project) -> None:
    uids: dict[str, set[str]] = {}
    for lang in ("de", "tr", "ar"):
        msg = mail(shipped, NEWSLETTER, lang)
        found = entries(msg)
        assert len(found) == 2, (lang, list(found))
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        for name, event in found.items():
            assert name in html  # the file name the mail prints is the one attached
            summary = str(event["SUMMARY"])
            assert summary.replace("&", "&amp;") in html  # in this language, not German
            assert event["SUMMARY"].params["LANGUAGE"] == lang
            assert str(event["LOCATION"]).startswith(("Auslandsgesellschaft", "Reinoldinum"))
            description = str(event["DESCRIPTION"])
            assert str(event["URL"]) in description.splitlines()
            assert str(event["URL"]).startswith("https://imag.example.org/")
            assert str(event["ORGANIZER"]) == "mailto:" + shipped.settings().sender.address
            assert int(event["SEQUENCE"]) > 0
            uids.setdefault(str(event["UID"]), set()).add(lang)
    assert len(uids) == 2 and all(langs == {"de", "tr", "ar"} for langs in uids.values())
    tr = entries(mail(shipped, NEWSLETTER, "tr"))
    assert "forum-integration-iyi-komsuluk-ne-ise-yariyor-ne-1.ics" in tr  # not mangled
    ar = entries(mail(shipped, NEWSLETTER, "ar"))
    assert "mawid-1.ics" in ar  # no Latin letters in the title: the language's word


def test_an_event_announced_in_two_campaigns_keeps_one_uid(shipped: Project) -> None:
    conference = {str(e["UID"]) for e in entries(mail(shipped, INVITATION, "de")).values()}
    newsletter = {str(e["UID"]) for e in entries(mail(shipped, NEWSLETTER, "de")).values()}
    assert len(conference) == 1 and conference <= newsletter
    assert conference == {f"event-integrationskonferenz-2027@{shipped.settings().msgid_domain}"}


def test_without_an_id_the_uid_is_per_campaign_and_an_edit_raises_the_sequence(
        project: Project) -> None:
    text = ("template: invitation\naudience: {lists: [partners]}\ncontent:\n"
            "  de:\n    subject: Treffen\n    blocks:\n"
            "      - event: {title: \"Treffen am Hafen\", start: \"2027-03-01 18:00\","
            " place: \"Hafen\", description: \"Mit **Tee**.\"}\n"
            "  tr:\n    subject: Buluşma\n    blocks:\n"
            "      - heading: Merhaba\n"
            "      - event: {title: \"Limanda buluşma\", start: \"2027-03-01 18:00\","
            " place: \"Hafen\"}\n")
    path = project.campaign("treffen.yaml", text)
    os.utime(path, (1_800_000_000, 1_800_000_000))
    (de,) = entries(mail(project, "treffen.yaml", "de")).values()
    (tr,) = entries(mail(project, "treffen.yaml", "tr")).values()
    assert str(de["UID"]) == str(tr["UID"]) == f"treffen-event-1@{project.settings().msgid_domain}"
    assert str(de["SUMMARY"]) == "Treffen am Hafen" and str(tr["SUMMARY"]) == "Limanda buluşma"
    assert str(de["DESCRIPTION"]).startswith("Mit Tee.")  # Markdown as text
    assert "/archive/treffen?lang=de" in str(de["DESCRIPTION"])  # no url: the online version
    assert de["DTSTART"].dt.isoformat() == "2027-03-01T17:00:00+00:00"
    before = int(de["SEQUENCE"])
    os.utime(path, (1_800_000_600, 1_800_000_600))  # edited ten minutes later
    (again,) = entries(mail(project, "treffen.yaml", "de")).values()
    assert int(again["SEQUENCE"]) == before + 10
    copy = project.campaign("treffen-2.yaml", Path(path).read_text(encoding="utf-8"))
    assert copy.exists()
    (other,) = entries(mail(project, "treffen-2.yaml", "de")).values()
    assert str(other["UID"]) != str(de["UID"])  # another campaign: give the event an id
