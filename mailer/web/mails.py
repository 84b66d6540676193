"""The confirmation mail of the double opt-in: low volume, so built with the stdlib `email`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from markupsafe import escape

from ..compose import CRLF, address_header
from ..config import Settings
from ..redact import redact_addresses
from ..tokens import Tokens
from ..transport import DeliveryResult, Outcome, Outgoing, Transport
from .i18n import list_title, strings, text_dir

log = logging.getLogger("mailer.web")


def confirmation_url(settings: Settings, tokens: Tokens, *, email: str, lists: Sequence[str],
                     nonce: str) -> str:
    return f"{settings.base_url}/confirm/{tokens.confirm(email, list(lists), nonce)}"


def confirmation_message(settings: Settings, *, email: str, name: str, language: str,
                         lists: Sequence[str], url: str, now: float | None = None) -> bytes:
    """multipart/alternative (text + a plain HTML twin) in the subscriber's language."""
    t = strings(language)
    titles = ", ".join(list_title(x, language, settings.lists) for x in lists)
    hello = t["mail_hello"].format(name=name) if name else t["mail_hello_anon"]
    body = t["mail_body"].format(lists=titles)
    org = settings.organisation
    footer = (f"{org.name} · {org.department} · {org.body} · {org.street} · "
              f"{org.postcode} {org.city}")
    text = f"{hello}\n\n{body}\n\n{url}\n\n{t['mail_ignore']}\n\n-- \n{footer}\n"
    direction = text_dir(language)
    html = (
        f'<!doctype html><html lang="{language}" dir="{direction}"><body style="font-family:'
        f'Arial,sans-serif;color:#1f2a30;line-height:1.5">'
        f"<p>{escape(hello)}</p><p>{escape(body)}</p>"
        f'<p><a href="{escape(url)}" style="background:#a63a17;color:#fff;padding:12px 22px;'
        f'border-radius:6px;text-decoration:none;font-weight:700">{escape(t["mail_button"])}</a></p>'
        f'<p style="font-size:14px">{escape(url)}</p>'
        f'<p style="font-size:14px;color:#5a5148">{escape(t["mail_ignore"])}</p>'
        f'<p style="font-size:12px;color:#5a5148">{escape(footer)}</p></body></html>'
    )
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
    msg["Content-Language"] = language or "de"  # after set_content, which drops Content-*
    # From and To as campaign mails write them: the stdlib's folding of a long display name
    # drops its quotes, and "Alice, evil@example.org BBBB…" would become two more recipients.
    addresses = (address_header("From", settings.sender.name, settings.sender.address) + CRLF
                 + address_header("To", name, email) + CRLF)
    return addresses + msg.as_bytes()


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
