"""The subscriber pages: subscribe, confirm, unsubscribe (RFC 8058 one-click), preferences.

Only POST changes anything: every GET (and so HEAD) route only shows a page, and the pages that
act (confirm, unsubscribe, preferences) are a form with one button. Mail scanners fetch links;
they must not subscribe or unsubscribe anyone.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select
from starlette.background import BackgroundTask
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import subscribers as subs
from ..audience import email_key, normalise_address
from ..store import queries as q
from ..store.subscriber_tables import confirm_nonces
from ..tokens import ManageToken, TokenError
from . import archive
from .common import (
    HERE,
    Web,
    client_ip,
    csrf_ok,
    csrf_value,
    message,
    page_language,
    read_form,
    render,
    user_agent,
    web_of,
)
from .i18n import FORM_VERSION, list_title, strings
from .security import rate_key

TOKEN_MAX = 1500
ONE_CLICK = "One-Click"
NAME_MAX = 100  # on the form; what staff import may be longer (subscribers.NAME_MAX)
# What a name typed into the form may not contain: address syntax (a display name that parses
# as more addresses), links (a confirmation mail is not a way to send someone a URL).
_NAME_REFUSED = re.compile(r"[@<>,;:]|//|\bwww\.|[^\W_][\w-]+\.[a-z]{2,63}\b|xn--", re.I)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def routes() -> list[BaseRoute]:
    # GET routes answer HEAD too (Starlette); the handlers that write are POST-only routes.
    return [
        Route("/", lambda request: RedirectResponse("/subscribe", status_code=303)),
        Route("/subscribe", subscribe_form, methods=["GET"]),
        Route("/subscribe", subscribe, methods=["POST"]),
        Route("/confirm/{token}", confirm_page, methods=["GET"]),
        Route("/confirm/{token}", confirm, methods=["POST"]),
        Route("/unsubscribe", unsubscribe_howto, methods=["GET"]),
        Route("/unsubscribe/{token}", unsubscribe_page, methods=["GET"]),
        Route("/unsubscribe/{token}", unsubscribe, methods=["POST"]),
        Route("/preferences/{token}", preferences_page, methods=["GET"]),
        Route("/preferences/{token}", preferences, methods=["POST"]),
        *archive.routes(),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _origin(request: Request, source: str, **extra: str) -> subs.Origin:
    return subs.Origin(source=source, ip=client_ip(request), user_agent=user_agent(request),
                       **extra)


# --- subscribe ------------------------------------------------------------------------------


def _subscribe_page(request: Request, *, lang: str, values: dict[str, Any],
                    errors: dict[str, str], status: int = 200) -> Response:
    offered = web_of(request).settings.web.subscribe_lists
    lists = [(name, _title(request, name, lang)) for name in offered]
    return render(request, "subscribe.html", lang=lang, status=status,
                  csrf_value=csrf_value(request), values=values, errors=errors, lists=lists,
                  title=strings(lang)["subscribe_title"])


async def subscribe_form(request: Request) -> Response:
    lang = page_language(request)
    offered = web_of(request).settings.web.subscribe_lists
    values = {"email": "", "name": "", "language": lang, "lists": offered[:1]}
    return _subscribe_page(request, lang=lang, values=values, errors={})


def validate_subscription(form: FormData, *, languages: list[str], offered: list[str]
                          ) -> tuple[dict[str, Any], dict[str, str]]:
    """The form's values and, per field, the key of the error string to show."""
    raw_email = str(form.get("email") or "").strip()
    values: dict[str, Any] = {
        "email": raw_email[:320], "name": str(form.get("name") or "")[:400],
        "language": str(form.get("language") or ""),
        "lists": [x for x in dict.fromkeys(str(v) for v in form.getlist("lists"))],
    }
    errors: dict[str, str] = {}
    try:
        if len(raw_email) > subs.ADDRESS_MAX:
            raise ValueError("too long")
        values["email"] = normalise_address(raw_email)
    except ValueError:
        errors["email"] = "err_email"
    try:
        values["name"] = form_name(str(form.get("name") or ""))
    except ValueError:
        errors["name"] = "err_name"
    if values["language"] not in languages:
        errors["language"] = "err_language"
    if not values["lists"] or any(x not in offered for x in values["lists"]):
        errors["lists"] = "err_lists"
    return values, errors


