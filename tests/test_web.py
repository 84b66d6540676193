"""The subscriber web app, in-process over ASGI, with a real aiosmtpd server for the mails."""

from __future__ import annotations

import email
import email.policy
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select

from mailer import subscribers as subs
from mailer.config import Settings
from mailer.store import Store, open_store
from mailer.store.subscriber_tables import confirm_nonces, consent_events, subscribers
from mailer.store.tables import suppressions
from mailer.tokens import Tokens
from mailer.transport import SmtpPool
from mailer.web import create_app
from tests.conftest import Project, both_databases
from tests.smtpd import FaultServer, fault_server  # noqa: F401  (fixture)

CLIENT_IP = "203.0.113.7"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
URL_RE = re.compile(r"(http://127\.0\.0\.1:8000/confirm/\S+)")


@dataclass
class Site:
    client: httpx.AsyncClient
    server: FaultServer
    settings: Settings
    store: Store
    tokens: Tokens

    async def form(self, path: str = "/subscribe") -> str:
        response = await self.client.get(path)
        assert response.status_code == 200
        match = CSRF_RE.search(response.text)
        assert match, "the form has no CSRF field"
        return match.group(1)

    async def subscribe(self, address: str, **fields: Any) -> httpx.Response:
        data = {"csrf": await self.form(), "email": address, "name": "", "language": "de",
                "lists": ["newsletter"], **fields}
        return await self.client.post("/subscribe", data=data)

    def count(self, table: Any) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def confirmation_urls(self) -> list[str]:
        urls = []
        for received in self.server.messages:
            msg = email.message_from_bytes(received.content, policy=email.policy.default)
            text = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
            urls += URL_RE.findall(text)
        return urls

    def local(self, url: str) -> str:
        return url.replace(self.settings.base_url, "")

    def manage_path(self, address: str, list_name: str, page: str = "unsubscribe") -> str:
        return f"/{page}/{self.tokens.manage(address, list_name, 'test-campaign')}"

    def status(self, address: str) -> dict[str, str]:
        with self.store.engine.connect() as conn:
            sub = subs.find_subscriber(conn, address.lower())
            return subs.statuses(conn, int(sub["id"])) if sub else {}


@pytest.fixture
async def site(project: Project, fault_server) -> AsyncIterator[Site]:  # noqa: F811
    server = await fault_server()
    settings = project.settings()
    store = open_store(settings.database_url)
    pool = SmtpPool(settings.smtp, host=server.host, port=server.port)
    app = create_app(settings, store=store, transport=pool)
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40000))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://testserver") as client:
        yield Site(client, server, settings, store, Tokens(settings.secret()))
    await pool.aclose()
    store.dispose()


# --- double opt-in --------------------------------------------------------------------------


@both_databases
async def test_subscribe_confirm_and_confirm_again(site: Site):
    response = await site.subscribe("Anna.Schmidt@Example.org", name="Anna Schmidt",
                                    language="tr")
    assert response.status_code == 200 and "Fast geschafft" in response.text
    assert site.status("anna.schmidt@example.org") == {"newsletter": "pending"}
    (received,) = site.server.messages
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert msg["Subject"] == "Lütfen aboneliğinizi onaylayın"  # the chosen language
    assert msg["Content-Language"] == "tr" and msg["Message-ID"] and msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    (url,) = site.confirmation_urls()

    confirmed = await site.client.get(site.local(url))
    assert confirmed.status_code == 200 and 'lang="tr"' in confirmed.text
    assert site.status("anna.schmidt@example.org") == {"newsletter": "subscribed"}
    again = await site.client.get(site.local(url))  # confirming twice is harmless
    assert again.status_code == 200
    with site.store.engine.connect() as conn:
        events = [dict(r._mapping) for r in conn.execute(select(consent_events))]
        members = subs.members(conn, "newsletter")
    assert [e["event"] for e in events] == ["subscribed", "confirmed"]
    assert events[0]["ip"] == CLIENT_IP and events[0]["form_version"]
    assert "Trägerkreises IMAG" in events[0]["form_text"]  # the text they agreed to
    assert [m.email for m in members] == ["Anna.Schmidt@example.org"]
    assert members[0].language == "tr" and members[0].name == "Anna Schmidt"


