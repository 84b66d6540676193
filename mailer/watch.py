"""`mailer preview CAMPAIGN --watch`: the rendered mail on a local page that follows every save.

The page shows the mail at desktop (600 px) and phone (375 px) width side by side, one switch per
campaign language, the subject and preheader as an inbox line shows them, and the text part. A
poller looks at the campaign file, the templates and the list files every POLL_S seconds and
renders again when one of them changed; the page asks for the version and swaps in the new
rendering without a reload. A save that does not render shows its errors, as `mailer validate`
prints them, above the last good rendering.

The server listens on loopback only, whatever the configuration says: the page shows real
recipients' names and addresses. It also refuses requests for any other host name (a web page
that points a name of its own at 127.0.0.1 cannot read it: DNS rebinding), sends a
Content-Security-Policy with every response, and serves nothing but the preview.
"""

from __future__ import annotations

import asyncio
import html
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .campaign import CampaignProblems, find_campaign
from .checks import check_campaign
from .compose import Composer
from .config import Settings
from .errors import CampaignError, UserError
from .preview import MailPreview, preview_mails
from .tokens import Tokens
from .web.security import SecurityHeaders

log = logging.getLogger("mailer.watch")

HOST = "127.0.0.1"  # never anything else: the page shows real recipients
DEFAULT_PORT = 8025
POLL_S = 0.3
WIDTHS = {"desktop": 600, "phone": 375}

# The page: our own script and style only, frames and requests only to us.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "frame-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; "
            "base-uri 'none'")
# The mail inside its (sandboxed) frame: inline styles and remote images, as a mail program
# shows it; no script, no form, framed by the page only.
MAIL_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src https: http: data:; "
            "form-action 'none'; frame-ancestors 'self'; base-uri 'none'")

Stamp = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Snapshot:
    """What the page shows: the last good rendering, and the errors of the latest save."""

    version: int = 0
    mails: tuple[MailPreview, ...] = ()
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    rendered_at: str = ""

    def mail(self, lang: str) -> MailPreview | None:
        return next((m for m in self.mails if m.lang == lang), None)


@dataclass
class Watcher:
    """Renders one campaign again whenever a file it depends on changed."""

    settings: Settings
    path: Path
    langs: list[str] = field(default_factory=list)
    recipient: str | None = None
    snapshot: Snapshot = field(default_factory=Snapshot)
    _stamp: Stamp | None = None

    def stamp(self) -> Stamp:
        """(path, mtime, size) of the campaign file, every template and every list file."""
        out = []
        for path in (self.path, *_files(self.settings.templates_dir),
                     *_files(self.settings.lists_dir)):
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:  # deleted between listing and looking: that is a change too
                out.append((str(path), -1, -1))
        return tuple(out)

    def refresh(self) -> bool:
        """Render again if anything changed since the last time; True when it did."""
        stamp = self.stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        old = self.snapshot
        now = datetime.now(self.settings.tz).strftime("%H:%M:%S")
        try:
            mails, warnings = self.render()
        except Exception as exc:  # the page shows it; the server keeps running
            self.snapshot = Snapshot(old.version + 1, old.mails, self.problems(exc),
                                     old.warnings, now)
            return True
        self.snapshot = Snapshot(old.version + 1, mails, (), warnings, now)
        return True

    def render(self) -> tuple[tuple[MailPreview, ...], tuple[str, ...]]:
        if not self.path.is_file():
            raise CampaignError("the file is gone (renamed or deleted?)", path=self.path)
        checked = check_campaign(self.path, self.settings)
        composer = Composer(checked.rendition, self.settings,
                            tokens=Tokens(self.settings.secret()))
        mails = preview_mails(checked, self.settings, composer, langs=self.langs,
                              recipient=self.recipient)
        return tuple(mails), tuple(f"warning: {w}" for w in checked.warnings)

    def problems(self, exc: Exception) -> tuple[str, ...]:
        """The error lines `mailer validate` prints for the same file."""
        if isinstance(exc, UserError):  # a file with several problems carries all of them
            each = exc.problems if isinstance(exc, CampaignProblems) else [exc]
            return tuple(f"error: {p.sentence()}" for p in each)
        log.debug("rendering %s crashed", self.path, exc_info=True)  # MAILER_LOG_LEVEL=DEBUG
        detail = " ".join(str(exc).split())[:300]
        return (f"error: {self.path}: could not be rendered ({type(exc).__name__}: {detail}); "
                "please report this",)

    async def poll(self, interval_s: float = POLL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.refresh)


