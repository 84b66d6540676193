"""What the app and its pages share: the `Web` state object on `app.state.web` and the
request helpers (the page language, rendering, CSRF, the posted form).

`app.py` builds the application from these and the routes of `pages.py`, `archive.py` and
`ops.py`; those modules import this one, never `app.py`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from ..config import Settings
from ..redact import redact_addresses
from ..store import Store
from ..store import queries as q
from ..tokens import Tokens
from ..transport import Transport
from .i18n import negotiate, strings, text_dir
from .mails import send_confirmation
from .security import Csrf, SlidingWindow

log = logging.getLogger("mailer.web")
HERE = Path(__file__).parent
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
