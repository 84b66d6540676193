"""Rendering and composing: the shipped campaigns, as subscribers' mail programs will see them."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailer.audience import Recipient
from mailer.campaign import campaign_files
from mailer.checks import check_campaign
from mailer.compose import Composer, message_id
from mailer.preview import write_preview
from mailer.tokens import Tokens
from tests.conftest import REPO, Project

SHIPPED = sorted(p.name for p in (REPO / "campaigns").glob("*.yaml"))


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@pytest.fixture
def shipped(project: Project) -> Project:
    for name in SHIPPED:
        (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    return project


def test_there_are_three_sample_campaigns() -> None:
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("name", SHIPPED)
def test_preview_of_every_shipped_campaign(shipped: Project, tmp_path: Path, name: str) -> None:
    settings = shipped.settings()
    files = write_preview(settings, name.removesuffix(".yaml"), tmp_path, langs=[],
                          recipient=None, png=False)
    checked = check_campaign(settings.campaigns_dir / name, settings)
    for lang in checked.campaign.languages:
        stem = f"{checked.campaign.id}.{lang}"
        html = (tmp_path / f"{stem}.html").read_text(encoding="utf-8")
        text = (tmp_path / f"{stem}.txt").read_text(encoding="utf-8")
        assert "{{" not in html and "{%" not in html and "Mf7q" not in html
        assert "{{" not in text and "Mf7q" not in text
        assert "/unsubscribe/" in html and "/unsubscribe/" in text
        assert "Jägerstraße 5" in html and "44145 Dortmund" in text  # the Impressum
        msg = parse((tmp_path / f"{stem}.eml").read_bytes())
        assert msg["Content-Language"] == lang
        body = msg.get_body(("html",))
        plain = msg.get_body(("plain",))
        assert body is not None and plain is not None
        assert body.get_content_charset() == "utf-8" and plain.get_content_charset() == "utf-8"
        alternative = next(p for p in msg.walk() if p.get_content_type() ==
                           "multipart/alternative")
        assert [p.get_content_type() for p in alternative.iter_parts()] == [
            "text/plain", "text/html"]
        if lang == "ar":
            assert 'dir="rtl"' in html and 'lang="ar"' in html
    assert len(files) == 3 * len(checked.campaign.languages)


def test_invitation_has_a_calendar_attachment(shipped: Project) -> None:
    settings = shipped.settings()
    checked = check_campaign(settings.campaigns_dir / "integrationskonferenz-2027.yaml", settings)
    composer = Composer(checked.rendition, settings, tokens=Tokens("k"))
    msg = parse(composer.compose(next(iter(checked.recipients)), message_id="<a@b>").data)
    assert msg.get_content_type() == "multipart/mixed"
    (ics,) = [p for p in msg.iter_attachments() if p.get_content_type() == "text/calendar"]
    assert ics.get_filename().endswith(".ics")
    content = ics.get_content()
    assert "BEGIN:VEVENT" in content and "DTSTART:20270" in content


def test_dates_are_formatted_per_language(shipped: Project) -> None:
    settings = shipped.settings()
    checked = check_campaign(settings.campaigns_dir / "integrationskonferenz-2027.yaml", settings)
    composer = Composer(checked.rendition, settings, tokens=Tokens("k"))
    de = Recipient(email="a@example.org", name="A", language="de", list="partners")
    text = parse(composer.compose(de, message_id="<a@b>").data).get_body(("plain",))
    assert text is not None
    assert "Samstag, 13. Februar 2027" in text.get_content() and "Uhr" in text.get_content()


CAMPAIGN = """\
template: newsletter
audience: {lists: [people]}
content:
  de:
    subject: "Hallo {{ recipient.name }}"
    blocks:
      - heading: "Liebe {{ recipient.name }}"
      - text: "Ihr Stadtteil: {{ recipient.stadtteil }}. Mehr im [Programm](https://imag.example.org/p)."
      - button: {label: "Anmelden", url: "https://imag.example.org/a"}
  tr:
    subject: "Merhaba {{ recipient.name }}"
    blocks:
      - heading: "Sevgili {{ recipient.name }}"
