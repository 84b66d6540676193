"""`mailer preview`: the exact mail per language as .html, .txt, .eml (and .png on request)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .audience import Recipient, email_key, normalise_address
from .campaign import Campaign, find_campaign
from .checks import Checked, check_campaign, sample_recipient
from .compose import Composer, message_id
from .config import Settings
from .errors import CampaignError, UserError
from .render import Links, Snippets, personalise
from .tokens import Tokens

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (600, 375)


def pick_recipient(
    recipients: Iterable[Recipient], lang: str, wanted: str | None, fallback: Recipient
) -> Recipient:
    """`wanted`, or the first recipient in `lang`, else `fallback` in `lang`; stops reading
    the lists at the one it takes."""
    if wanted:
        try:
            address = normalise_address(wanted)
        except ValueError as exc:
            raise UserError(f"--recipient '{wanted}' is not a valid address ({exc})") from None
        for r in recipients:
            if r.key == email_key(address):
                return r
        raise UserError(f"--recipient '{wanted}' is not on the lists of this campaign: pick an "
                        "address from them, or leave --recipient out for the first one")
    first = None
    for r in recipients:
        if r.language == lang:
            return r
        first = first or r
    return Recipient(email=fallback.email, name=fallback.name, language=lang,
                     fields=fallback.fields, list=first.list if first else "")


@dataclass(frozen=True)
class MailPreview:
    """One language of a campaign as one recipient gets it: what the inbox line shows, and both
    parts."""

    lang: str
    dir: str  # "rtl" for Arabic and the other right-to-left languages
    recipient: Recipient
    subject: str
    preheader: str
    html: str
    text: str


def preview_mails(checked: Checked, settings: Settings, composer: Composer, *, langs: list[str],
                  recipient: str | None) -> list[MailPreview]:
    """The mail per language (all of the campaign's when `langs` is empty), personalised for
    `recipient`, or else for the first list member with that language."""
    campaign = checked.campaign
    for lang in langs:
        if lang not in campaign.content:
            raise CampaignError(f"the campaign has no language '{lang}' "
                                f"(it has {', '.join(campaign.languages)})", path=campaign.source)
    fallback = sample_recipient(campaign, settings)
    out = []
    for lang in langs or campaign.languages:
        person = pick_recipient(checked.recipients, lang, recipient, fallback)
        person = Recipient(email=person.email, name=person.name, language=lang,
                           fields=person.fields, list=person.list)
        links = composer.links(person, lang)
        lr = checked.rendition.languages[lang]
        body = personalise(lr, person, links)
        out.append(MailPreview(lang=lang, dir=lr.dir, recipient=person, subject=body.subject,
                               preheader=_preheader(campaign, lang, person, links),
                               html=body.html, text=body.text))
    return out


def _preheader(campaign: Campaign, lang: str, person: Recipient, links: Links) -> str:
    """The preheader with its merge fields filled in, as the inbox line shows it."""
    source = campaign.content[lang].preheader
    if "{" not in source:
        return source
    template = Snippets(campaign).compile(source, ("content", lang, "preheader"),
                                          autoescape=False)
    return " ".join(template.render(recipient=person.merge(), links=asdict(links)).split())


def write_preview(
    settings: Settings, ref: str, out: Path, *, langs: list[str], recipient: str | None,
    png: bool
) -> list[Path]:
    checked = check_campaign(find_campaign(ref, settings), settings)
    if png and not Path(CHROMIUM).exists():
        raise UserError("--png needs Debian's chromium: run 'apt-get install chromium' "
                        "(or leave out --png)")
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))
    files: dict[str, bytes] = {}
    for mail in preview_mails(checked, settings, composer, langs=langs, recipient=recipient):
        stem = f"{checked.campaign.id}.{mail.lang}"
        files[f"{stem}.html"] = mail.html.encode("utf-8")
        files[f"{stem}.txt"] = mail.text.encode("utf-8")
        files[f"{stem}.eml"] = composer.compose(
            mail.recipient, message_id=message_id(domain=settings.msgid_domain)).data
    written = _write_all(out, files)
    if png:
        for name in [n for n in files if n.endswith(".html")]:
            written += screenshot(out / name)
    return written


def _write_all(out: Path, files: dict[str, bytes]) -> list[Path]:
    """Write into a temporary folder first, then move: nothing half-written on failure."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        for name in files:
            os.replace(Path(tmp) / name, out / name)
    return [out / name for name in files]


def screenshot(html: Path) -> list[Path]:
    """Full-page screenshots at desktop and phone width."""
    outputs = []
    for width in WIDTHS:
        target = html.with_suffix(f".{width}.png")
        _shoot(html, target, width)
        outputs.append(target)
    return outputs


def _shoot(html: Path, target: Path, width: int) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _shoot_cli(html, target, width)
        return
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.goto(html.resolve().as_uri())
        page.screenshot(path=str(target), full_page=True)
        browser.close()


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _shoot_cli(html: Path, target: Path, width: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={profile}",
               f"--screenshot={target}", f"--window-size={width},2400", html.resolve().as_uri()]
        result = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if result.returncode != 0 or not target.exists():
        raise UserError(f"chromium could not take the screenshot of {html} "
                        f"(exit {result.returncode})")

