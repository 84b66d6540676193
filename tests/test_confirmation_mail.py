"""The double opt-in confirmation mail: a branded mail from the campaign templates (MJML, text
part, Impressum) in every language of the web app, compiled once, filled per mail with an
untrusted name, and its long link wraps on a 375 px phone."""

from __future__ import annotations

import base64
import email
import email.policy
import os
from collections.abc import Iterator
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import dkim
import pytest
from markupsafe import escape

from mailer import render
from mailer.config import Settings, load_settings
from mailer.render import ui_strings
from mailer.tokens import Tokens
from mailer.web import i18n
from mailer.web.mails import confirmation_message, confirmation_url
from tests.conftest import REPO, Project
from tests.test_axe import AXE, RUN_AXE
from tests.test_browser import ARGS, CHROMIUM
from tests.test_compose import dkim_key

WEB_LANGUAGES = load_settings(REPO / "config.yaml",
                              env={"MAILER_SECRET_KEY": "x" * 8 + os.urandom(16).hex()}
                              ).web.languages
HOSTILE = "<script>alert(1)</script> {{ 7*7 }} {% raw %}\"Anna\" 'O'Brien'\r\nBcc: evil@example.org"


def build(settings: Settings, language: str, name: str = HOSTILE,
          address: str = "anna@example.org", url: str = "") -> tuple[EmailMessage, str]:
    url = url or confirmation_url(settings, Tokens(settings.secret()), email=address,
                                  lists=["newsletter"], nonce="n" * 22)
    data = confirmation_message(settings, email=address, name=name, language=language,
                                lists=["newsletter"], url=url)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg, url


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return html.get_content(), text.get_content()


