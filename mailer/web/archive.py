"""The archive behind every mail's "view online" link: campaigns that went out, as sent.

Only campaigns with at least one delivered message are shown (drafts stay private), and never
personalised: merge fields are empty, and the footer links lead to the subscribe page.
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

from ..audience import Recipient, columns
from ..campaign import ID_RE, campaign_files, load_campaign
from ..checks import check_campaign
from ..config import Settings
from ..errors import UserError
from ..render import Links, Rendition, personalise
from ..store import queries as q
from .app import page_language, render, web_of
from .i18n import strings

# The mail's own HTML: inline styles, remote images, nothing else (no scripts, no forms).
ARCHIVE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def routes() -> list[BaseRoute]:
    return [Route("/archive", archive_index, methods=["GET"]),
            Route("/archive/{campaign_id}", archive_page, methods=["GET"])]


@dataclass(frozen=True)
class Entry:
    mtime_ns: int
    rendition: Rendition
    columns: frozenset[str]


class Renditions:
    """Rendered campaigns by id, rendered again only when their file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}

    def get(self, settings: Settings, campaign_id: str) -> Entry | None:
        path = _file_of(settings, campaign_id)
        if path is None:
            return None
        mtime = path.stat().st_mtime_ns
        with self._lock:
            entry = self._entries.get(campaign_id)
            if entry is not None and entry.mtime_ns == mtime:
                return entry
        try:
            checked = check_campaign(path, settings, with_audience=False)
        except UserError:
            return None
        lists = checked.campaign.audience.lists
        entry = Entry(mtime, checked.rendition, frozenset(columns(lists, settings)))
        with self._lock:
            self._entries[campaign_id] = entry
        return entry


_renditions = Renditions()


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
    entry = await run_in_threadpool(_renditions.get, web.settings, campaign_id)
    if entry is None:
        raise HTTPException(404)
    lr = entry.rendition.for_language(request.query_params.get("lang", ""))
    base = web.settings.base_url
    public = Recipient(email="", name="", language=lr.lang,
                       fields={c: "" for c in entry.columns})
    links = Links(unsubscribe=f"{base}/subscribe?lang={lr.lang}",
                  preferences=f"{base}/subscribe?lang={lr.lang}",
                  view_online=f"{base}/archive/{campaign_id}?lang={lr.lang}")
    html = personalise(lr, public, links).html
    return HTMLResponse(html, headers={"Content-Security-Policy": ARCHIVE_CSP,
                                       "Cache-Control": "public, max-age=300"})


async def archive_index(request: Request) -> Response:
    web = web_of(request)
    lang = page_language(request)
    sent = await web.db(q.sent_campaigns)
    items = []
    for campaign_id, first in sent:
        entry = await run_in_threadpool(_renditions.get, web.settings, campaign_id)
        if entry is not None:
            when = first.astimezone(web.settings.tz)
            items.append((campaign_id, entry.rendition.campaign.display_title, when))
    return render(request, "archive.html", lang=lang, title=strings(lang)["archive_title"],
                  items=items)
