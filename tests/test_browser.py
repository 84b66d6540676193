"""End to end in headless Debian chromium (Playwright): subscribe → confirmation mail → the
link's one-button page → confirm; preferences → next mail in the new language; one-click from a
campaign mail → next run skips.

The app runs under uvicorn, configured as `mailer serve` configures it, on a free loopback port
with the embedded capture server (a real aiosmtpd) as its transport; campaign runs use the same
maildir. Screenshots of every page at phone and desktop width go to test-output/screenshots/.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from mailer.checks import check_campaign
from mailer.config import Settings
from mailer.dispatch import deliver_run
from mailer.sending import plan_run
from mailer.store import open_store
from mailer.web import create_app
from mailer.web.server import uvicorn_config
from tests.conftest import REPO, Project

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-output" / "screenshots"
WIDTHS = (375, 1000)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

CAMPAIGN = """\
template: newsletter
audience: {lists: [newsletter]}
content:
  de: {subject: "Einladung FORUM INTEGRATION", blocks: [{heading: "Hallo"}]}
  en: {subject: "Invitation FORUM INTEGRATION", blocks: [{heading: "Hello"}]}
  tr: {subject: "FORUM INTEGRATION daveti", blocks: [{heading: "Merhaba"}]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = settings.base_url
        self.server = uvicorn.Server(uvicorn_config(
            create_app(settings), settings, host="127.0.0.1",
            port=int(self.base.rsplit(":", 1)[1]), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def mails_to(self, address: str) -> list[EmailMessage]:
        out = []
        outbox = self.settings.outbox_dir
        for path in sorted([*outbox.glob("new/*"), *outbox.glob("cur/*")],
                           key=lambda p: p.stat().st_mtime_ns):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if address in str(msg["To"]):
                out.append(msg)  # type: ignore[arg-type]
        return out

    def wait_for_mail(self, address: str, count: int, timeout_s: float = 15) -> EmailMessage:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mails = self.mails_to(address)
            if len(mails) >= count:
                return mails[count - 1]
            time.sleep(0.1)
        raise AssertionError(f"no mail #{count} to {address} within {timeout_s} s")


@pytest.fixture
def served(project: Project) -> Iterator[Served]:
    settings = project.settings(MAILER_BASE_URL=f"http://127.0.0.1:{free_port()}")
    with Served(settings) as s:
        yield s


def run_campaign(settings: Settings, path: Path, *, again: bool) -> Any:
    """A campaign run to completion, in its own thread and event loop (Playwright owns ours)."""

    def work() -> Any:
        checked = check_campaign(path, settings)
        store = open_store(settings.database_url)
        plan = plan_run(checked, settings, store, again=again, retry_failed=False)
        assert plan.run is not None, plan.message
        return asyncio.run(deliver_run(settings, store, checked.rendition, plan.run))

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result(timeout=60)


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def shoot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)


def test_subscribe_confirm_preferences_and_one_click(served: Served, project: Project):
    from playwright.sync_api import expect, sync_playwright

    address = "leyla.demir@example.org"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(locale="de-DE")

        page.goto(f"{served.base}/subscribe")
        expect(page.locator("h1")).to_have_text("Newsletter abonnieren")
        shoot(page, "subscribe-de")
        page.goto(f"{served.base}/subscribe?lang=ar")
        expect(page.locator("html")).to_have_attribute("dir", "rtl")
        shoot(page, "subscribe-ar")
        page.get_by_label("البريد الإلكتروني").fill("not an address")
        page.get_by_role("button", name="اشترك").click()
        expect(page.locator(".error")).to_have_count(1)
        shoot(page, "subscribe-error-ar")

        page.goto(f"{served.base}/subscribe?lang=en")
        page.get_by_label("Email address").fill(address)
        page.get_by_label("Name (optional)").fill("Leyla Demir")
        page.get_by_label("Language of the emails").select_option("en")
        expect(page.get_by_label("IMAG newsletter")).to_be_checked()
        page.keyboard.press("Tab")  # the form is usable from the keyboard
        page.get_by_role("button", name="Subscribe").press("Enter")
        expect(page.locator("h1")).to_have_text("Almost done")
        shoot(page, "thanks-en")

        confirmation = served.wait_for_mail(address, 1)
        assert confirmation["Subject"] == "Please confirm your subscription"
        (url,) = re.findall(r"http://\S+/confirm/\S+", text_of(confirmation))
        page.goto(url)  # opening the link (as a mail scanner does) confirms nothing yet
        expect(page.locator("h1")).to_have_text("Confirm your subscription")
        expect(page.get_by_role("button")).to_have_count(1)
        shoot(page, "confirm-en")
        page.get_by_role("button", name="Yes, confirm my subscription").click()
        expect(page.locator("h1")).to_have_text("Subscription confirmed")
        expect(page.locator(".lead")).to_contain_text("Thank you!")
        shoot(page, "confirmed-en")
        page.goto(url)  # the link once more: it says so, and offers no button
        expect(page.locator(".lead")).to_have_text(
            "This subscription is already confirmed. There is nothing more to do.")
        expect(page.get_by_role("button")).to_have_count(0)

        campaign = project.campaign("forum.yaml", CAMPAIGN)
        first = run_campaign(served.settings, campaign, again=False)
        assert first.counts["sent"] == 1
        mail = served.wait_for_mail(address, 2)
        assert mail["Subject"] == "Invitation FORUM INTEGRATION"
        links = re.findall(r"<(https?://[^>]+)>", str(mail["List-Unsubscribe"]))
        (one_click,) = links
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

        page.goto(one_click.replace("/unsubscribe/", "/preferences/"))
        expect(page.locator("h1")).to_have_text("Preferences")
        shoot(page, "preferences-en")
        page.get_by_label("Language of the emails").select_option("tr")
        page.get_by_role("button", name="Save").click()
        expect(page.locator(".notice")).to_have_text("Ayarlarınız kaydedildi.")
        shoot(page, "preferences-saved-tr")

        second = run_campaign(served.settings, campaign, again=True)
        assert second.counts["sent"] == 1
        assert served.wait_for_mail(address, 3)["Subject"] == "FORUM INTEGRATION daveti"

        page.goto(one_click)
        expect(page.get_by_role("button")).to_have_count(1)
        shoot(page, "unsubscribe-tr")
        page.goto(one_click.rsplit("/", 1)[0] + "/tampered" + one_click[-4:])
        # Whose link it was is unknown: the page follows the browser (de-DE).
        expect(page.locator("h1")).to_have_text("Dieser Link funktioniert nicht")
        shoot(page, "invalid-link-de")
        browser.close()

    # What a mail client does (RFC 8058): POST, no cookie, no page in between.
    response = httpx.post(one_click, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert response.status_code == 200
    third = run_campaign(served.settings, campaign, again=True)
    assert third.run.total == 0 and len(served.mails_to(address)) == 3