class Links(HTMLParser):
    """Every <a href> with its text; the <html>/<body> attributes; the <h1> count."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.styles: dict[str, str] = {}  # a link's text → its style
        self.tags: dict[str, dict[str, str | None]] = {}
        self.h1 = 0
        self._open: list[list[str]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("html", "body"):
            self.tags[tag] = dict(attrs)
        self.h1 += tag == "h1"
        if tag == "a":
            self._open.append([dict(attrs).get("href") or "", dict(attrs).get("style") or ""])

    def handle_data(self, data: str) -> None:
        for link in self._open:
            link.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open:
            href, style, *text = self._open.pop()
            label = " ".join("".join(text).split())
            self.links.append((href, label))
            self.styles[label] = style


@pytest.mark.parametrize("language", WEB_LANGUAGES)
def test_every_web_language_is_a_branded_mail_with_both_parts(project: Project,
                                                              language: str) -> None:
    settings = project.settings()
    msg, url = build(settings, language)
    t, ui, org = i18n.strings(language), ui_strings(settings, language), settings.organisation
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    html, text = parts(msg)

    page = Links(html)
    direction = "rtl" if language == "ar" else "ltr"
    for tag in ("html", "body"):
        assert page.tags[tag].get("lang") == language and page.tags[tag].get("dir") == direction
    assert page.h1 == 1 and t["mail_subject"] in html
    # The header's wordmark and the Impressum of the footer, with its landmarks.
    assert '<span dir="ltr">IMAG</span>' in html and ui["tagline"] in html
    assert ui["impressum"] in html and org.street in html and f"{org.postcode} {org.city}" in html
    for role in ("banner", "main", "contentinfo"):
        assert f'role="{role}"' in html
    # The button and the link below it are the confirm URL; nothing else links anywhere but
    # the organisation's own mail address and website.
    button = [href for href, label in page.links if label == t["mail_button"]]
    assert button == [url]
    assert [label for href, label in page.links if href == url] == [t["mail_button"], url]
    # The link as text breaks anywhere, said inline (mail apps drop <style>); in the browser below.
    assert "overflow-wrap: anywhere" in page.styles[url]
    assert "word-break: break-all" in page.styles[url]
    others = {href for href, _ in page.links if href != url}
    assert others <= {f"mailto:{org.email}", org.website}, others
    # Transactional: no unsubscribe, preferences, view-online link or why-line, in either part.
    for word in ("unsubscribe", "preferences", "view_online", "why"):
        assert ui[word] not in html and ui[word] not in text, word
    assert "/unsubscribe/" not in html + text and "/archive/" not in html + text
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None

    # The text part says what the HTML says, the URL on a line of its own, the Impressum.
    lines = text.splitlines()
    assert url in lines and lines.count(url) == 1
    assert lines[0] == t["mail_subject"]
    for line in (t["mail_ignore"], t["mail_body"].split("{lists}")[0]):
        assert " ".join(line.split()) in " ".join(text.split())
    assert ui["impressum"] in lines and org.street in lines and org.name in lines
    # Headers of a transactional mail in the subscriber's language.
    assert msg["Content-Language"] == language
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == t["mail_subject"]
    assert msg["Message-ID"] and msg["Date"] and msg["Reply-To"] == settings.sender.reply_to
    (sender,) = msg["From"].addresses
    assert sender.addr_spec == settings.sender.address


@pytest.mark.parametrize("language", WEB_LANGUAGES)
def test_a_hostile_name_is_a_value_escaped_and_never_evaluated(project: Project,
                                                               language: str) -> None:
    settings = project.settings()
    msg, _ = build(settings, language)
    html, text = parts(msg)
    hello = i18n.strings(language)["mail_hello"].format(name=HOSTILE)
    assert str(escape(hello)) in html  # quotes too: &#34; &#39;
    assert "<script" not in html and "{{ 7*7 }}" in html  # verbatim, not 49
    # Plain text is not HTML: the name stands there verbatim (line ends aside).
    assert hello.replace("\r\n", "\n") in text.replace("\r\n", "\n")
    # No header injection: one To address, no Bcc.
    assert msg["Bcc"] is None
    (to,) = msg.get_all("To")
    assert [a.addr_spec for a in to.addresses] == ["anna@example.org"]


def test_compiled_once_per_language_then_filled_per_mail(project: Project,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = project.settings()
    compiled: list[str] = []
    real = render.mjml2html

    def counting(source: str, **kwargs: Any) -> str:
        compiled.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(render, "mjml2html", counting)
    first, url1 = build(settings, "de", name="Anna", address="anna@example.org")
    second, url2 = build(settings, "de", name="Bora", address="bora@example.org")
    assert len(compiled) == 1 and url1 != url2
    assert url2 in parts(second)[0] and "Guten Tag Bora," in parts(second)[1]
    assert url1 not in parts(second)[0] + parts(second)[1]
    build(settings, "tr")
    assert len(compiled) == 2  # another language: compiled once more
    build(settings, "tr", name="Cem")
    assert len(compiled) == 2
    # An edit under templates/ is seen by a running web app.
    footer = settings.templates_dir / "partials" / "footer.mjml.j2"
    footer.write_text(footer.read_text(encoding="utf-8").replace(
        "<strong>{{ t.impressum }}</strong>", "<strong>{{ t.impressum }} (geändert)</strong>"),
        encoding="utf-8")
    stat = footer.stat()
    os.utime(footer, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    edited, _ = build(settings, "de")
    assert len(compiled) == 3 and "Impressum (geändert)" in parts(edited)[0]


def test_a_language_the_web_app_has_no_texts_for_gets_german(project: Project) -> None:
    msg, _ = build(project.settings(), "pl")  # e.g. imported members confirmed from the CLI
    html, _ = parts(msg)
    assert msg["Content-Language"] == "de" and 'lang="de"' in html and "Impressum" in html


def test_dkim_signs_the_confirmation_mail(project: Project, tmp_path: Path) -> None:
    _, pub_der = dkim_key(project, tmp_path)
    settings = project.settings()
    url = confirmation_url(settings, Tokens(settings.secret()), email="a@example.org",
                           lists=["newsletter"], nonce="n" * 22)
    data = confirmation_message(settings, email="a@example.org", name="Zoë", language="ar",
                                lists=["newsletter"], url=url)
    assert data.startswith(b"DKIM-Signature:")
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub_der)
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record)
    assert not dkim.verify(data.replace(b"Content-Language: ar", b"Content-Language: de"),
                           dnsfunc=lambda name, timeout=5: record)


# --- in the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


@pytest.mark.browser
def test_the_long_link_wraps_on_a_phone_and_axe_finds_nothing(project: Project,
                                                              browser: Any) -> None:
    settings = project.settings()
    # The worst case of a real link: a token's hyphens are places a line may break; this one
    # has none (a real token has ~2 in 130 characters, often none in a phone's line).
    token = "".join(c for c in Tokens(settings.secret()).confirm(
        "a.long.name@example.org", ["newsletter"], "n" * 22) if c.isalnum()) * 2
    url = f"https://anmeldung.imag-dortmund.example.org/confirm/{token}"
    found: dict[str, Any] = {}
    for language in WEB_LANGUAGES:
        msg, _ = build(settings, language, url=url)
        html, _ = parts(msg)
        for width in (375, 600):
            page = browser.new_page(viewport={"width": width, "height": 900})
            try:
                page.route("**/*", lambda route: route.abort())
                page.set_content(html, wait_until="load")
                scroll = page.evaluate("document.scrollingElement.scrollWidth")
                assert scroll <= width + 1, f"{language} at {width}px: {scroll}px wide"
                link = page.locator(f'a[href="{url}"]').last
                box = link.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
                if AXE.exists():
                    page.add_script_tag(path=str(AXE))
                    found[f"{language} @ {width}px"] = page.evaluate(RUN_AXE)
            finally:
                page.close()
    assert {k: v for k, v in found.items() if v} == {}