def _files(directory: Path) -> Iterator[Path]:
    if directory.is_dir():
        yield from sorted(p for p in directory.rglob("*") if p.is_file())


# --- the page ---------------------------------------------------------------------------------


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def chosen(snap: Snapshot, wanted: str) -> MailPreview | None:
    return snap.mail(wanted) or (snap.mails[0] if snap.mails else None)


def page_html(watcher: Watcher, lang: str) -> str:
    snap = watcher.snapshot
    mail = chosen(snap, lang)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Preview: {e(watcher.path.name)}</title>"
            f'<link rel="stylesheet" href="/watch.css"><script src="/watch.js" defer></script>'
            f'</head><body data-lang="{e(mail.lang if mail else lang)}">'
            f'<div id="panel" data-version="{snap.version}">{panel_html(watcher, lang)}</div>'
            f"</body></html>\n")


CURRENT = ' aria-current="page"'


def panel_html(watcher: Watcher, lang: str) -> str:
    snap = watcher.snapshot
    mail = chosen(snap, lang)
    links = "".join(
        f'<a href="/?lang={e(m.lang)}" lang="{e(m.lang)}"{CURRENT if m is mail else ""}>'
        f"{e(m.lang)}</a>" for m in snap.mails)
    parts = [f'<header><h1>Preview of {e(watcher.path.name)}</h1>'
             f'<nav class="langs" aria-label="Language">{links}</nav>'
             f'<p class="state">rendered {e(snap.rendered_at)}, version {snap.version}'
             f'<span class="offline"> – mailer preview has stopped</span></p></header>']
    if snap.errors:
        lead = ("The last save does not render; below is the last version that did."
                if mail else "Nothing renders yet: fix the error and save again.")
        parts.append(f'<section class="errors" role="alert"><h2>{lead}</h2>'
                     f"<pre>{e(chr(10).join(snap.errors))}</pre></section>")
    if snap.warnings:
        parts.append(f'<section class="warnings"><pre>{e(chr(10).join(snap.warnings))}</pre>'
                     "</section>")
    if mail is not None:
        parts.append(mail_html(watcher, mail, snap.version))
    return "".join(parts)


def mail_html(watcher: Watcher, mail: MailPreview, version: int) -> str:
    sender = watcher.settings.sender.name
    to = f"{mail.recipient.name} <{mail.recipient.email}>" if mail.recipient.name \
        else mail.recipient.email
    frames = "".join(
        f'<figure><figcaption>{name} · {width} px</figcaption>'
        f'<iframe class="{name}" width="{width}" height="900" sandbox '
        f'referrerpolicy="no-referrer" title="{e(mail.lang)}, {name}, {width} px" '
        f'src="/mail/{e(mail.lang)}?v={version}"></iframe></figure>'
        for name, width in WIDTHS.items())
    return (f'<section class="inbox" aria-label="Inbox line">'
            f'<span class="from">{e(sender)}</span>'
            f'<span class="line" dir="{e(mail.dir)}" lang="{e(mail.lang)}">'
            f'<span class="subject">{e(mail.subject)}</span>'
            f'<span class="preheader">{e(mail.preheader)}</span></span>'
            f'<span class="to">to {e(to)}</span></section>'
            f'<div class="frames">{frames}</div>'
            f'<section class="text"><h2>Text part</h2>'
            f'<pre dir="{e(mail.dir)}" lang="{e(mail.lang)}">{e(mail.text)}</pre></section>')


SCRIPT = """\
"use strict";
(() => {
  const panel = document.getElementById("panel");
  async function tick() {
    try {
      const r = await fetch("/version", {cache: "no-store"});
      const {version} = await r.json();
      if (String(version) !== panel.dataset.version) {
        const lang = encodeURIComponent(document.body.dataset.lang);
        const p = await fetch("/panel?lang=" + lang, {cache: "no-store"});
        if (p.ok) {
          panel.innerHTML = await p.text();
          panel.dataset.version = p.headers.get("X-Preview-Version");
        }
      }
      document.body.classList.remove("stopped");
    } catch (err) {
      document.body.classList.add("stopped");
    }
    setTimeout(tick, 400);
  }
  setTimeout(tick, 400);
})();
"""

