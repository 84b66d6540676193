"""The subscriber web app, in-process over ASGI, with a real aiosmtpd server for the mails."""

from __future__ import annotations

import email
import email.policy
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)

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

    async def confirm(self, url: str) -> httpx.Response:
        """What a person does: open the link, press the one button."""
        page = await self.client.get(self.local(url))
        assert page.status_code == 200 and page.text.count("<button") == 1, page.text
        match = CSRF_RE.search(page.text)
        assert match, "the confirm page has no CSRF field"
        return await self.client.post(self.local(url), data={"csrf": match.group(1)})

    def manage_path(self, address: str, list_name: str, page: str = "unsubscribe") -> str:
        return f"/{page}/{self.tokens.manage(address, list_name, 'test-campaign')}"

    def status(self, address: str) -> dict[str, str]:
        with self.store.engine.connect() as conn:
            sub = subs.find_subscriber(conn, address.lower())
            return subs.statuses(conn, int(sub["id"])) if sub else {}


SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def make_site(project: Project, fault_server) -> AsyncIterator[SiteFactory]:  # noqa: F811
    """`await make_site(faults=…, peer=…, **env)`: the app in-process, its mails to a real
    aiosmtpd server; `peer` is the TCP client address the app sees."""
    opened: list[tuple[Any, ...]] = []

    async def start(*, faults: Faults | None = None, peer: str = CLIENT_IP,
                    **env: str) -> Site:
        server = await fault_server(faults)
        settings = project.settings(**env)
        store = open_store(settings.database_url)
        pool = SmtpPool(settings.smtp, host=server.host, port=server.port)
        app = create_app(settings, store=store, transport=pool)
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        opened.append((lifespan, client, pool, store))
        return Site(client, server, settings, store, Tokens(settings.secret()))

    yield start
    for lifespan, client, pool, store in reversed(opened):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        await pool.aclose()
        store.dispose()


@pytest.fixture
async def site(make_site: SiteFactory) -> Site:
    return await make_site()


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
    # The branded mail of the templates (tests/test_confirmation_mail.py has the details):
    # the same link on the button and in the text part, the Impressum, no unsubscribe.
    html = msg.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert f'href="{url}"' in html and "Aboneliği onayla" in html  # the button, in Turkish
    assert 'lang="tr"' in html and "Künye" in html and site.settings.organisation.street in html
    assert msg["List-Unsubscribe"] is None and "/unsubscribe/" not in html
    assert msg["Auto-Submitted"] == "auto-generated"

    confirmed = await site.confirm(url)
    assert confirmed.status_code == 200 and 'lang="tr"' in confirmed.text
    assert "Teşekkürler!" in confirmed.text  # "Thank you! …"
    assert site.status("anna.schmidt@example.org") == {"newsletter": "subscribed"}
    again = await site.client.post(site.local(url), data={"csrf": await site.form()})
    assert again.status_code == 200  # confirming twice is harmless, and says so
    assert "Bu abonelik zaten onaylanmış" in again.text and "Teşekkürler!" not in again.text
    reopened = await site.client.get(site.local(url))  # the link, opened once more
    assert "Bu abonelik zaten onaylanmış" in reopened.text and "<button" not in reopened.text
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
    await site.confirm(site.confirmation_urls()[0])
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
    fields = dict(fields)  # the parameter is shared by reruns in one process
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


async def test_a_signed_field_is_good_only_with_its_own_cookie(site: Site):
    """Double submit: a field signed by this server, but issued to another visitor, is refused."""
    data = {"email": "crossed@example.org", "language": "de", "lists": "newsletter"}
    theirs = await site.form()  # a visitor's field (an attacker can fetch one for themselves)
    async with httpx.AsyncClient(transport=site.client._transport,
                                 base_url="http://testserver") as other:
        page = await other.get("/subscribe")
        match = CSRF_RE.search(page.text)
        assert match and other.cookies.get("imag_csrf") != site.client.cookies.get("imag_csrf")
        crossed = await other.post("/subscribe", data={**data, "csrf": theirs})
        assert crossed.status_code == 403
        assert site.count(subscribers) == 0 and site.server.messages == []
        own = await other.post("/subscribe", data={**data, "csrf": match.group(1)})
        assert own.status_code == 200 and site.count(subscribers) == 1


