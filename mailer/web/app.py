"""The Starlette app: the application object, its lifespan and its error pages.

The pages themselves are in `pages.py` (the archive in `archive.py`, /healthz and /metrics in
`ops.py`); what they share with this module (the `Web` state, rendering, the request helpers)
is in `common.py`. Database work runs in the thread pool (the store is SQLAlchemy's sync
engine); the SMTP transport lives as long as the app (lifespan) unless a test hands one in.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match

from ..config import Settings
from ..store import Store, open_store
from ..tokens import Tokens
from ..transport import Transport
from .common import Web, message, page_language
from .i18n import LANGUAGE_NAMES, strings
from .ops import routes as ops_routes
from .pages import routes
from .security import ClientAddress, Csrf, SecurityHeaders, SlidingWindow
from .server import install_log_filters

MAX_BODY_BYTES = 64 * 1024


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
    web = Web(
        settings=settings,
        store=store or open_store(settings.database_url, var_dir=settings.var_dir),
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