async def test_same_answer_for_new_and_known_addresses(site: Site):
    first = await site.subscribe("known@example.org")
    await site.client.get(site.local(site.confirmation_urls()[0]))
    second = await site.subscribe("known@example.org")
    third = await site.subscribe("new@example.org")
    strip = lambda r: CSRF_RE.sub("", r.text)  # noqa: E731
    assert first.status_code == second.status_code == third.status_code == 200
    assert strip(first) == strip(second) == strip(third)


async def test_pages_carry_security_headers(site: Site):
    for path in ("/subscribe", "/unsubscribe/broken", "/nowhere"):
        response = await site.client.get(path)
        headers = response.headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none'
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
    cookie = (await site.client.get("/subscribe")).headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


# --- bad input: rejected cleanly, nothing written -------------------------------------------


@pytest.mark.parametrize("fields", [
    {"email": "not-an-address"},
    {"email": "a@b"},
    {"email": "x" * 250 + "@example.org"},
    {"email": "evil@example.org\r\nBcc: victim@example.org"},
    {"name": "Eve\r\nBcc: victim@example.org"},
    {"name": "<script>alert(1)</script>"},
    {"name": "x" * 201},
    {"language": "xx"},
    {"lists": ["partners"]},
    {"lists": []},
], ids=["syntax", "no-domain", "overlong", "crlf-address", "crlf-name", "html-name",
        "overlong-name", "language", "foreign-list", "no-list"])
async def test_bad_input_is_rejected_and_nothing_written(site: Site, fields: dict[str, Any]):
    address = fields.pop("email", "ok@example.org")
    response = await site.subscribe(address, **fields)
    assert response.status_code == 400
    assert 'class="error"' in response.text  # the field says what is wrong
    assert "<script>alert" not in response.text  # echoed values are escaped
    assert site.count(subscribers) == site.count(consent_events) == 0
    assert site.count(confirm_nonces) == 0 and site.server.messages == []


async def test_form_without_csrf_token_or_cookie_is_refused(site: Site):
    data = {"email": "replay@example.org", "language": "de", "lists": "newsletter"}
    assert (await site.client.post("/subscribe", data=data)).status_code == 403
    token = await site.form()
    # The same form replayed by a client without the cookie (another site, a script).
    async with httpx.AsyncClient(transport=site.client._transport,
                                 base_url="http://testserver") as stranger:
        replay = await stranger.post("/subscribe", data={**data, "csrf": token})
    assert replay.status_code == 403
    forged = TimestampSigner("another key", salt="imag-mailer.csrf").sign("x" * 24).decode()
    site.client.cookies.set("imag_csrf", "x" * 24)
    assert (await site.client.post("/subscribe", data={**data, "csrf": forged})).status_code == 403
    assert site.count(subscribers) == 0 and site.server.messages == []


async def test_honeypot_gets_the_neutral_answer_and_nothing_else(site: Site):
    response = await site.subscribe("bot@example.org", website="http://spam.example")
    assert response.status_code == 200 and "Fast geschafft" in response.text
    assert site.count(subscribers) == 0 and site.server.messages == []


async def test_a_burst_of_100_from_one_ip_is_cut_off(site: Site):
    token = await site.form()
    codes = []
    for i in range(100):
        response = await site.client.post("/subscribe", data={
            "csrf": token, "email": f"bomb{i}@example.org", "language": "de",
            "lists": "newsletter"})
        codes.append(response.status_code)
    assert codes[:20] == [200] * 20 and set(codes[20:]) == {429}
    assert site.count(subscribers) == 20 and len(site.server.messages) == 20


