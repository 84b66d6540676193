"""The public archive reads as clean prose in every language: no one's data, no gaps where a
merge field was, `archive: false` stays private, and its unsubscribe link leads somewhere."""

from __future__ import annotations

import html as htmllib
import re

import pytest

from mailer.dispatch import start_run
from tests.conftest import REPO, Project
from tests.smtpd import fault_server  # noqa: F401  (fixture)
from tests.test_web import Site, make_site, q_sent_row, site  # noqa: F401  (fixtures)

SHIPPED = sorted(p.name for p in (REPO / "campaigns").glob("*.yaml"))


def mark_sent(site: Site, campaign_id: str) -> None:  # noqa: F811
    run, _ = start_run(site.store, campaign_id=campaign_id, occurrence="once", trigger="send",
                       recipients=[])
    with site.store.engine.begin() as conn:
        conn.execute(q_sent_row(run.id))


def visible(page: str) -> str:
    """What a reader sees: no head, styles or tags; entities decoded; spaces collapsed."""
    body = re.sub(r"(?s)<head.*?</head>|<style.*?</style>|<!--.*?-->", " ", page)
    body = re.sub(r"(?i)<(br|/?(p|div|td|tr|li|h[1-6]|table|ul|ol))\b[^>]*>", " ", body)
    text = htmllib.unescape(re.sub(r"<[^>]+>", "", body))  # inline tags join their words
    return " ".join(text.replace("\u00a0", " ").split())


GAPS = re.compile(r"\w\s+[,.!?؟،]|[,،]\s*[!.?]|\(\s*\)|\s{2,}")


@pytest.mark.parametrize("name", SHIPPED)
async def test_every_shipped_campaign_reads_cleanly_in_the_archive(
        project: Project, site: Site, name: str) -> None:  # noqa: F811
    from mailer.campaign import load_campaign

    path = project.root / "campaigns" / name
    path.write_bytes((REPO / "campaigns" / name).read_bytes())
    campaign = load_campaign(path, project.settings())
    mark_sent(site, campaign.id)
    for lang in campaign.languages:
        response = await site.client.get(f"/archive/{campaign.id}?lang={lang}")
        assert response.status_code == 200
        text = visible(response.text)
        gap = GAPS.search(text.replace(" – ", " ").replace(" — ", " "))
        assert gap is None, (lang, text[max(0, gap.start() - 40):gap.end() + 40])
        assert "@example.org" not in text.replace("@imag.example.org", "")
        greeting = {"de": "Guten Tag,", "en": "Hello,", "tr": "Merhaba,", "ar": "مرحبًا،"}[lang]
        assert greeting in text, (lang, text[:300])


ADDRESSED = """\
template: newsletter
audience: {lists: [people]}
content:
  de:
    subject: "Rundbrief"
    blocks:
      - heading: "Hallo {{ recipient.name }}"
      - text: "Feiern Sie mit uns, {{ recipient.name | default('Freundinnen und Freunde') }}!
          Aus {{ recipient.stadtteil | default('Ihrem Stadtteil', true) }} und {{
          recipient.verein }}."
  tr:
    subject: "Bülten"
    blocks:
      - heading: "Merhaba {{ recipient.name }}"
"""
PEOPLE = "email,name,language,stadtteil,verein\nzoe@example.org,Zoë Secret,de,Hörde,Eintracht\n"


async def test_merge_fields_read_neutrally_or_as_the_campaign_says(
        project: Project, site: Site) -> None:  # noqa: F811
    project.list_file("people.csv", PEOPLE)
    project.campaign("addressed.yaml", ADDRESSED)
    mark_sent(site, "addressed")
    german = visible((await site.client.get("/archive/addressed?lang=de")).text)
    assert "Hallo liebe Leserinnen und Leser" in german  # the language's neutral address
    assert "Feiern Sie mit uns, Freundinnen und Freunde!" in german  # the campaign's default
    assert "Aus Ihrem Stadtteil und ." in german  # no default given: empty, never someone's
    assert "Zoë" not in german and "Hörde" not in german and "Eintracht" not in german
    turkish = visible((await site.client.get("/archive/addressed?lang=tr")).text)
    assert "Merhaba sevgili okurlar" in turkish


async def test_a_campaign_can_stay_out_of_the_archive(project: Project,
                                                      site: Site) -> None:  # noqa: F811
    project.list_file("people.csv", PEOPLE)
    project.campaign("public.yaml", ADDRESSED)
    project.campaign("internal.yaml", ADDRESSED + "archive: false\n")
    mark_sent(site, "public")
    mark_sent(site, "internal")
    assert (await site.client.get("/archive/public")).status_code == 200
    assert (await site.client.get("/archive/internal")).status_code == 404
    index = (await site.client.get("/archive")).text
    assert "/archive/public" in index and "/archive/internal" not in index


async def test_the_archives_unsubscribe_link_leads_to_a_page_that_says_how(
        project: Project, site: Site) -> None:  # noqa: F811
    project.list_file("people.csv", PEOPLE)
    project.campaign("public.yaml", ADDRESSED)
    mark_sent(site, "public")
    for lang, words in (("de", "Zum Abmelden"), ("tr", "Abonelikten çıkmak")):
        page = (await site.client.get(f"/archive/public?lang={lang}")).text
        links = re.findall(r'href="([^"]*/unsubscribe[^"]*)"', page)
        assert links, "no unsubscribe link in the archive page"
        for link in {htmllib.unescape(x) for x in links}:
            response = await site.client.get(site.local(link))
            assert response.status_code == 200 and words in response.text
            mailto = re.search(r'href="mailto:([^"?]+)\?subject=', response.text)
            assert mailto and mailto.group(1) == project.settings().unsubscribe_mailto


async def test_a_test_send_never_makes_a_campaign_public(project: Project,
                                                         site: Site) -> None:  # noqa: F811
    from mailer.checks import check_campaign
    from mailer.sending import test_send

    project.list_file("people.csv", PEOPLE)
    path = project.campaign("draft.yaml", ADDRESSED)
    settings = project.settings(MAILER_SMTP_HOST=site.server.host,
                                MAILER_SMTP_PORT=str(site.server.port))
    results = await test_send(check_campaign(path, settings), settings, ["staff@example.org"])
    assert [sent for _, sent, _ in results] == [True] and len(site.server.messages) == 1
    assert (await site.client.get("/archive/draft")).status_code == 404
    assert "/archive/draft" not in (await site.client.get("/archive")).text
