"""The text part in every language: its own quotation marks and comma, lines that wrap, and
URLs that no mail program extends into the punctuation after them."""

from __future__ import annotations

import re

import pytest

from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.render import SAMPLE_LINKS, markdown_to_text, personalise
from tests.conftest import REPO, Project

QUOTES = {"de": ("„", "“"), "en": ("“", "”"), "tr": ("“", "”"), "ar": ("«", "»"),
          "pl": ("„", "”"), "ru": ("«", "»"), "uk": ("«", "»")}
LONG_ALT = ("Lange Tische auf dem Nordmarkt: Nachbarinnen und Nachbarn jeden Alters essen "
            "gemeinsam beim multikulturellen Straßenfest")


def campaign(langs: list[str]) -> str:
    out = "template: newsletter\naudience: {lists: [partners]}\ncontent:\n"
    for lang in langs:
        out += (f"  {lang}:\n    subject: Test\n    blocks:\n"
                f"      - quote: {{text: \"Zitat {lang}\", author: IMAG}}\n"
                f"      - image: {{src: \"https://imag.example.org/a.jpg\", alt: \"{LONG_ALT}\","
                " href: \"https://imag.example.org/galerie/strassenfest-2026/nordmarkt\"}\n"
                "      - event: {title: Fest, start: \"2027-05-01 15:00\", end: \"2027-05-01 "
                "18:00\", place: Nordmarkt, address: \"Nordmarkt 1, 44145 Dortmund\"}\n")
    return out


def texts(project: Project, name: str, langs: list[str] | None = None) -> dict[str, str]:
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / name, settings, with_audience=False)
    out = {}
    for lang, lr in checked.rendition.languages.items():
        if langs is None or lang in langs:
            out[lang] = personalise(lr, Recipient("r@example.org", "Rana", lang),
                                    SAMPLE_LINKS).text
    return out


def test_quotation_marks_and_commas_are_the_languages_own(project: Project) -> None:
    project.campaign("q.yaml", campaign(list(QUOTES)))
    for lang, text in texts(project, "q.yaml").items():
        opening, closing = QUOTES[lang]
        assert f"  {opening}Zitat {lang}{closing}" in text.splitlines(), (lang, text)
        when = next(line for line in text.splitlines() if "2027" in line)
        if lang == "ar":
            assert "," not in when and "، " in when, when  # one Arabic comma style
            assert "Nordmarkt، Nordmarkt 1" in text
        else:
            assert "، " not in text and ", " in when


def test_long_labels_wrap_and_urls_stand_alone(project: Project) -> None:
    project.campaign("q.yaml", campaign(["de"]))
    text = texts(project, "q.yaml")["de"]
    for line in text.splitlines():
        assert len(line) <= 76 or re.fullmatch(r"(\S+: )?https?://\S+", line), line
    lines = text.splitlines()
    url = "https://imag.example.org/galerie/strassenfest-2026/nordmarkt"
    assert url in lines and lines[lines.index(url) - 1].endswith("]")


@pytest.mark.parametrize(("source", "expected"), [
    ("Die Bilder in der [Galerie](https://imag.example.org/g).",
     "Die Bilder in der Galerie: <https://imag.example.org/g>."),
    ("([Archiv](https://imag.example.org/a))", "(Archiv: <https://imag.example.org/a>)"),
    ("Die [Galerie](https://imag.example.org/g) ist offen.",
     "Die Galerie: https://imag.example.org/g ist offen."),
    ("[https://imag.example.org/g](https://imag.example.org/g).",
     "https://imag.example.org/g."),  # a bare URL stays as the author wrote it
])
def test_a_url_is_never_followed_by_punctuation(source: str, expected: str) -> None:
    assert markdown_to_text(source) == expected + "\n"


def test_shipped_arabic_text_part(project: Project) -> None:
    name = "wir-alle-sind-dortmund-2026-12.yaml"
    (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    text = texts(project, name, ["ar"])["ar"]
    assert "„" not in text and "“" not in text
    assert not re.search(r"https?://[^\s>]*[.,)]\s", text), "a URL runs into punctuation"
    for line in text.splitlines():
        assert len(line) <= 76 or re.fullmatch(r"(\S+( \S+)*: )?<?https?://\S+", line), line