async def test_one_address_gets_at_most_three_confirmation_mails_a_day(site: Site):
    answers = {(await site.subscribe("victim@example.org")).status_code for _ in range(8)}
    assert answers == {200}
    assert len(site.server.messages) == 3


# --- tokens ---------------------------------------------------------------------------------


async def test_tampered_expired_and_foreign_tokens_change_nothing(site: Site):
    await site.subscribe("t@example.org")
    (url,) = site.confirmation_urls()
    path = site.local(url)
    tampered = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    old = URLSafeTimedSerializer(site.settings.secret(), salt="imag-mailer.confirm",
                                 signer=_EightDaysAgo)
    with site.store.engine.connect() as conn:
        nonce = conn.execute(select(confirm_nonces.c.nonce)).scalar_one()
    expired = "/confirm/" + old.dumps(["t@example.org", ["newsletter"], nonce])
    foreign = "/confirm/" + site.tokens.manage("t@example.org", "newsletter")
    for bad in (tampered, expired, foreign, "/confirm/" + "A" * 5000):
        response = await site.client.get(bad)
        assert response.status_code == 400 and "nicht" in response.text
    assert site.status("t@example.org") == {"newsletter": "pending"}
    confirm_token = path.rsplit("/", 1)[1]
    for method in ("GET", "POST"):
        response = await site.client.request(method, f"/unsubscribe/{confirm_token}",
                                             data={"List-Unsubscribe": "One-Click"})
        assert response.status_code == 400
    assert site.count(suppressions) == 0


class _EightDaysAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 8 * 24 * 3600


# --- unsubscribe ----------------------------------------------------------------------------


async def _subscribed(site: Site, address: str) -> None:
    await site.subscribe(address)
    await site.client.get(site.local(site.confirmation_urls()[-1]))


@both_databases
async def test_one_click_unsubscribe_needs_no_cookie_and_is_idempotent(site: Site):
    await _subscribed(site, "leave@example.org")
    path = site.manage_path("leave@example.org", "newsletter")
    async with httpx.AsyncClient(transport=site.client._transport,
                                 base_url="http://testserver") as mail_client:
        for _ in range(2):  # RFC 8058 §3.2: a POST with this body, no cookies, 2xx
            response = await mail_client.post(path, content=b"List-Unsubscribe=One-Click",
                                              headers={"content-type":
                                                       "application/x-www-form-urlencoded"})
            assert response.status_code == 200
    assert site.status("leave@example.org") == {"newsletter": "unsubscribed"}
    with site.store.engine.connect() as conn:
        events = [(r.event, r.source) for r in conn.execute(select(consent_events))]
        assert subs.members(conn, "newsletter") == []
    assert events[-1] == ("unsubscribed", "one-click") and len(events) == 3


async def test_unsubscribe_page_has_one_button_and_needs_csrf(site: Site):
    await _subscribed(site, "page@example.org")
    path = site.manage_path("page@example.org", "newsletter")
    page = await site.client.get(path)
    assert page.status_code == 200 and page.text.count("<button") == 1
    assert (await site.client.post(path, data={})).status_code == 403
    assert site.status("page@example.org") == {"newsletter": "subscribed"}
    token = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    done = await site.client.post(path, data={"csrf": token})
    assert done.status_code == 200 and "abgemeldet" in done.text
    assert site.status("page@example.org") == {"newsletter": "unsubscribed"}


async def test_unsubscribe_from_a_file_list_is_a_list_suppression(site: Site):
    path = site.manage_path("partner@example.org", "partners")
    response = await site.client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200
    with site.store.engine.connect() as conn:
        rows = [(r.email_key, r.list_name, r.reason) for r in conn.execute(select(suppressions))]
    assert rows == [("partner@example.org", "partners", "unsubscribed")]


# --- preferences ----------------------------------------------------------------------------