"""


@pytest.fixture
def people(project: Project) -> Project:
    project.list_file("people.csv", "email,name,language,stadtteil\n"
                                    "a@example.org,Ayşe,tr,Nordstadt\n")
    project.campaign("people.yaml", CAMPAIGN)
    return project


def composer_for(project: Project) -> Composer:
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "people.yaml", settings)
    return Composer(checked.rendition, settings, tokens=Tokens("k"))


def test_recipient_fields_cannot_inject_markup_or_headers(people: Project) -> None:
    composer = composer_for(people)
    evil = Recipient(email="x@example.org", name="<b>Eve</b>\r\nBcc: victim@example.org",
                     language="de", fields={"stadtteil": "<script>alert(1)</script>"},
                     list="people")
    data = composer.compose(evil, message_id=message_id(domain="imag.example.org")).data
    msg = parse(data)
    assert msg.get("Bcc") is None
    assert b"\r\nBcc:" not in data.split(b"\r\n\r\n", 1)[0]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>Eve</b>" not in html and "&lt;b&gt;Eve&lt;/b&gt;" in html


def test_language_choice_and_merge_fields(people: Project) -> None:
    composer = composer_for(people)
    tr = Recipient(email="a@example.org", name="Ayşe", language="tr", list="people")
    pl = Recipient(email="b@example.org", name="Bożena", language="pl",
                   fields={"stadtteil": "Hörde"}, list="people")
    assert parse(composer.compose(tr, message_id="<1@x>").data)["Subject"] == "Merhaba Ayşe"
    msg = parse(composer.compose(pl, message_id="<2@x>").data)
    assert msg["Subject"] == "Hallo Bożena" and msg["Content-Language"] == "de"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Ihr Stadtteil: Hörde" in text
    assert "Programm: <https://imag.example.org/p>." in text  # "label: url", delimited before "."
    assert "Anmelden: https://imag.example.org/a" in text


def test_long_lines_are_wrapped_for_smtp(people: Project) -> None:
    composer = composer_for(people)
    r = Recipient(email="a@example.org", name="A" * 300, language="de",
                  fields={"stadtteil": "x" * 2000}, list="people")
    data = composer.compose(r, message_id="<1@x>").data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert parse(data)["Subject"] == "Hallo " + "A" * 300


def test_campaign_files_are_found(shipped: Project) -> None:
    assert [p.name for p in campaign_files(shipped.settings())] == SHIPPED


def test_event_description_reads_well_in_both_parts(project: Project) -> None:
    project.list_file("people.csv", "email,name\na@example.org,A\n")
    project.campaign("fest.yaml", """\
template: invitation
audience: {lists: [people]}
content:
  de:
    subject: "Straßenfest"
    blocks:
      - event: {title: "Interkulturelles Straßenfest", start: "2027-06-12 14:00",
                end: "2027-06-12 20:00", place: "Nordmarkt",
                description: "Mit **Musik** und dem [Programm](https://imag.example.org/fest)."}
""")
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "fest.yaml", settings)
    composer = Composer(checked.rendition, settings, tokens=Tokens("k"))
    msg = parse(composer.compose(next(iter(checked.recipients)), message_id="<1@x>").data)
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Mit Musik und dem Programm: <https://imag.example.org/fest>." in text
    assert "<strong>Musik</strong>" in html and "Samstag, 12. Juni 2027" in text


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_preview_png_at_desktop_and_phone_width(project: Project, tmp_path: Path) -> None:
    import struct

    project.list_file("people.csv", "email,name\na@example.org,A\n")
    project.campaign("p.yaml", "template: newsletter\naudience: {lists: [people]}\n"
                               "content: {ar: {subject: x, blocks: [{heading: مرحبا}]}}\n")
    files = write_preview(project.settings(), "p", tmp_path, langs=[], recipient=None, png=True)
    widths = {}
    for path in files:
        if path.suffix == ".png":
            header = path.read_bytes()[:24]
            assert header[:8] == b"\x89PNG\r\n\x1a\n"
            widths[path.name] = struct.unpack(">I", header[16:20])[0]
    assert widths == {"p.ar.600.png": 600, "p.ar.375.png": 375}