async def test_a_signed_field_older_than_four_hours_is_refused(site: Site):
    from mailer.web.security import Csrf

    await site.form()
    cookie = site.client.cookies.get("imag_csrf")
    assert cookie

    def field_signed(seconds_ago: int) -> str:
        class Then(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(time.time()) - seconds_ago

        return Then(site.settings.secret(), salt="imag-mailer.csrf").sign(cookie).decode()

    data = {"email": "late@example.org", "language": "de", "lists": "newsletter"}
    stale = await site.client.post(
        "/subscribe", data={**data, "csrf": field_signed(Csrf.MAX_AGE_S + 60)})
    assert stale.status_code == 403 and "abgelaufen" in stale.text
    assert site.count(subscribers) == 0 and site.server.messages == []
    recent = await site.client.post(
        "/subscribe", data={**data, "csrf": field_signed(Csrf.MAX_AGE_S - 60)})
    assert recent.status_code == 200 and site.count(subscribers) == 1


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
    await site.confirm(site.confirmation_urls()[-1])
    assert site.status(address) == {"newsletter": "subscribed"}


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


async def test_archive_shows_edits_of_the_campaign_and_templates_per_language(
        project: Project, site: Site) -> None:
    """A running web app sees an edited campaign file or template on the next request."""
    import os

    from mailer.dispatch import start_run

    project.list_file("people.csv", "email,name,language\nzoe@example.org,Zoë Secret,de\n")
    path = project.campaign("archived.yaml", ARCHIVED)
    run, _ = start_run(site.store, campaign_id="archived", occurrence="once", trigger="send",
                       recipients=[])
    with site.store.engine.begin() as conn:  # one delivered row: the campaign went out
        conn.execute(q_sent_row(run.id))

    def edit(target: Any, old: str, new: str) -> None:
        stat = target.stat()
        target.write_text(target.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    async def page(lang: str) -> str:
        response = await site.client.get(f"/archive/archived?lang={lang}")
        assert response.status_code == 200
        return response.text

    german, arabic = await page("de"), await page("ar")
    assert "FORUM INTEGRATION" in german and 'dir="rtl"' not in german
    assert "مرحبا" in arabic and 'dir="rtl"' in arabic
    assert await page("de") == german and await page("ar") == arabic  # kept per language
    edit(path, "FORUM INTEGRATION", "FORUM VIELFALT")
    german = await page("de")
    assert "FORUM VIELFALT" in german and "FORUM INTEGRATION" not in german
    strings = project.root / "templates" / "strings.yaml"
    edit(strings, 'view_online: "Im Browser ansehen"', 'view_online: "Online lesen"')
    assert "Online lesen" in await page("de") and "Im Browser ansehen" not in await page("de")
    assert "مرحبا" in await page("ar")


def q_sent_row(run_id: int) -> Any:
    from mailer.store.tables import deliveries

    return deliveries.insert().values(
        run_id=run_id, email="x@example.org", email_key="x@example.org", name="",
        language="de", list_name="people", fields={}, status="sent", attempts=1,
        sent_at=datetime.now(UTC))


def test_access_log_lines_carry_no_tokens() -> None:
    from mailer.web.server import RedactPaths

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", "/unsubscribe/WyJhQGV4YW1wbGUub3JnIl0.sig",
                                "1.1", 200), None)
    assert RedactPaths().filter(record)
    assert "WyJ" not in record.getMessage() and "/unsubscribe/…" in record.getMessage()


# --- trust boundaries (issue 8) -------------------------------------------------------------


async def test_opening_the_confirmation_link_confirms_nothing(site: Site):
    """Mail scanners fetch (GET, HEAD) every link in a mail: only the button confirms."""
    await site.subscribe("scanned@example.org")
    (url,) = site.confirmation_urls()
    async with httpx.AsyncClient(transport=site.client._transport,
                                 base_url="http://testserver") as scanner:
        for method in ("GET", "HEAD", "GET"):
            response = await scanner.request(method, site.local(url))
            assert response.status_code == 200
        assert site.status("scanned@example.org") == {"newsletter": "pending"}
        page = await scanner.get(site.local(url))
        assert page.text.count("<button") == 1 and 'method="post"' in page.text
        assert "scanned@example.org" in page.text  # whose subscription the button confirms
        no_csrf = await scanner.post(site.local(url), data={})
        assert no_csrf.status_code == 403
    assert site.status("scanned@example.org") == {"newsletter": "pending"}
    with site.store.engine.connect() as conn:
        assert [r.event for r in conn.execute(select(consent_events))] == ["subscribed"]
    assert (await site.confirm(url)).status_code == 200
    assert site.status("scanned@example.org") == {"newsletter": "subscribed"}