def form_name(raw: str) -> str:
    """A name from the form, or ValueError: at most NAME_MAX characters, no control or
    bidirectional-override characters, nothing that looks like an address or a link."""
    name = subs.clean_name(raw)  # line breaks, control characters, < >
    if len(name) > NAME_MAX or _NAME_REFUSED.search(name):
        raise ValueError("not a name")
    if any(c in _BIDI_CONTROLS or unicodedata.category(c) == "Cc" for c in name):
        raise ValueError("not a name")
    return name


def plus_folded(address: str) -> str:
    """The address the per-address limit counts: lower case, `local+tag@` as `local@`."""
    local, _, domain = email_key(address).rpartition("@")
    base = local.split("+", 1)[0]
    return f"{base or local}@{domain}"


def confirmations_to_mailbox(conn: Connection, address: str, *, hours: int = 24) -> int:
    """Confirmation mails of the last `hours` to this address and its plus-tagged twins."""
    base = plus_folded(address)
    local, _, domain = base.rpartition("@")
    key = confirm_nonces.c.email_key
    return int(conn.execute(
        select(func.count()).select_from(confirm_nonces).where(
            confirm_nonces.c.created_at >= q.utcnow() - timedelta(hours=hours),
            or_(key == base, and_(key.startswith(f"{local}+", autoescape=True),
                                  key.endswith(f"@{domain}", autoescape=True))))
    ).scalar_one())


def _request_subscription(conn: Connection, web: Web, values: dict[str, Any],
                          origin: subs.Origin) -> str | None:
    if confirmations_to_mailbox(conn, values["email"]) >= web.per_address_per_day:
        return None  # `a+1@`, `A+2@`, … are one mailbox: no bombing it by tags
    return subs.request_subscription(
        conn, email=values["email"], name=values["name"], language=values["language"],
        lists=values["lists"], origin=origin, per_day=web.per_address_per_day)


async def subscribe(request: Request) -> Response:
    web = web_of(request)
    lang = page_language(request)
    t = strings(lang)
    if not web.ip_limit.allow(rate_key(client_ip(request))):
        limited = message(request, lang=lang, title=t["error_title"], text=t["err_rate"],
                          status=429)
        limited.headers["Retry-After"] = "600"
        return limited
    form = await read_form(request)
    if not csrf_ok(request, form):
        return message(request, lang=lang, title=t["error_title"], text=t["err_form"], status=403)
    thanks = {"title": t["thanks_title"], "text": t["thanks"]}
    if form.get("website"):  # the honeypot: invisible to people, filled in by bots
        return message(request, lang=lang, title=thanks["title"], text=thanks["text"])
    values, errors = validate_subscription(form, languages=web.settings.web.languages,
                                           offered=web.settings.web.subscribe_lists)
    if errors:
        return _subscribe_page(request, lang=lang, values=values, errors=errors, status=400)
    origin = _origin(request, "web", form_version=FORM_VERSION, form_text=t["consent"])
    nonce = await web.db(lambda c: _request_subscription(c, web, values, origin))
    # The same answer whether the address is new, known, or over its limit (no enumeration);
    # the mail goes out after the answer, so its timing gives nothing away either.
    task = None
    if nonce is not None:
        task = BackgroundTask(web.send_confirmation, email=values["email"],
                              name=values["name"], language=values["language"],
                              lists=values["lists"], nonce=nonce)
    response = message(request, lang=lang, title=thanks["title"], text=thanks["text"])
    response.background = task
    return response


# --- confirm --------------------------------------------------------------------------------


def _confirm_token(request: Request) -> tuple[str, list[str], str] | None:
    token = request.path_params["token"]
    if len(token) > TOKEN_MAX:
        return None
    try:
        return web_of(request).tokens.read_confirm(token)
    except TokenError:
        return None


