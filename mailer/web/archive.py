"""The archive behind every mail's "view online" link: campaigns that went out, as sent.

Only campaigns with at least one delivered message are shown (drafts, test sends and campaigns
with `archive: false` stay private), and never personalised: the name reads as the language's
neutral form of address, other merge fields as the campaign's `default(…)`; the footer links
lead to the subscribe page and to a page that says how to unsubscribe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from ..audience import columns
from ..campaign import ID_RE, campaign_files, load_campaign
from ..checks import check_campaign
from ..config import Settings
from ..errors import UserError
from ..render import Links, Neutral, Rendition, personalise, ui_strings
from ..store import queries as q
from .common import page_language, render, web_of
from .i18n import strings

# The mail's own HTML: inline styles, remote images, nothing else (no scripts, no forms).
ARCHIVE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def routes() -> list[BaseRoute]:
    return [Route("/archive", archive_index, methods=["GET"]),
            Route("/archive/{campaign_id}", archive_page, methods=["GET"])]


Stamp = tuple[object, ...]


@dataclass(frozen=True)
class Entry:
    stamp: Stamp
    rendition: Rendition
    columns: frozenset[str]


class Archive:
    """The public pages of sent campaigns, kept per app (on `app.state`), not per process.

    A campaign is rendered again when its file (path, mtime, size) or any template changes;
    its page is kept per language of that version, so an edit shows on the next request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Path, Entry] = {}
        self._pages: dict[tuple[Path, Stamp, str], str] = {}

    def entry(self, settings: Settings, campaign_id: str) -> Entry | None:
        path = _file_of(settings, campaign_id)
        return None if path is None else self._entry(settings, path)

    def _entry(self, settings: Settings, path: Path) -> Entry | None:
        stamp = _stamp(path, settings)
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and entry.stamp == stamp:
                return entry
        try:
            checked = check_campaign(path, settings, with_audience=False)
        except UserError:
            return None
        if not checked.campaign.archive:  # `archive: false`: internal, never public
            return None
        lists = checked.campaign.audience.lists
        entry = Entry(stamp, checked.rendition, frozenset(columns(lists, settings)))
        with self._lock:
            self._entries[path] = entry
            self._pages = {k: v for k, v in self._pages.items() if k[0] != path}
        return entry

    def page(self, settings: Settings, campaign_id: str, lang: str) -> str | None:
        """The campaign as sent, unpersonalised, in `lang` (or its default language)."""
        path = _file_of(settings, campaign_id)
        entry = None if path is None else self._entry(settings, path)
        if path is None or entry is None:
            return None
        lr = entry.rendition.for_language(lang)
        key = (path, entry.stamp, lr.lang)
        with self._lock:
            html = self._pages.get(key)
        if html is not None:
            return html
        base = settings.base_url
        # No one is addressed: the name reads as the language's neutral form of address, other
        # fields as their `default(…)` in the campaign (or empty), never as someone's data.
        public: dict[str, object] = {c: Neutral() for c in entry.columns}
        public |= {"email": Neutral(), "language": lr.lang,
                   "name": Neutral(ui_strings(settings, lr.lang).get("neutral_name", ""))}
        links = Links(unsubscribe=f"{base}/unsubscribe?lang={lr.lang}",
                      preferences=f"{base}/subscribe?lang={lr.lang}",
                      view_online=f"{base}/archive/{campaign_id}?lang={lr.lang}")
        html = personalise(lr, public, links).html
        with self._lock:
            self._pages[key] = html
        return html


def _stamp(path: Path, settings: Settings) -> Stamp:
    """What a rendition depends on: the campaign file and every template file."""
    st = path.stat()
    templates = settings.templates_dir
    files = sorted((str(p.relative_to(templates)), p.stat().st_mtime_ns, p.stat().st_size)
                   for p in templates.rglob("*") if p.is_file())
    return (st.st_mtime_ns, st.st_size, tuple(files))


def archive_of(request: Request) -> Archive:
    state = request.app.state
    archive: Archive | None = getattr(state, "archive", None)
    if archive is None:  # no await since the look-up: one Archive per app
        archive = state.archive = Archive()
    return archive


def _file_of(settings: Settings, campaign_id: str) -> Path | None:
    files = campaign_files(settings)
    for path in sorted(files, key=lambda p: p.stem != campaign_id):  # the likely file first
        try:
            if load_campaign(path, settings).id == campaign_id:
                return path
        except UserError:
            continue
    return None


async def archive_page(request: Request) -> Response:
    web = web_of(request)
    campaign_id = request.path_params["campaign_id"]
    if not ID_RE.match(campaign_id):
        raise HTTPException(404)
    sent = await web.db(lambda conn: q.first_sent(conn, campaign_id))
    if sent is None:
        raise HTTPException(404)
    html = await run_in_threadpool(archive_of(request).page, web.settings, campaign_id,
                                   request.query_params.get("lang", ""))
    if html is None:
        raise HTTPException(404)
    return HTMLResponse(html, headers={"Content-Security-Policy": ARCHIVE_CSP,
                                       "Cache-Control": "public, max-age=300"})


async def archive_index(request: Request) -> Response:
    web = web_of(request)
    lang = page_language(request)
    sent = await web.db(q.sent_campaigns)
    items = []
    for campaign_id, first in sent:
        entry = await run_in_threadpool(archive_of(request).entry, web.settings, campaign_id)
        if entry is not None:
            when = first.astimezone(web.settings.tz)
            items.append((campaign_id, entry.rendition.campaign.display_title, when))
    return render(request, "archive.html", lang=lang, title=strings(lang)["archive_title"],
                  items=items)