async def test_only_post_changes_anything_on_any_route(site: Site):
    from mailer.audience import Recipient

    with site.store.engine.begin() as conn:  # subscribed without the pages under test
        subs.import_members(conn, [Recipient("stay@example.org")], list_name="newsletter",
                            consent_source="test", send_confirmation=False)
    await site.subscribe("pending@example.org")
    confirm_path = site.local(site.confirmation_urls()[-1])
    paths = [site.manage_path("stay@example.org", "newsletter"),
             site.manage_path("stay@example.org", "newsletter", page="preferences"),
             site.manage_path("partner@example.org", "partners"), confirm_path]
    one_click = {"List-Unsubscribe": "One-Click", "action": "all", "language": "ar",
                 "csrf": await site.form()}
    before = (site.count(consent_events), site.count(suppressions))
    for path in [*paths, "/subscribe", "/"]:
        for method in ("HEAD", "GET"):  # with a one-click body, and the values in the query
            response = await site.client.request(method, path, data=one_click,
                                                 params=one_click)
            assert response.status_code in (200, 303), (method, path)
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
            response = await site.client.request(method, path, data=one_click)
            assert response.status_code == 405, (method, path)
    assert (site.count(consent_events), site.count(suppressions)) == before
    assert site.status("stay@example.org") == {"newsletter": "subscribed"}
    assert site.status("pending@example.org") == {"newsletter": "pending"}


@pytest.mark.parametrize("name", [
    "Alice, attacker@evil.example " + "B" * 60,
    '"Alice" <attacker@evil.example>, ' + "C" * 50,
    "Ünal, Ayşe; evil@example.org " + "Ç" * 40,
    "=?utf-8?q?evil=40example.org?= " + "D" * 50,
    'Bob "the builder", Jr.' + " E" * 30,
])
async def test_confirmation_mail_goes_to_exactly_one_address(
        project: Project, fault_server, name: str) -> None:  # noqa: F811
    """Names imported by staff are not refused: the To header must hold them safely."""
    from mailer.web.mails import send_confirmation

    server = await fault_server()
    settings = project.settings()
    pool = SmtpPool(settings.smtp, host=server.host, port=server.port)
    try:
        result = await send_confirmation(pool, settings, Tokens(settings.secret()),
                                         email="victim@example.org", name=name, language="de",
                                         lists=["newsletter"], nonce="n" * 22)
    finally:
        await pool.aclose()
    assert result.outcome.name == "SENT"
    (received,) = server.messages
    assert received.rcpt_tos == ["victim@example.org"]
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    (to,) = msg.get_all("To")
    assert [a.addr_spec for a in to.addresses] == ["victim@example.org"]
    # (The stdlib parser puts a space between adjacent encoded words of a phrase.)
    assert to.addresses[0].display_name.replace(" ", "") == name.replace(" ", "")
    (sender,) = msg["From"].addresses
    assert sender.addr_spec == settings.sender.address
    assert msg["Subject"] == "Bitte bestätigen Sie Ihre Anmeldung"


@pytest.mark.parametrize("name", [
    "Alice, attacker@evil.example",
    "Alice <alice@example.org>",
    "Eve; Mallory",
    "Note: call me",
    "visit https://evil.example/win",
    "cheap-pills.example",
    "www.evil.example",
    "x" * 101,
    "Alice\u202eevil",
    "Tab\there",
], ids=["comma-address", "angle", "semicolon", "colon", "url", "domain", "www", "overlong",
        "bidi-override", "control"])
async def test_subscribe_form_refuses_names_that_are_not_names(site: Site, name: str):
    response = await site.client.post("/subscribe?lang=en", data={
        "csrf": await site.form(), "email": "named@example.org", "name": name,
        "language": "en", "lists": "newsletter"})
    assert response.status_code == 400
    assert 'id="name-error"' in response.text
    assert "at most 100 characters long, without web or email addresses" in response.text
    assert site.count(subscribers) == 0 and site.server.messages == []


@pytest.mark.parametrize("name", ["Anna Schmidt", "Ayşe Ünal-Öztürk", "Dr. Jürgen Meier",
                                  "J.R.R. Tolkien", "ليلى ديمير", "O'Brien", "x" * 100])