def _confirm_state(conn: Connection, email: str, nonce: str) -> tuple[str, str]:
    """(pending | already | unknown, the subscriber's language) — reading only."""
    row = conn.execute(select(confirm_nonces).where(confirm_nonces.c.nonce == nonce)).first()
    sub = subs.find_subscriber(conn, email_key(email))
    if row is None or sub is None or row.email_key != email_key(email):
        return "unknown", ""
    return ("already" if row.used_at is not None else "pending"), str(sub["language"])


async def confirm_page(request: Request) -> Response:
    """GET: one button that POSTs. Opening the link (as mail scanners do) confirms nothing."""
    web = web_of(request)
    parsed = _confirm_token(request)
    if parsed is None:
        return _invalid(request)
    email, lists, nonce = parsed
    state, language = await web.db(lambda c: _confirm_state(c, email, nonce))
    if state == "unknown":
        return _invalid(request)
    lang = page_language(request, language)
    t = strings(lang)
    if state == "already":
        return _confirmed(request, lang, email, lists, t["already"])
    titles = ", ".join(_title(request, x, lang) for x in lists)
    return render(request, "confirm.html", lang=lang, csrf_value=csrf_value(request),
                  title=t["confirm_title"], ask=t["confirm_ask"].format(email=email,
                                                                        lists=titles))


async def confirm(request: Request) -> Response:
    web = web_of(request)
    parsed = _confirm_token(request)
    if parsed is None:
        return _invalid(request)
    email, _lists, nonce = parsed
    form = await read_form(request)
    if not csrf_ok(request, form):
        lang = page_language(request)
        t = strings(lang)
        return message(request, lang=lang, title=t["error_title"], text=t["err_form"], status=403)
    result = await web.db(lambda c: subs.confirm(c, email=email, nonce=nonce,
                                                 origin=_origin(request, "web")))
    if result.status == "unknown":
        return _invalid(request)
    lang = page_language(request, result.language)
    t = strings(lang)
    text = t["confirmed"] if result.status == "confirmed" else t["already"]
    return _confirmed(request, lang, email, result.lists, text)


def _confirmed(request: Request, lang: str, email: str, lists: list[str], text: str
               ) -> Response:
    manage = web_of(request).tokens.manage(email, lists[0] if lists else "")
    return message(request, lang=lang, title=strings(lang)["confirmed_title"], text=text,
                   preferences_url=f"/preferences/{manage}")


def _title(request: Request, list_name: str, lang: str) -> str:
    return list_title(list_name, lang, web_of(request).settings.lists)


def _invalid(request: Request) -> Response:
    lang = page_language(request)
    t = strings(lang)
    return message(request, lang=lang, title=t["invalid_title"], text=t["invalid"], status=400,
                   back=True)


def _manage_token(request: Request) -> ManageToken | None:
    token = request.path_params["token"]
    if len(token) > TOKEN_MAX:
        return None
    try:
        parsed = web_of(request).tokens.read_manage(token)
        email_key(normalise_address(parsed.email))
    except (TokenError, ValueError):
        return None
    return parsed if parsed.list else None


# --- unsubscribe ----------------------------------------------------------------------------


async def _unsubscribe_context(request: Request, token: ManageToken
                               ) -> tuple[str, dict[str, str], dict[str, str]]:
    web = web_of(request)
    sub = await web.db(lambda c: subs.find_subscriber(c, email_key(token.email)))
    lang = page_language(request, sub["language"] if sub else "")
    return lang, strings(lang), {"email": token.email, "list": _title(request, token.list, lang)}


async def unsubscribe_howto(request: Request) -> Response:
    """Where the archive's "unsubscribe" leads: no token, so say how (own mail, or mail us)."""
    lang = page_language(request)
    t = strings(lang)
    address = web_of(request).settings.unsubscribe_mailto
    return message(request, lang=lang, title=t["unsubscribe_title"], text=t["unsubscribe_howto"],
                   mailto=f"mailto:{address}?subject={urllib.parse.quote(t['unsubscribe_title'])}",
                   back=True)