async def test_preferences_change_language_and_unsubscribe_all(site: Site):
    await _subscribed(site, "prefs@example.org")
    path = site.manage_path("prefs@example.org", "newsletter", page="preferences")
    page = await site.client.get(path)
    assert page.status_code == 200 and 'lang="de"' in page.text
    token = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    saved = await site.client.post(path, data={"csrf": token, "language": "ar",
                                               "lists": "newsletter", "action": "save"})
    assert saved.status_code == 200 and 'dir="rtl"' in saved.text
    with site.store.engine.connect() as conn:
        assert subs.members(conn, "newsletter")[0].language == "ar"
    assert (await site.client.post(path, data={"language": "en"})).status_code == 403
    gone = await site.client.post(path, data={"csrf": token, "action": "all"})
    assert gone.status_code == 200
    assert site.status("prefs@example.org") == {"newsletter": "unsubscribed"}
    with site.store.engine.connect() as conn:
        assert ("prefs@example.org", "*") in {
            (r.email_key, r.list_name) for r in conn.execute(select(suppressions))}
    # Coming back through the same page (the link proves the mailbox) lifts "all" again.
    await site.client.post(path, data={"csrf": token, "language": "ar", "lists": "newsletter"})
    with site.store.engine.connect() as conn:
        assert [m.email for m in subs.members(conn, "newsletter")] == ["prefs@example.org"]
        assert site.count(suppressions) == 0


# --- the archive behind "view online" --------------------------------------------------------

ARCHIVED = """\
template: newsletter
audience: {lists: [people]}
content:
  de:
    subject: "Rundbrief Dezember"
    blocks:
      - heading: "Hallo {{ recipient.name }}"
      - text: "Das **FORUM INTEGRATION** lädt ein."
  ar:
    subject: "النشرة"
    blocks:
      - heading: "مرحبا"
"""


async def test_archive_shows_only_sent_campaigns_unpersonalised(project: Project,
                                                                site: Site) -> None:
    from mailer.checks import check_campaign
    from mailer.dispatch import deliver_run
    from mailer.sending import plan_run

    project.list_file("people.csv", "email,name,language\nzoe@example.org,Zoë Secret,de\n")
    path = project.campaign("archived.yaml", ARCHIVED)
    before = await site.client.get("/archive/archived")
    assert before.status_code == 404  # not sent yet: drafts stay private
    settings = project.settings()
    checked = check_campaign(path, settings)
    plan = plan_run(checked, settings, site.store, again=False, retry_failed=False)
    assert plan.run is not None
    pool = SmtpPool(settings.smtp, host=site.server.host, port=site.server.port)
    await deliver_run(settings, site.store, checked.rendition, plan.run, transport=pool)
    await pool.aclose()
    mail = email.message_from_bytes(site.server.messages[-1].content,
                                    policy=email.policy.default)
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    view_online = re.search(r'href="(http://127\.0\.0\.1:8000/archive/[^"]+)"', html)
    assert view_online, "the mail has no view-online link"
    page = await site.client.get(site.local(view_online.group(1).replace("&amp;", "&")))
    assert page.status_code == 200 and "FORUM INTEGRATION" in page.text
    assert "Zoë" not in page.text and "zoe@example.org" not in page.text
    assert "script-src" not in page.headers["content-security-policy"]
    arabic = await site.client.get("/archive/archived?lang=ar")
    assert 'dir="rtl"' in arabic.text
    index = await site.client.get("/archive")
    assert index.status_code == 200 and "/archive/archived" in index.text
    assert (await site.client.get("/archive/Not-An-Id")).status_code == 404


def test_access_log_lines_carry_no_tokens() -> None:
    import logging

    from mailer.cli_web import RedactTokens

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", "/unsubscribe/WyJhQGV4YW1wbGUub3JnIl0.sig",
                                "1.1", 200), None)
    assert RedactTokens().filter(record)
    assert "WyJ" not in record.getMessage() and "/unsubscribe/…" in record.getMessage()