async def test_subscribe_form_takes_ordinary_names(site: Site, name: str):
    response = await site.subscribe(f"n{len(site.server.messages)}@example.org", name=name)
    assert response.status_code == 200, name
    (received,) = site.server.messages
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    (to,) = msg["To"].addresses
    assert to.display_name == name


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(site: Site):
    token = await site.form()
    codes = []
    for i in range(25):  # a new made-up client address on every request
        response = await site.client.post("/subscribe", data={
            "csrf": token, "email": f"rotate{i}@example.org", "language": "de",
            "lists": "newsletter"}, headers={"X-Forwarded-For": f"198.51.100.{i}"})
        codes.append(response.status_code)
    assert codes == [200] * 20 + [429] * 5  # the per-IP limit holds
    assert len(site.server.messages) == 20
    with site.store.engine.connect() as conn:
        ips = {r.ip for r in conn.execute(select(consent_events))}
    assert ips == {CLIENT_IP}  # the consent log has the real peer, not the header


async def test_forwarded_for_from_a_trusted_proxy_is_the_client(make_site: SiteFactory):
    site = await make_site(peer="127.0.0.1", MAILER_WEB_TRUSTED_PROXIES="127.0.0.1, 10.0.0.0/8")
    assert site.settings.web.trusted_proxies == ["127.0.0.1/32", "10.0.0.0/8"]
    token = await site.form()
    codes = []
    for i in range(25):  # behind the proxy: 25 different people, each within their limit
        # The left entry is what the client claimed; our proxies appended the rest.
        forwarded = f"192.0.2.66, 198.51.100.{i}, 10.1.2.3"
        response = await site.client.post("/subscribe", data={
            "csrf": token, "email": f"person{i}@example.org", "language": "de",
            "lists": "newsletter"}, headers={"X-Forwarded-For": forwarded})
        codes.append(response.status_code)
    assert codes == [200] * 25
    with site.store.engine.connect() as conn:
        ips = [r.ip for r in conn.execute(select(consent_events).order_by(consent_events.c.id))]
    assert ips == [f"198.51.100.{i}" for i in range(25)]
    burst = [(await site.client.post("/subscribe", data={
        "csrf": token, "email": f"b{i}@example.org", "language": "de", "lists": "newsletter"},
        headers={"X-Forwarded-For": "203.0.113.99"})).status_code for i in range(21)]
    assert burst == [200] * 20 + [429]  # one forwarded client still has one limit


