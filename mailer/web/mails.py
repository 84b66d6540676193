"""The confirmation mail of the double opt-in: a branded mail from the campaign templates.

`templates/confirmation.mjml.j2` goes through the campaign pipeline (Jinja → MJML → htmlcraft,
a real text part, the Impressum) once per language, list selection and templates version, and
is cached for the process; each mail then only fills in its hello line and link, as plain values
of the stage-2 templates (render.SystemMail): the name comes from a web form and is never
template source. Transactional: no List-Unsubscribe, no unsubscribe or preferences links.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from .. import render
from ..compose import CRLF, _load_dkim, address_header
from ..config import Settings
from ..redact import redact_addresses
from ..tokens import Tokens
from ..transport import DeliveryResult, Outcome, Outgoing, Transport
from .i18n import STRINGS, list_title, strings, text_dir

log = logging.getLogger("mailer.web")

TEMPLATE = "confirmation"
FIELDS = render.Fields("hello", "url")
_cache: dict[tuple[object, ...], render.SystemMail] = {}
_CACHE_SIZE = 64


def confirmation_url(settings: Settings, tokens: Tokens, *, email: str, lists: Sequence[str],
                     nonce: str) -> str:
    return f"{settings.base_url}/confirm/{tokens.confirm(email, list(lists), nonce)}"


def mail_language(language: str) -> str:
    """The mail's language: one the web app has texts for (a list imported with `pl` members
    gets German, not a German mail with a Polish footer)."""
    return language if language in STRINGS else "de"


def confirmation_mail(settings: Settings, language: str, lists: Sequence[str]) -> render.SystemMail:
    """The compiled mail for a language and list selection, from the process cache; an edit
    under templates/ (its mtime) compiles it anew."""
    titles = tuple(list_title(x, language, settings.lists) for x in lists)
    key = (str(settings.templates_dir), render.templates_stamp(settings.templates_dir),
           language, titles, settings.organisation.model_dump_json())
    mail = _cache.get(key)
    if mail is None:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        mail = _cache[key] = _compile(settings, language, titles)
    return mail


def _compile(settings: Settings, language: str, titles: Sequence[str]) -> render.SystemMail:
    t = strings(language)
    subject = t["mail_subject"]
    body = t["mail_body"].format(lists=", ".join(titles))
    mail = {"hello": FIELDS["hello"], "body": body, "button": t["mail_button"],
            "url": FIELDS["url"], "ignore": t["mail_ignore"]}
    # The text part says what the HTML says, in the same order; the button and the link
    # below it are one link there, on a line of its own.
    blocks = [{"kind": "heading", "text": subject},
              *({"kind": "text", "source": source} for source in (
                  mail["hello"], _md_escape(body), mail["url"], _md_escape(mail["ignore"])))]
    context = {"lang": language, "dir": text_dir(language), "subject": subject,
               "preheader": "", "blocks": blocks, "mail": mail}
    return render.render_system_mail(settings, TEMPLATE, context, FIELDS)


def _md_escape(text: str) -> str:
    """Literal text as a Markdown source (render.text_part reads text blocks as Markdown)."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)


def confirmation_message(settings: Settings, *, email: str, name: str, language: str,
                         lists: Sequence[str], url: str, now: float | None = None) -> bytes:
    """multipart/alternative (text + HTML) in the subscriber's language, DKIM-signed when a
    key is configured."""
    language = mail_language(language)
    t = strings(language)
    compiled = confirmation_mail(settings, language, lists)
    hello = t["mail_hello"].format(name=name) if name else t["mail_hello_anon"]
    html, text = compiled.fill({"hello": hello, "url": url})
    utf8 = not email.isascii()
    msg = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    msg["Subject"] = t["mail_subject"]
    msg["Date"] = format_datetime(datetime.fromtimestamp(now or time.time(), settings.tz))
    msg["Message-ID"] = make_msgid(domain=settings.msgid_domain)
    # RFC 3834: an automatic answer to a request; vacation responders should stay quiet.
    msg["Auto-Submitted"] = "auto-generated"
    if settings.sender.reply_to:
        msg["Reply-To"] = settings.sender.reply_to
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    msg["Content-Language"] = language  # after set_content, which drops Content-*
    # From and To as campaign mails write them: the stdlib's folding of a long display name
    # drops its quotes, and "Alice, evil@example.org BBBB…" would become two more recipients.
    addresses = (address_header("From", settings.sender.name, settings.sender.address) + CRLF
                 + address_header("To", name, email) + CRLF)
    data = addresses + msg.as_bytes()
    sign = _load_dkim(settings)
    return data if sign is None else sign(data) + data


async def send_confirmation(transport: Transport, settings: Settings, tokens: Tokens, *,
                            email: str, name: str, language: str, lists: Sequence[str],
                            nonce: str) -> DeliveryResult:
    url = confirmation_url(settings, tokens, email=email, lists=lists, nonce=nonce)
    data = confirmation_message(settings, email=email, name=name, language=language,
                                lists=lists, url=url)
    result = await transport.send(Outgoing(key=0, sender=settings.sender.address,
                                           recipient=email, data=data))
    if result.outcome != Outcome.SENT:  # the reply often quotes the address: not in the log
        log.warning("a confirmation mail was not sent: %s %s", result.code,
                    redact_addresses(result.text))
    return result