async def unsubscribe_page(request: Request) -> Response:
    """GET (and HEAD): the one-button page; nothing changes until it is pressed."""
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    lang, t, fmt = await _unsubscribe_context(request, token)
    return render(request, "unsubscribe.html", lang=lang, csrf_value=csrf_value(request),
                  title=t["unsubscribe_title"], ask=t["unsubscribe_ask"].format(**fmt))


async def unsubscribe(request: Request) -> Response:
    web = web_of(request)
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    lang, t, fmt = await _unsubscribe_context(request, token)
    form = await read_form(request)
    # RFC 8058 §3.2: the mail client POSTs "List-Unsubscribe=One-Click" with no cookie and
    # expects it done, no confirmation page. The signed token in the URL is the credential.
    one_click = form.get("List-Unsubscribe") == ONE_CLICK
    if not one_click and not csrf_ok(request, form):
        return message(request, lang=lang, title=t["error_title"], text=t["err_form"], status=403)
    origin = _origin(request, "one-click" if one_click else "web",
                     form_text=f"campaign {token.campaign}" if token.campaign else "")
    await web.db(lambda c: subs.unsubscribe(c, web.settings, email=token.email,
                                            list_name=token.list, origin=origin))
    return message(request, lang=lang, title=t["unsubscribed_title"],
                   text=t["unsubscribed"].format(**fmt),
                   preferences_url=f"/preferences/{request.path_params['token']}")


# --- preferences ----------------------------------------------------------------------------


def _preferences_state(conn: Any, settings: Any, token: ManageToken) -> dict[str, Any]:
    key = email_key(token.email)
    sub = subs.find_subscriber(conn, key)
    status = subs.statuses(conn, int(sub["id"])) if sub else {}
    suppressed = subs.list_suppressed(conn, key)
    offered = list(settings.web.subscribe_lists)
    if token.list not in offered:
        offered.append(token.list)
    chosen = set()
    for name in offered:
        if subs.is_managed(settings, name):
            if status.get(name) == "subscribed" and "*" not in suppressed:
                chosen.add(name)
        elif name not in suppressed and "*" not in suppressed:
            chosen.add(name)
    return {"language": sub["language"] if sub else "", "offered": offered, "chosen": chosen}


async def preferences_page(request: Request) -> Response:
    """GET (and HEAD): the form; nothing changes until it is sent."""
    web = web_of(request)
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    state = await web.db(lambda c: _preferences_state(c, web.settings, token))
    return _preferences_form(request, token, state, page_language(request, state["language"]))


async def preferences(request: Request) -> Response:
    web = web_of(request)
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    state = await web.db(lambda c: _preferences_state(c, web.settings, token))
    form = await read_form(request)
    lang = page_language(request, state["language"])
    t = strings(lang)
    if not csrf_ok(request, form):
        return message(request, lang=lang, title=t["error_title"], text=t["err_form"],
                       status=403)
    if form.get("action") == "all":
        origin = _origin(request, "preferences")
        await web.db(lambda c: subs.unsubscribe_all(c, web.settings, email=token.email,
                                                    origin=origin))
        return message(request, lang=lang, title=t["unsubscribed_title"],
                       text=t["unsubscribed_all"].format(email=token.email))
    language = str(form.get("language") or "")
    if language not in web.settings.web.languages:
        language = ""
    wanted = {str(v) for v in form.getlist("lists")} & set(state["offered"])
    origin = _origin(request, "preferences")
    await web.db(lambda c: subs.set_preferences(
        c, web.settings, email=token.email, language=language, wanted=wanted,
        offered=state["offered"], origin=origin))
    state = await web.db(lambda c: _preferences_state(c, web.settings, token))
    lang = state["language"] or page_language(request)  # the language just chosen
    return _preferences_form(request, token, state, lang, notice="saved")


def _preferences_form(request: Request, token: ManageToken, state: dict[str, Any], lang: str,
                      notice: str = "") -> Response:
    t = strings(lang)
    lists = [(name, _title(request, name, lang)) for name in state["offered"]]
    return render(request, "preferences.html", lang=lang, csrf_value=csrf_value(request),
                  title=t["preferences_title"], email=token.email, lists=lists,
                  chosen=state["chosen"], current=state["language"] or lang,
                  notice=t[notice] if notice else "")

