"""The Starlette app: the application object, its lifespan and the shared request helpers.

The pages themselves are in `pages.py`. Database work runs in the thread pool (the store is
SQLAlchemy's sync engine); the SMTP transport lives as long as the app (lifespan) unless a test
hands one in.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import Connection
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match
from starlette.templating import Jinja2Templates

from ..config import Settings
from ..redact import redact_addresses
from ..store import Store, open_store
from ..store import queries as q
from ..tokens import Tokens
from ..transport import Transport
from .i18n import LANGUAGE_NAMES, negotiate, strings, text_dir
from .mails import send_confirmation
from .security import ClientAddress, Csrf, SecurityHeaders, SlidingWindow
from .server import install_log_filters

log = logging.getLogger("mailer.web")
HERE = Path(__file__).parent
MAX_BODY_BYTES = 64 * 1024
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
T = TypeVar("T")


@dataclass
class Web:
    """Everything a request handler needs, kept on `app.state.web`."""

    settings: Settings
    store: Store
    tokens: Tokens
    csrf: Csrf
    ip_limit: SlidingWindow
    per_address_per_day: int
    transport: Transport | None = None
    templates: Jinja2Templates = field(
        default_factory=lambda: Jinja2Templates(directory=str(HERE / "templates")))

    async def db(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` in one transaction, off the event loop."""
        return await q.in_transaction(self.store.engine, fn)

    async def send_confirmation(self, *, email: str, name: str, language: str,
                                lists: Sequence[str], nonce: str) -> None:
        if self.transport is None:
            log.error("no transport: a confirmation mail was not sent")
            return
        try:
            await send_confirmation(self.transport, self.settings, self.tokens, email=email,
                                    name=name, language=language, lists=lists, nonce=nonce)
        except Exception as exc:  # the page has been answered already; the log is all we have
            # Exception texts quote the address (a refused recipient, a database row).
            log.error("a confirmation mail failed: %s: %s", type(exc).__name__,
                      redact_addresses(exc))
            log.debug("a confirmation mail failed", exc_info=True)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    transport: Transport | None = None,
    ip_limit: int = 20,
    ip_window_s: float = 3600.0,
    per_address_per_day: int = 3,
) -> Starlette:
    """The web app. Pass `transport` (e.g. an SmtpPool at a test server) to use it instead of
    opening the configured one for the app's lifetime; the caller then closes it."""
    from .ops import routes as ops_routes
    from .pages import routes

    web = Web(
        settings=settings,
        store=store or open_store(settings.database_url),
        tokens=Tokens(settings.secret()),
        csrf=Csrf(settings.secret(), secure=settings.base_url.startswith("https://")),
        ip_limit=SlidingWindow(limit=ip_limit, window_s=ip_window_s),
        per_address_per_day=per_address_per_day,
        transport=transport,
    )
    web.templates.env.globals["language_names"] = LANGUAGE_NAMES

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from ..relay import open_transport

        if web.transport is not None:
            yield
            return
        if settings.smtp.embedded:  # the capture server's maildir needs its parent (var/)
            settings.outbox_dir.parent.mkdir(parents=True, exist_ok=True)
        async with open_transport(settings) as opened:
            web.transport = opened
            try:
                yield
            finally:
                web.transport = None

    app = Starlette(
        routes=[*ops_routes(), *routes()],  # /healthz, /metrics (web/ops.py)
        middleware=[
            # First: the rate limits, the consent log and the access log see the real client.
            Middleware(ClientAddress, trusted=settings.web.trusted_proxies),
            Middleware(SecurityHeaders, hsts=web.csrf.secure),
        ],
        exception_handlers={HTTPException: http_error, 500: server_error},
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
    )
    # Starlette's own slash redirect builds an absolute URL from the Host header (a redirect
    # to any site named in a request); `http_error` redirects relatively instead.
    app.router.redirect_slashes = False
    app.state.web = web
    install_log_filters()
    return app


def web_of(request: Request) -> Web:
    web: Web = request.app.state.web
    return web