STYLE = """\
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 1rem 2rem; color: #222; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline; }
h1 { font-size: 1.1rem; }
h2 { font-size: 1rem; margin: 0 0 .5rem; }
.langs a { padding: .2rem .6rem; border: 1px solid #888; border-radius: 1rem; margin-right: .3rem;
  text-decoration: none; color: #222; }
.langs a[aria-current] { background: #222; color: #fff; }
.state { color: #666; font-size: .85rem; }
.offline { display: none; color: #b00; }
.stopped .offline { display: inline; }
.errors { border: 2px solid #b00; background: #fff3f3; padding: .5rem 1rem; margin: .5rem 0; }
.warnings { border: 1px solid #c80; background: #fffbe8; padding: .2rem 1rem; margin: .5rem 0; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.inbox { display: grid; grid-template-columns: 14rem 1fr; gap: 0 1rem; max-width: 1000px;
  border: 1px solid #ccc; padding: .5rem .8rem; margin: .5rem 0 1rem; }
.inbox .from, .inbox .subject { font-weight: bold; }
.inbox .line { overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
.inbox .preheader { color: #666; }
.inbox .preheader:not(:empty)::before { content: " – "; }
.inbox .to { grid-column: 2; color: #666; font-size: .85rem; }
.frames { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
figure { margin: 0; }
figcaption { color: #666; font-size: .85rem; }
iframe { border: 1px solid #ccc; background: #fff; }
.text pre { max-width: 76ch; border: 1px solid #ccc; padding: .5rem 1rem; background: #fafafa; }
"""


# --- the app ----------------------------------------------------------------------------------


def create_watch_app(watcher: Watcher) -> Starlette:
    def page(request: Request) -> Response:
        lang = request.query_params.get("lang", "")
        return HTMLResponse(page_html(watcher, lang), headers={"Content-Security-Policy": PAGE_CSP})

    def panel(request: Request) -> Response:
        snap_version = watcher.snapshot.version  # before rendering: never claim a newer one
        body = panel_html(watcher, request.query_params.get("lang", ""))
        return HTMLResponse(body, headers={"Content-Security-Policy": PAGE_CSP,
                                           "X-Preview-Version": str(snap_version)})

    def version(request: Request) -> Response:
        return JSONResponse({"version": watcher.snapshot.version})

    def mail(request: Request) -> Response:
        found = watcher.snapshot.mail(request.path_params["lang"])
        if found is None:
            return Response("no such language", status_code=404, media_type="text/plain")
        return HTMLResponse(found.html, headers={"Content-Security-Policy": MAIL_CSP,
                                                 "X-Frame-Options": "SAMEORIGIN"})

    def asset(body: str, media_type: str) -> Callable[[Request], Response]:
        return lambda request: Response(body, media_type=media_type)

    return Starlette(
        routes=[Route("/", page), Route("/panel", panel), Route("/version", version),
                Route("/mail/{lang}", mail),
                Route("/watch.js", asset(SCRIPT, "text/javascript; charset=utf-8")),
                Route("/watch.css", asset(STYLE, "text/css; charset=utf-8"))],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"]),
                    Middleware(SecurityHeaders)])


# --- serving ----------------------------------------------------------------------------------


def bind_loopback(port: int | None) -> socket.socket:
    """A socket on 127.0.0.1: `port`, else DEFAULT_PORT or, when that is taken, a free one."""
    for candidate in [port] if port is not None else [DEFAULT_PORT, 0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, candidate))
            return sock
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
    raise UserError(f"cannot listen on {HOST}:{port} ({reason}): pick another port with "
                    "--port (0 picks a free one)")


async def serve_watch(watcher: Watcher, sock: socket.socket, *,
                      echo: Callable[[str], None]) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_watch_app(watcher), log_level="warning",
                                           lifespan="off", access_log=False))
    url = f"http://{HOST}:{sock.getsockname()[1]}/"

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        echo(f"live preview of {watcher.path} on {url} (Ctrl-C stops)")

    tasks = [asyncio.create_task(watcher.poll()), asyncio.create_task(announce())]
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in tasks:
            task.cancel()


def run_watch(settings: Settings, ref: str, *, port: int | None, langs: list[str],
              recipient: str | None, echo: Callable[[str], None]) -> None:
    """Serve the live preview until Ctrl-C."""
    path = find_campaign(ref, settings)
    if not path.is_file():
        raise CampaignError("no such campaign file", path=path)
    watcher = Watcher(settings, path, langs=langs, recipient=recipient)
    watcher.refresh()  # a broken file still starts the server: the page shows what is wrong
    sock = bind_loopback(port)
    try:
        asyncio.run(serve_watch(watcher, sock, echo=echo))
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        pass
    finally:
        sock.close()
    echo("stopped")
