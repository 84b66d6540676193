"""The subscriber pages: subscribe, confirm, unsubscribe (RFC 8058 one-click), preferences."""

from __future__ import annotations

from typing import Any

from starlette.background import BackgroundTask
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import subscribers as subs
from ..audience import email_key, normalise_address
from ..tokens import ManageToken, TokenError
from . import archive
from .app import (
    HERE,
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

TOKEN_MAX = 1500
ONE_CLICK = "One-Click"


def routes() -> list[BaseRoute]:
    return [
        Route("/", lambda request: RedirectResponse("/subscribe", status_code=303)),
        Route("/subscribe", subscribe_form, methods=["GET"]),
        Route("/subscribe", subscribe, methods=["POST"]),
        Route("/confirm/{token}", confirm, methods=["GET"]),
        Route("/unsubscribe/{token}", unsubscribe, methods=["GET", "POST"]),
        Route("/preferences/{token}", preferences, methods=["GET", "POST"]),
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
    lists = [(name, list_title(name, lang)) for name in offered]
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
        values["name"] = subs.clean_name(str(form.get("name") or ""))
    except ValueError:
        errors["name"] = "err_name"
    if values["language"] not in languages:
        errors["language"] = "err_language"
    if not values["lists"] or any(x not in offered for x in values["lists"]):
        errors["lists"] = "err_lists"
    return values, errors


async def subscribe(request: Request) -> Response:
    web = web_of(request)
    lang = page_language(request)
    t = strings(lang)
    if not web.ip_limit.allow(client_ip(request)):
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
    nonce = await web.db(lambda c: subs.request_subscription(
        c, email=values["email"], name=values["name"], language=values["language"],
        lists=values["lists"], origin=origin, per_day=web.per_address_per_day))
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


async def confirm(request: Request) -> Response:
    web = web_of(request)
    token = request.path_params["token"]
    try:
        if len(token) > TOKEN_MAX:
            raise TokenError("too long")
        email, _lists, nonce = web.tokens.read_confirm(token)
    except TokenError:
        return _invalid(request)
    result = await web.db(lambda c: subs.confirm(c, email=email, nonce=nonce,
                                                 origin=_origin(request, "web")))
    if result.status == "unknown":
        return _invalid(request)
    lang = page_language(request, result.language)
    t = strings(lang)
    manage = web.tokens.manage(email, result.lists[0] if result.lists else "")
    text = t["confirmed"] if result.status == "confirmed" else t["already"]
    return message(request, lang=lang, title=t["confirmed_title"], text=text,
                   preferences_url=f"/preferences/{manage}")


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


async def unsubscribe(request: Request) -> Response:
    web = web_of(request)
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    sub = await web.db(lambda c: subs.find_subscriber(c, email_key(token.email)))
    lang = page_language(request, sub["language"] if sub else "")
    t = strings(lang)
    fmt = {"email": token.email, "list": list_title(token.list, lang)}
    if request.method == "GET":
        return render(request, "unsubscribe.html", lang=lang, csrf_value=csrf_value(request),
                      title=t["unsubscribe_title"], ask=t["unsubscribe_ask"].format(**fmt))
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


async def preferences(request: Request) -> Response:
    web = web_of(request)
    token = _manage_token(request)
    if token is None:
        return _invalid(request)
    state = await web.db(lambda c: _preferences_state(c, web.settings, token))
    notice = ""
    if request.method == "POST":
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
        notice = "saved"
    lang = page_language(request, state["language"])
    if request.method == "POST" and state["language"]:
        lang = state["language"]  # the page follows the language just chosen
    t = strings(lang)
    lists = [(name, list_title(name, lang)) for name in state["offered"]]
    return render(request, "preferences.html", lang=lang, csrf_value=csrf_value(request),
                  title=t["preferences_title"], email=token.email, lists=lists,
                  chosen=state["chosen"], current=state["language"] or lang,
                  notice=t[notice] if notice else "")

