"""The mail's HTML as assistive technology and mail apps read it (mailer/htmlcraft.py and the
layouts): one <h1>, heading levels in order, landmarks, <body lang dir>, a preheader hidden
without tiny white text, text-block styles inlined with @media kept in <head>, merge fields
intact."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mailer import htmlcraft
from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.render import Links, personalise
from tests.conftest import REPO, Project

SHIPPED = sorted(p.name for p in (REPO / "campaigns").glob("*.yaml"))
LINKS = Links(unsubscribe="https://imag.example.org/u/T0K", preferences="https://imag.example.org/p",
              view_online="https://imag.example.org/v")
VOID = htmlcraft.VOID


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    roles: tuple[str, ...]  # the roles of its ancestors and its own
    text: list[str] = field(default_factory=list)


class Outline(HTMLParser):
    """Headings, landmarks and styled elements of a mail, each with the roles around it."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.stack: list[Node] = []
        self.nodes: list[Node] = []
        self.styles: list[str] = []  # the text of every <style> outside comments
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        roles = self.stack[-1].roles if self.stack else ()
        node = Node(tag, values, (*roles, values["role"]) if "role" in values else roles)
        self.nodes.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node.text.append(data)
        if self.stack and self.stack[-1].tag == "style":
            self.styles.append(data)

    def headings(self) -> list[tuple[int, str, tuple[str, ...]]]:
        return [(int(n.tag[1]), " ".join("".join(n.text).split()), n.roles)
                for n in self.nodes if re.fullmatch(r"h[1-6]", n.tag)]

    def first(self, tag: str) -> Node:
        return next(n for n in self.nodes if n.tag == tag)

    def with_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.attrs.get("role") == role]


def mails(project: Project, name: str, *, person: Recipient | None = None) -> dict[str, str]:
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / name, settings)
    person = person or Recipient(email="leyla@example.org", name="Leyla Demir")
    return {lang: personalise(lr, person, LINKS).html
            for lang, lr in checked.rendition.languages.items()}