def page_language(request: Request, preferred: str = "") -> str:
    """?lang= first, then the subscriber's stored language, then Accept-Language."""
    offered = web_of(request).settings.web.languages
    asked = request.query_params.get("lang", "")
    if asked in offered:
        return asked
    if preferred in offered:
        return preferred
    return negotiate(request.headers.get("accept-language", ""), offered)


def client_ip(request: Request) -> str:
    """The client's IP: the TCP peer, or behind a trusted proxy the address it forwards
    (resolved by ClientAddress; never an X-Forwarded-For from anyone else)."""
    return request.client.host if request.client else ""


def user_agent(request: Request) -> str:
    return request.headers.get("user-agent", "")[:300]


def render(request: Request, template: str, *, lang: str, status: int = 200,
           csrf_value: str | None = None, **context: Any) -> Response:
    web = web_of(request)
    org = web.settings.organisation
    ctx = {
        "t": strings(lang), "lang": lang, "dir": text_dir(lang), "org": org,
        "languages": web.settings.web.languages, "privacy_email": org.email, **context,
    }
    if csrf_value is not None:
        ctx["csrf"] = web.csrf.field_for(csrf_value)
    response = web.templates.TemplateResponse(request, template, ctx, status_code=status)
    if csrf_value is not None:
        response.set_cookie(web.csrf.cookie, csrf_value, httponly=True, samesite="strict",
                            secure=web.csrf.secure, path="/")
    return response


def csrf_value(request: Request) -> str:
    """The browser's CSRF cookie value, or a new one."""
    web = web_of(request)
    value = request.cookies.get(web.csrf.cookie, "")
    return value if _COOKIE_VALUE.match(value) else web.csrf.new_value()


def csrf_ok(request: Request, form: FormData) -> bool:
    web = web_of(request)
    field_value = form.get(Csrf.FIELD)
    return web.csrf.check(request.cookies.get(web.csrf.cookie),
                          field_value if isinstance(field_value, str) else None)


async def read_form(request: Request) -> FormData:
    """The posted form, small by construction: no files, few fields, short values."""
    try:
        form = await request.form(max_files=0, max_fields=30, max_part_size=8 * 1024)
    except ClientDisconnect:  # gone, or cut off for sending too slowly: not a server error
        raise HTTPException(400, "client disconnected") from None
    if any(isinstance(v, UploadFile) for _, v in form.multi_items()):
        raise HTTPException(400, "no files")
    return form


def message(request: Request, *, lang: str, title: str, text: str, status: int = 200,
            **context: Any) -> Response:
    return render(request, "message.html", lang=lang, status=status, title=title, text=text,
                  **context)


def slash_redirect(request: Request) -> Response | None:
    """For a 404: a relative redirect to the same path with the trailing slash toggled, when
    that path exists. Never to another host: "//host" or "/\\host" paths are not redirected."""
    path = request.scope["path"]
    if path == "/" or path.startswith(("//", "/\\")):
        return None
    other = path.rstrip("/") if path.endswith("/") else path + "/"
    if not other.startswith("/") or other.startswith(("//", "/\\")):
        return None
    scope = {**request.scope, "path": other}
    if not any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
        return None
    location = quote(other)  # percent-encoded: no tab or backslash for a browser to drop
    query = request.scope.get("query_string", b"").decode("latin-1")
    return RedirectResponse(location + (f"?{quote(query, safe='=&;%+')}" if query else ""),
                            status_code=308)


async def http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    if status == 404 and (redirect := slash_redirect(request)) is not None:
        return redirect
    lang = page_language(request)
    t = strings(lang)
    text = t["not_found"] if status == 404 else t["invalid"] if status < 500 else t["error"]
    headers = getattr(exc, "headers", None) or {}
    response = message(request, lang=lang, title=t["error_title"], text=text, status=status)
    response.headers.update(headers)
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    lang = page_language(request)
    t = strings(lang)
    return message(request, lang=lang, title=t["error_title"], text=t["error"], status=500)
