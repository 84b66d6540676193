"""`mailer preview CAMPAIGN --watch` as the real command: a live page in headless chromium that
follows saves of the campaign file (a broken save shows its errors above the last good
rendering), switches languages, and listens on loopback only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Project
from tests.helpers import MAILER, mailer_env, run_mailer
from tests.test_browser import ARGS, CHROMIUM, free_port

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian chromium at /usr/bin/chromium")

CAMPAIGN = """\
template: newsletter
audience: {{lists: [newsletter-demo]}}
content:
  de:
    subject: "{subject}"
    preheader: "Programm und Anmeldung für {{{{ recipient.name }}}}"
    blocks: [{{heading: "Hallo"}}]
  tr:
    subject: "FORUM INTEGRATION daveti"
    blocks: [{{heading: "Merhaba"}}]
  ar:
    subject: "دعوة إلى منتدى الاندماج"
    blocks: [{{heading: "مرحبا"}}]
"""


def campaign(subject: str) -> str:
    return CAMPAIGN.format(subject=subject)


class Watched:
    """`mailer preview forum --watch --port P`, running until the test is done."""

    def __init__(self, project: Project, *args: str) -> None:
        self.project = project
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*MAILER, "preview", "forum", "--watch", "--port", str(self.port), *args],
            env=mailer_env(project), cwd=project.root, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.first_line = self._first_line(timeout_s=30)

    def _first_line(self, *, timeout_s: float) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not lines or not lines[0]:
            self.proc.kill()
            raise AssertionError(f"mailer preview --watch did not start: {self.proc.stderr}")
        return lines[0]

    def save(self, text: str) -> None:
        """Write the campaign file as an editor does (the mtime moves on)."""
        self.project.campaign("forum.yaml", text)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err


@pytest.fixture
def watched(project: Project) -> Iterator[Watched]:
    project.campaign("forum.yaml", campaign("Einladung zum FORUM INTEGRATION"))
    w = Watched(project)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.communicate(timeout=20)


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", *ARGS])
        try:
            yield b
        finally:
            b.close()


def cli_errors(project: Project) -> str:
    """What `mailer validate` prints for the campaign as it is now."""
    result = run_mailer(project, "validate", "forum")
    assert result.returncode == 1
    return "\n".join(x for x in result.stderr.splitlines() if x.startswith("error:"))


@pytest.mark.browser
@needs_chromium
def test_saves_show_up_without_reload_and_a_broken_save_keeps_the_last_good_mail(
        watched: Watched, browser: Any, project: Project) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(watched.url)
    subject = page.locator(".inbox .subject")
    expect(subject).to_have_text("Einladung zum FORUM INTEGRATION")
    expect(page.locator(".inbox .preheader")).to_have_text(
        re.compile(r"^Programm und Anmeldung für \S"))  # the merge field is filled in
    desktop, phone = page.locator("iframe.desktop"), page.locator("iframe.phone")
    assert desktop.bounding_box()["width"] == pytest.approx(600, abs=4)
    assert phone.bounding_box()["width"] == pytest.approx(375, abs=4)
    expect(page.frame_locator("iframe.phone").locator("body")).to_contain_text("Hallo")
    expect(page.locator(".text pre")).to_contain_text("Hallo")
    page.evaluate("window.sameDocument = true")  # gone if the page reloads

    watched.save(campaign("Neu: Vorträge <b>&</b> Gespräche").replace("Hallo", "Guten Abend"))
    expect(subject).to_have_text("Neu: Vorträge <b>&</b> Gespräche")  # escaped, not bold
    expect(page.frame_locator("iframe.desktop").locator("body")).to_contain_text("Guten Abend")
    expect(page.frame_locator("iframe.phone").locator("body")).to_contain_text("Guten Abend")
    expect(page.locator(".text pre")).to_contain_text("Guten Abend")

    broken = campaign("Kaputt").replace('  tr:\n', '  tr: [unclosed\n')
    watched.save(broken)
    errors = page.locator(".errors pre")
    expect(errors).to_have_text(cli_errors(project))  # the same lines `mailer validate` prints
    expect(errors).to_contain_text(re.compile(r"forum\.yaml, line \d+"))
    expect(subject).to_have_text("Neu: Vorträge <b>&</b> Gespräche")  # the last good one
    expect(page.frame_locator("iframe.desktop").locator("body")).to_contain_text("Guten Abend")
    assert watched.proc.poll() is None  # the server kept running

    # Several problems at once: every one of them, in line order, as validate lists them.
    watched.save(campaign("Zwei Fehler").replace('    subject: "FORUM INTEGRATION daveti"\n',
                                                 '    subjekt: "FORUM INTEGRATION daveti"\n')
                 .replace("    preheader:", "    preheder:"))
    expect(errors).to_have_text(cli_errors(project))
    assert len(errors.inner_text().splitlines()) >= 2
    expect(subject).to_have_text("Neu: Vorträge <b>&</b> Gespräche")

    watched.save(campaign("Wieder gut"))
    expect(subject).to_have_text("Wieder gut")
    expect(page.locator(".errors")).to_have_count(0)
    expect(page.frame_locator("iframe.desktop").locator("body")).to_contain_text("Hallo")
    assert page.evaluate("window.sameDocument") is True  # updated in place, never reloaded


@pytest.mark.browser
@needs_chromium
def test_language_switch_and_template_edits(watched: Watched, browser: Any,
                                            project: Project) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(watched.url)
    langs = page.locator("nav.langs a")
    expect(langs).to_have_text(["de", "tr", "ar"])  # one switch per campaign language
    expect(page.locator("nav.langs a[aria-current=page]")).to_have_text("de")
    preheader = page.locator(".inbox .preheader")
    expect(preheader).to_have_text("Programm und Anmeldung für Anna Schmidt")
    expect(page.locator(".inbox .to")).to_have_text("to Anna Schmidt <anna.schmidt@example.org>")

    # A list file the campaign uses is watched: the recipient's new name shows.
    members = project.root / "lists" / "newsletter-demo.csv"
    members.write_text(members.read_text(encoding="utf-8").replace(
        "Anna Schmidt,", "Anna Schmidt-Yılmaz,"), encoding="utf-8")
    expect(preheader).to_have_text("Programm und Anmeldung für Anna Schmidt-Yılmaz")

    page.get_by_role("link", name="tr", exact=True).click()
    expect(page.locator(".inbox .subject")).to_have_text("FORUM INTEGRATION daveti")
    expect(page.frame_locator("iframe.desktop").locator("body")).to_contain_text("Merhaba")
    expect(page.locator(".text pre")).to_have_attribute("lang", "tr")

    page.get_by_role("link", name="ar", exact=True).click()
    expect(page.locator(".inbox .line")).to_have_attribute("dir", "rtl")
    expect(page.frame_locator("iframe.phone").locator("body")).to_contain_text("مرحبا")

    # A template the campaign uses is watched too, and the chosen language stays.
    strings = project.root / "templates" / "strings.yaml"
    text = strings.read_text(encoding="utf-8")
    assert 'impressum: "بيانات الناشر"' in text
    strings.write_text(text.replace('impressum: "بيانات الناشر"',
                                    'impressum: "بيانات الناشر المعدلة"'), encoding="utf-8")
    expect(page.locator(".text pre")).to_contain_text("بيانات الناشر المعدلة")
    expect(page.locator("nav.langs a[aria-current=page]")).to_have_text("ar")


def listening(port: int) -> list[str]:
    """Local addresses with a listening TCP socket on `port` (Linux /proc/net/tcp, tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                out.append(address)
    return out


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses that are not loopback."""
    found = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return [a for a in found if not a.startswith("127.")]


def test_listens_on_loopback_only_whatever_the_config_says(project: Project) -> None:
    config = project.config.read_text(encoding="utf-8")
    project.config.write_text(config.replace("  host: 127.0.0.1", "  host: 0.0.0.0"),
                              encoding="utf-8")
    project.campaign("forum.yaml", campaign("Einladung"))
    w = Watched(project)
    try:
        assert w.first_line.strip().endswith(f"on {w.url} (Ctrl-C stops)")
        assert listening(w.port) == ["0100007F"]  # 127.0.0.1, and nothing else
        for address in other_addresses():
            with pytest.raises(OSError), socket.create_connection((address, w.port), 2):
                pass
        page = httpx.get(w.url, timeout=10)
        assert page.status_code == 200 and "Einladung" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # A page on another site that points its own name at 127.0.0.1 gets nothing.
        rebound = httpx.get(w.url, headers={"Host": f"evil.example.org:{w.port}"}, timeout=10)
        assert rebound.status_code == 400 and "Einladung" not in rebound.text
        assert httpx.post(w.url, timeout=10).status_code == 405
        mail = httpx.get(f"{w.url}mail/de", timeout=10)
        assert "frame-ancestors 'self'" in mail.headers["content-security-policy"]
        assert httpx.get(f"{w.url}mail/xx", timeout=10).status_code == 404
        assert httpx.get(f"{w.url}../config.yaml", timeout=10).status_code == 404
    finally:
        code, out, err = w.stop(signal.SIGINT)
    assert code == 0, err  # Ctrl-C stops it cleanly
    assert out.splitlines()[-1] == "stopped"
    assert "Traceback" not in err


def test_port_taken_and_options_that_do_not_go_together(project: Project,
                                                        tmp_path: Path) -> None:
    project.campaign("forum.yaml", campaign("Einladung"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        taken = run_mailer(project, "preview", "forum", "--watch", "--port", str(port))
    assert taken.returncode == 1 and time.monotonic() - started < 30
    assert f"127.0.0.1:{port}" in taken.stderr and "--port" in taken.stderr
    assert "Traceback" not in taken.stderr
    no_out = run_mailer(project, "preview", "forum")
    assert no_out.returncode == 2 and "--out" in no_out.stderr
    both = run_mailer(project, "preview", "forum", "--watch", "--out", str(tmp_path))
    assert both.returncode == 2 and "--watch" in both.stderr