def test_client_address_resolution() -> None:
    from mailer.web.security import ClientAddress

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    proxies = ClientAddress(app, trusted=["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])
    assert proxies.resolve("127.0.0.1", ["203.0.113.5"]) == "203.0.113.5"
    assert proxies.resolve("127.0.0.1", ["6.6.6.6, 203.0.113.5, 10.0.0.2"]) == "203.0.113.5"
    assert proxies.resolve("127.0.0.1", ["6.6.6.6", "203.0.113.5"]) == "203.0.113.5"
    assert proxies.resolve("::ffff:127.0.0.1", ["2001:db9::1"]) == "2001:db9::1"
    assert proxies.resolve("2001:db8::1", ["[2001:db9::2]:443"]) == "2001:db9::2"
    assert proxies.resolve("127.0.0.1", ["203.0.113.5:1234"]) == "203.0.113.5"
    assert proxies.resolve("127.0.0.1", ["not-an-ip, 10.0.0.3"]) == "10.0.0.3"
    assert proxies.resolve("127.0.0.1", ["10.0.0.3, 10.0.0.4"]) == "10.0.0.3"
    assert proxies.resolve("127.0.0.1", [""]) == "127.0.0.1"
    assert proxies.resolve("192.0.2.1", ["203.0.113.5"]) == "192.0.2.1"  # not a proxy of ours
    nobody = ClientAddress(app, trusted=[])
    assert nobody.networks == []


def test_trusted_proxies_must_be_addresses(project: Project) -> None:
    from mailer.errors import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxies"):
        project.settings(MAILER_WEB_TRUSTED_PROXIES="proxy.example.org")
    assert project.settings().web.trusted_proxies == []


async def test_plus_tags_and_case_are_one_mailbox_for_the_limit(make_site: SiteFactory):
    site = await make_site()
    variants = ["a+1@example.org", "A+2@Example.org", "a@example.org", "a+news+x@example.org",
                "A@EXAMPLE.ORG", "a+%@example.org"]
    for i, address in enumerate(variants):
        # From a new client address each time (the per-IP limit is not what stops this).
        site.client._transport.client = (f"198.51.100.{i}", 40000)  # type: ignore[attr-defined]
        assert (await site.subscribe(address)).status_code == 200
    assert len(site.server.messages) == 3
    assert (await site.subscribe("a@example.com")).status_code == 200  # another domain
    assert (await site.subscribe("ab+1@example.org")).status_code == 200  # another mailbox
    assert len(site.server.messages) == 5


async def test_trailing_slash_redirects_stay_on_this_site(site: Site):
    evil = {"Host": "evil.example"}
    response = await site.client.get("/subscribe/?lang=en", headers=evil)
    assert response.headers["location"] == "/subscribe?lang=en"
    assert response.status_code == 308
    for path in ("//evil.example/", "/\\evil.example/", "/nowhere/", "/Subscribe/",
                 "//subscribe/", "/%09/subscribe/"):
        response = await site.client.get(f"http://testserver{path}", headers=evil)
        assert response.status_code == 404, path
        assert "location" not in response.headers
    posted = await site.client.post("/subscribe/", headers=evil, data={})
    assert posted.status_code == 308 and posted.headers["location"] == "/subscribe"


@pytest.mark.parametrize("path", [
    "/Unsubscribe/{token}", "/UNSUBSCRIBE/{token}/", "/preferences/{token}?lang=de",
    "/confirm/{token}", "/unsubscribe//{token}", "/{token}", "/x/{token}",
    "/subscribe?email=secret%40example.org", "/secret%40example.org",
])
def test_no_access_log_line_shows_a_token_or_an_address(path: str) -> None:
    from mailer.web.server import RedactPaths

    token = Tokens("k").manage("secret@example.org", "newsletter")
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", path.format(token=token), "1.1", 404),
                               None)
    assert RedactPaths().filter(record)
    line = record.getMessage()
    assert token[:10] not in line and "secret" not in line, line
    assert "…" in line


async def test_a_refused_confirmation_mail_is_logged_without_the_address(
        make_site: SiteFactory, caplog: pytest.LogCaptureFixture):
    address = "refused.person@example.org"
    site = await make_site(faults=Faults(rcpt={
        address: (550, f"5.1.1 <{address}>: Recipient address rejected: {address} unknown")}))
    with caplog.at_level(logging.DEBUG):
        response = await site.subscribe(address)
    assert response.status_code == 200
    assert site.server.messages == []
    lines = [r for r in caplog.records if r.name.startswith("mailer")]
    warned = [r.getMessage() for r in lines if "confirmation mail was not sent" in r.getMessage()]
    assert warned and "550" in warned[0] and "<address>" in warned[0], warned
    assert all(address not in r.getMessage() and "refused.person" not in r.getMessage()
               for r in lines if r.levelno >= logging.INFO), [r.getMessage() for r in lines]


def test_log_filters_redact_addresses_and_throttle_floods() -> None:
    from mailer.redact import redact_addresses
    from mailer.web.server import RedactAddresses, Throttle

    assert redact_addresses("550 <a.b+c@example.org>: no; also x@[192.0.2.1]") == (
        "550 <address>: no; also <address>")
    try:
        raise ValueError("row for anna@example.org")
    except ValueError:
        import sys

        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                                   "Exception for %s", ("anna@example.org",), sys.exc_info())
    assert RedactAddresses().filter(record)
    assert "anna@" not in record.getMessage() and "anna@" not in (record.exc_text or "")
    now = [0.0]
    throttle = Throttle(per_window=10, window_s=60, clock=lambda: now[0])
    passed = 0
    for i in range(10_000):
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                   f"socket.accept() out of system resource\nsocket: fd={i}",
                                   None, None)
        passed += throttle.filter(record)
    assert passed == 10
    now[0] = 61.0
    assert throttle.filter(record) and "9990 more like this suppressed" in record.getMessage()


async def test_an_ipv6_client_is_limited_per_64_network(make_site: SiteFactory):
    site = await make_site()
    transport: Any = site.client._transport
    token = await site.form()
    codes = []
    for i in range(22):  # every request from another address of the same /64
        transport.client = (f"2001:db8:1:2::{i + 1:x}", 40000)
        codes.append((await site.client.post("/subscribe", data={
            "csrf": token, "email": f"v6-{i}@example.org", "language": "de",
            "lists": "newsletter"})).status_code)
    assert codes == [200] * 20 + [429] * 2
    transport.client = ("2001:db8:1:3::1", 40000)  # the next network is someone else
    assert (await site.subscribe("other-net@example.org")).status_code == 200
    with site.store.engine.connect() as conn:
        ips = [r.ip for r in conn.execute(select(consent_events).order_by(consent_events.c.id))]
    assert ips[0] == "2001:db8:1:2::1" and ips[-1] == "2001:db8:1:3::1"  # the full address