@pytest.fixture
def shipped(project: Project) -> Project:
    for name in SHIPPED:
        (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    return project


def check_headings(html: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """Exactly one h1, first; no level skipped; no heading text twice; all inside main."""
    heads = Outline(html).headings()
    assert [h for h in heads if h[0] == 1] == heads[:1], heads
    for (before, _, _), (level, text, _) in zip(heads, heads[1:], strict=False):
        assert level <= before + 1, f"h{before} → h{level} ({text})"
    texts = [t.casefold() for _, t, _ in heads]
    assert len(set(texts)) == len(texts), heads
    for (before, outer, _), (level, inner, _) in zip(heads, heads[1:], strict=False):
        if level == before + 1 == 3:  # an h3 right under its h2 says something new
            assert inner.casefold() not in outer.casefold(), (outer, inner)
    assert all("main" in roles for _, _, roles in heads), heads
    return heads


@pytest.mark.parametrize("name", SHIPPED)
def test_one_h1_the_visible_title_and_levels_in_order(shipped: Project, name: str) -> None:
    for lang, html in mails(shipped, name).items():
        heads = check_headings(html)
        assert heads[0][0] == 1 and heads[0][1], (lang, heads)
        assert len(heads) >= 3, (lang, heads)


def test_the_titles_of_the_shipped_layouts(shipped: Project) -> None:
    titles = {name: Outline(mails(shipped, name)["de"]).headings()[0][1] for name in SHIPPED}
    assert titles == {
        "dortmund-ist-heymat.yaml": "Dortmund ist Heymat",  # campaign: the hero band
        "integrationskonferenz-2027.yaml": "4. Dortmunder Integrationskonferenz",  # the event
        "wir-alle-sind-dortmund-2026-12.yaml": "Wir ALLE sind Dortmund",  # the leading heading
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_body_lang_dir_and_landmarks(shipped: Project, name: str) -> None:
    for lang, html in mails(shipped, name).items():
        outline = Outline(html)
        root, body = outline.first("html"), outline.first("body")
        assert (body.attrs.get("lang"), body.attrs.get("dir")) == (
            root.attrs["lang"], root.attrs["dir"]) == (lang, "rtl" if lang == "ar" else "ltr")
        banner, main, info = (outline.with_role(r) for r in ("banner", "main", "contentinfo"))
        assert len(banner) == len(main) == len(info) == 1, lang
        assert "IMAG" in "".join(banner[0].text)
        assert "Jägerstraße 5" in "".join(info[0].text)  # the Impressum
        assert LINKS.unsubscribe in html
        # Nothing of the mail outside the three (the hidden preheader aside); no name on the
        # article (axe counts it as content outside the landmarks).
        article = outline.with_role("article")[0]
        inside = "".join(banner[0].text + main[0].text + info[0].text)
        outside = "".join(article.text).replace(inside, "")
        assert " ".join(outside.split()).startswith(" ".join(preheader(html).split())[:40])
        assert "aria-label" not in article.attrs


def preheader(html: str) -> str:
    hidden = [n for n in Outline(html).nodes if "display:none" in n.attrs.get("style", "")]
    assert len(hidden) == 1
    return "".join(hidden[0].text)


@pytest.mark.parametrize("name", SHIPPED)
def test_preheader_hidden_without_tiny_white_text(shipped: Project, name: str) -> None:
    settings = shipped.settings()
    campaign = check_campaign(settings.campaigns_dir / name, settings).campaign
    for lang, html in mails(shipped, name).items():
        style = next(n.attrs["style"] for n in Outline(html).nodes
                     if "display:none" in n.attrs.get("style", ""))
        assert {"max-height:0", "overflow:hidden", "mso-hide:all"} <= set(style.split(";"))
        assert "color" not in style and "font-size" not in style and "opacity" not in style
        assert not re.search(r"color:\s*#fff(fff)?\b[^\"]*font-size:\s*1px", html)
        text = preheader(html)
        assert text.startswith(campaign.content[lang].preheader)
        assert text.count("\u034f") >= 50  # padding, so no body text follows in the inbox
        assert html.count(campaign.content[lang].preheader) == 1


@pytest.mark.parametrize("name", SHIPPED)
def test_text_styles_are_inlined_and_media_queries_stay(shipped: Project, name: str) -> None:
    for html in mails(shipped, name).values():
        outline = Outline(html)
        head = "".join(outline.styles)
        assert "@media only screen and (max-width: 480px)" in head
        assert ".mj-column-per-100" in head and ".moz-text-html" in head  # MJML's own blocks
        # Inlined rules leave <head>; a rule that matched nothing in this mail may stay.
        assert ".imag-text p {" not in head and ".imag-text li {" not in head
        styles = [(n.tag, n.attrs.get("style", "")) for n in outline.nodes]
        assert ("p", "margin: 0 0 14px;") in styles
        assert ("p", "margin: 0 0 14px;margin-bottom: 0;") in styles  # :last-child
        assert ("li", "margin: 0 0 6px;") in styles
        if name.startswith("wir-alle"):  # the gallery link in a text block
            assert ("a", "color: #0e4a56;text-decoration: underline;") in styles


STAFF = """\
template: newsletter
audience: {lists: [people]}
content:
  de:
    subject: "Hallo {{ recipient.name }}"
    preheader: "Für {{ recipient.name }}"
    blocks:
      - text: |
          # Groß geschrieben

          Guten Tag **{{ recipient.name }}**,
          [Ihr Profil](https://imag.example.org/p?m={{ recipient.email }}).
      - event:
          id: fest
          title: "Straßenfest"
          start: "2027-06-12 15:00"
          place: "Nordmarkt"
      - heading: "Zum Vormerken: Straßenfest 2027"
      - text: "### Unterpunkt"
      - event:
          id: fest-2027
          title: "Straßenfest 2027"
          start: "2027-06-13 15:00"
          place: "Nordmarkt"
          description: "# Programm\\n\\nMusik"
"""


def test_staff_headings_and_repeated_event_titles_keep_the_order(project: Project) -> None:
    project.list_file("people.csv", "email,name\na@example.org,A\n")
    project.campaign("staff.yaml", STAFF)
    person = Recipient(email="x&y@example.org", name="Zoë <b>&</b>")
    html = mails(project, "staff.yaml", person=person)["de"]
    heads = check_headings(html)
    assert [(level, text) for level, text, _ in heads] == [
        (1, "Hallo Zoë <b>&</b>"),  # no leading heading block: the subject is the title
        (2, "Groß geschrieben"),  # staff's "#" below the title
        (2, "Straßenfest"),  # an event under no section heading
        (2, "Zum Vormerken: Straßenfest 2027"),
        (3, "Unterpunkt"),
        (3, "Programm"),  # the event title repeats the heading: a plain line, not a heading
    ]
    assert re.search(r'<p style="[^"]*font-weight:700[^"]*">Straßenfest 2027</p>', html)
    # Merge fields survive MJML and the inliner, in text, attributes and the preheader.
    assert "Guten Tag <strong>Zoë &lt;b&gt;&amp;&lt;/b&gt;</strong>,\n<a" in html
    assert 'href="https://imag.example.org/p?m=x&amp;y@example.org"' in html
    assert preheader(html).startswith("Für Zoë <b>&</b>")
    assert "Mf7q" not in html and "{{" not in html


def test_finish_keeps_placeholders_and_refuses_scattered_landmarks() -> None:
    page = ('<!doctype html><html lang="tr" dir="ltr"><head><style>/* imag:inline */ '
            '.imag-text a { color: #0e4a56; } @media (max-width: 480px) { a { color: red; } }'
            '</style></head><body><div role="article" aria-label="x">'
            '<div class="imag-banner">B</div>'
            '<div class="imag-text"><a href="Mf7q3q7fM">Mf7q4q7fM</a></div>'
            '<!--[if mso | IE]><table><tr><td><![endif]--><div class="imag-contentinfo">F</div>'
            '<!--[if mso | IE]></td></tr></table><![endif]--></div></body></html>')
    out = htmlcraft.finish(page)
    assert out.startswith("<!doctype html>")
    assert '<body lang="tr" dir="ltr">' in out
    assert '<a href="Mf7q3q7fM" style="color: #0e4a56;">Mf7q4q7fM</a>' in out
    assert "@media (max-width: 480px)" in out and ".imag-text a {" not in out
    assert ('<div role="contentinfo"><!--[if mso | IE]><table><tr><td><![endif]-->'
            '<div class="imag-contentinfo">F</div><!--[if mso | IE]></td></tr></table>'
            '<![endif]--></div>') in out
    assert '<div role="banner"><div class="imag-banner">B</div></div><div role="main">' in out
    with pytest.raises(htmlcraft.LayoutError):
        htmlcraft.finish(page.replace('<div class="imag-text">',
                                      '<div class="imag-contentinfo">0</div><div class="x">')
                         .replace('<div class="imag-banner">B</div>', "")
                         .replace("</div></body>", '<div class="imag-banner">B</div></div></body>'))
    with pytest.raises(htmlcraft.LayoutError):
        htmlcraft.finish(page.replace('<div class="imag-text">',
                                      '<div class="imag-contentinfo">0</div><p>between</p>'
                                      '<div class="imag-text">'))


def test_the_shipped_layouts_stay_under_gmail_clipping(shipped: Project, tmp_path: Path) -> None:
    for name in SHIPPED:
        for lang, html in mails(shipped, name).items():
            assert len(html.encode("utf-8")) < 102_000 * 0.9, (name, lang)
