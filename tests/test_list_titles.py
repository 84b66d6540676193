"""Lists as people read them: a title per language from config, never the internal file name,
no quotation marks nested in quotation marks."""

from __future__ import annotations

import email
import email.policy
import html as htmllib

import pytest

from mailer.config import load_settings
from mailer.errors import ConfigError
from mailer.web.i18n import list_title
from tests.conftest import Project
from tests.smtpd import fault_server  # noqa: F401  (fixture)
from tests.test_web import Site, make_site, site  # noqa: F401  (fixtures)


@pytest.mark.parametrize(("lang", "title"), [
    ("de", "Verteiler der Partnerorganisationen"),
    ("tr", "Ortak kuruluşlar dağıtım listesi"),
    ("ar", "قائمة المنظمات الشريكة"),
])
async def test_the_unsubscribe_page_names_the_list_by_its_title(
        site: Site, lang: str, title: str) -> None:  # noqa: F811
    page = await site.client.get(site.manage_path("p@example.org", "partners") + f"?lang={lang}")
    text = htmllib.unescape(page.text)
    assert page.status_code == 200 and title in text
    assert "partners" not in text.replace("/partners", "")  # not the internal name
    for nested in ("„„", "““", "«„", "„“", "«»"):
        assert nested not in text


def test_a_title_falls_back_to_the_first_language_then_to_a_neutral_name(
        project: Project) -> None:
    settings = project.settings()
    assert list_title("partners", "pl", settings.lists) == "Verteiler der Partnerorganisationen"
    assert list_title("newsletter", "en", settings.lists) == "IMAG newsletter"
    unnamed = list_title("kita-eltern-2027", "de", settings.lists)
    assert "kita" not in unnamed and unnamed == "Verteiler des Trägerkreises IMAG"


async def test_the_confirmation_mail_names_the_lists_by_title(
        project: Project, make_site) -> None:  # noqa: F811
    config = project.config.read_text(encoding="utf-8")
    project.config.write_text(config.replace('en: "IMAG newsletter"', 'en: "IMAG monthly letter"'),
                              encoding="utf-8")
    site = await make_site()  # noqa: F811
    await site.subscribe("anna@example.org", language="en")
    (received,) = site.server.messages
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "IMAG monthly letter" in text


def test_a_list_title_must_be_one_line(project: Project) -> None:
    config = project.config.read_text(encoding="utf-8")
    project.config.write_text(config.replace('title: {de: "IMAG-Newsletter"',
                                             'title: {de: "IMAG-\\nNewsletter"', 1),
                              encoding="utf-8")
    with pytest.raises(ConfigError, match="one line"):
        load_settings(project.config, env=project.env)
