"""Returned mail, understood and acted on: DSNs, complaints, mailto unsubscribes, replies.

`classify` is pure: bytes of one mail in, a `Returned` out — what kind of mail it is and what
in it could tie it to one of our deliveries. `apply` acts on it inside one transaction.

Returned mail is untrusted input: anyone can write a DSN. So nothing happens to an address
unless the mail proves it is about a message we sent: a VERP token (sealed, tokens.py), the
random Message-ID of that message (in the quoted headers), or — when a relay rewrote both —
the unsubscribe token of the quoted List-Unsubscribe header naming the same final recipient.
A DSN naming an address we mailed, without such proof, is reported and left alone.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.utils
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

from sqlalchemy import Connection

from .audience import email_key
from .config import Settings
from .redact import redact_addresses
from .store import queries as q
from .store.subscriber_tables import ConsentEvent
from .store.tables import ReturnedKind
from .subscribers import MAILTO_SUBJECT, Origin, record_event, unsubscribe
from .tokens import VERP_TOKEN_CHARS, TokenError, Tokens

log = logging.getLogger("mailer.bounces")

TEXT_BUDGET = 2 * 1024 * 1024  # characters of decoded text searched per mail
# RFC 3463: statuses of a failed delivery that do not say the *address* is gone - our mail
# was refused as spam or by policy (X.7.X), our own sender address is faulted (X.1.7, X.1.8),
# the mailbox is full or the message too big (X.2.2, X.2.3, X.3.4). Suppressing the address
# for these would empty the list after one bad day; they count as soft bounces.
NOT_THE_ADDRESS = re.compile(r"^5\.(7\.\d+|1\.[78]|2\.[23]|3\.4)$")
COMPLAINT_TYPES = frozenset({"abuse", "fraud"})  # RFC 5965 §7.3; not-spam etc. are no complaint
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([245]\d\d)\b")
_MESSAGE_ID = re.compile(r"^Message-ID:\s*(<[^<>\s]{3,250}>)", re.I | re.M)
_MANAGE = re.compile(r"/unsubscribe/([A-Za-z0-9_\-]{16,1024})>")
_SYSTEM_SENDERS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailer",
                             "mail.delivery.system", "mdaemon"})
# Out-of-office subjects in the languages of our readers (RFC 3834 headers come first).
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic|matische)?[ -]?(reply|antwort|response)|autoreply|auto:|"
    r"out of (the )?office|abwesen|abwesenheit|au[sß]er (haus|büro)|urlaub|vacation|"
    r"otomatik (yanıt|cevap)|ofiste değil|nieobecno|автоответ|отсутств|رد تلقائي)", re.I)


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient block of a DSN (RFC 3464 §2.3), or what a text bounce says."""

    recipient: str  # email_key of the final (else original) recipient; "" when not named
    hard: bool
    status: str = ""  # "5.1.1"
    action: str = ""  # failed | delayed
    diagnostic: str = ""


@dataclass(frozen=True, slots=True)
class Returned:
    kind: ReturnedKind
    mail_key: str
    verp_tokens: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()  # Message-IDs of our message, quoted in the mail
    manage_tokens: tuple[str, ...] = ()  # from a quoted List-Unsubscribe header
    failures: tuple[Failure, ...] = ()
    unsubscribe_token: str | None = None  # mailto: Subject "unsubscribe <token>"
    evidence: str = ""  # one line for the consent log and `bounces list`, no address

    @property
    def recipients(self) -> set[str]:
        return {f.recipient for f in self.failures if f.recipient}


# --- understanding ------------------------------------------------------------------------


def mail_key(raw: bytes, msg: email.message.Message) -> str:
    """What makes the same mail read twice the same: its Message-ID, else its bytes (line
    endings aside: a maildir keeps CRLF, an mbox LF)."""
    mid = _header(msg, "Message-ID").strip()
    if mid:
        return hashlib.sha256(b"mid:" + mid.encode("utf-8", "replace")).hexdigest()
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def classify(raw: bytes, settings: Settings) -> Returned:
    msg = email.message_from_bytes(raw)
    key = mail_key(raw, msg)
    texts = list(_inner_texts(msg))
    quoted = "\n".join(texts)
    # Everything that could tie the mail to one of our deliveries (`match` checks it).
    proof = Returned(
        ReturnedKind.REPLY, key,
        verp_tokens=_verp_tokens(settings, [_top_addresses(msg), quoted]),
        message_ids=tuple(dict.fromkeys(_MESSAGE_ID.findall(quoted))),
        manage_tokens=tuple(dict.fromkeys(_MANAGE.findall(quoted))))
    report = _report_type(msg)
    if report == "delivery-status":
        return _dsn(msg, proof)
    if report == "feedback-report":
        return _arf(msg, proof)
    token = _mailto_token(msg)
    if token is not None:
        return Returned(ReturnedKind.UNSUBSCRIBE, key, unsubscribe_token=token,
                        evidence="mail to the List-Unsubscribe address")
    if _from_mail_system(msg):
        bounce = _text_bounce(msg, proof, quoted)
        if bounce is not None:
            return bounce
    if _is_auto_reply(msg):
        return Returned(ReturnedKind.AUTO_REPLY, key, evidence="automatic reply (RFC 3834)")
    return Returned(ReturnedKind.REPLY, key, evidence="a reply written by a person")


def _header(msg: email.message.Message, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (ValueError, LookupError, UnicodeError):
        return str(value)


def _inner_texts(msg: email.message.Message) -> Iterator[str]:
    """The headers and text of every part but the outer headers: where a bounce quotes our
    message (message/rfc822, text/rfc822-headers, or inline in a text bounce)."""
    budget = TEXT_BUDGET
    for part in msg.walk():
        if budget <= 0:
            return
        if part is not msg:
            head = "\n".join(f"{k}: {v}" for k, v in part.items())
            budget -= len(head)
            yield head
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and part.get_content_maintype() in ("text", "message"):
            text = payload[:budget].decode(part.get_content_charset() or "utf-8", "replace") \
                if _known_charset(part) else payload[:budget].decode("utf-8", "replace")
            budget -= len(text)
            yield text


def _known_charset(part: email.message.Message) -> bool:
    import codecs

    try:
        codecs.lookup(part.get_content_charset() or "utf-8")
    except LookupError:
        return False
    return True


def _top_addresses(msg: email.message.Message) -> str:
    """Where the envelope recipient of the returned mail (our VERP address) shows."""
    names = ("Delivered-To", "X-Original-To", "To", "Envelope-To", "X-Envelope-To",
             "X-Delivered-To", "Original-Recipient")
    return "\n".join(str(v) for n in names for v in msg.get_all(n, []))


def _verp_tokens(settings: Settings, texts: list[str]) -> tuple[str, ...]:
    address = settings.bounces.address
    if address is None:
        return ()
    local, _, domain = address.rpartition("@")
    pattern = re.compile(
        rf"{re.escape(local)}\+([a-z2-7]{{{VERP_TOKEN_CHARS}}})@{re.escape(domain)}", re.I)
    found = [m.lower() for text in texts for m in pattern.findall(text)]
    return tuple(dict.fromkeys(found))


def _report_type(msg: email.message.Message) -> str:
    """RFC 6522: multipart/report names its kind; look for the machine-readable part too."""
    if msg.get_content_type() == "multipart/report":
        kind = str(msg.get_param("report-type", "") or "").lower()
        if kind in ("delivery-status", "feedback-report"):
            return kind
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            return "delivery-status"
        if ctype == "message/feedback-report":
            return "feedback-report"
    return ""


def _field_blocks(msg: email.message.Message, types: tuple[str, ...]
                  ) -> list[email.message.Message]:
    """The header blocks of a machine-readable report part (RFC 3464 §2.1, RFC 5965 §3.1)."""
    for part in msg.walk():
        if part.get_content_type() not in types:
            continue
        # The email package always parses a message/* part into its header blocks (one
        # sub-message each), whatever its encoding or content: nothing left to split here.
        return [p for p in part.get_payload() if isinstance(p, email.message.Message)]
    return []


def _address_field(value: str) -> str:
    """`rfc822; anna@example.org` (RFC 3464 §2.3.2) → its email_key."""
    _, _, address = value.rpartition(";")
    address = address.strip().strip("<>").strip()
    return email_key(address) if "@" in address else ""


def _is_hard(status: str, action: str) -> bool:
    return action == "failed" and status.startswith("5") and not NOT_THE_ADDRESS.match(status)


def _dsn(msg: email.message.Message, proof: Returned) -> Returned:
    failures = []
    for block in _field_blocks(msg, ("message/delivery-status",
                                     "message/global-delivery-status")):
        action = str(block.get("Action", "")).strip().lower()
        if action not in ("failed", "delayed"):
            continue  # delivered, relayed, expanded: good news, or the per-message block
        recipient = _address_field(str(block.get("Final-Recipient", "")))
        recipient = recipient or _address_field(str(block.get("Original-Recipient", "")))
        status_match = _STATUS.search(str(block.get("Status", "")))
        diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
        status = status_match.group(0) if status_match else _status_from(diagnostic)
        failures.append(Failure(recipient, _is_hard(status, action), status, action,
                                diagnostic))
    if not failures:
        return replace(proof, kind=ReturnedKind.REPORT, evidence="a delivery notice that "
                       "reports no failure (delivered or relayed)")
    failures.sort(key=lambda f: not f.hard)  # the hard failure decides
    first = failures[0]
    kind = ReturnedKind.HARD_BOUNCE if first.hard else ReturnedKind.SOFT_BOUNCE
    detail = f" ({first.diagnostic})" if first.diagnostic else ""
    evidence = f"DSN: Action {first.action}, Status {first.status or 'none'}{detail}"
    return replace(proof, kind=kind, failures=tuple(failures), evidence=_one_line(evidence))


def _status_from(text: str) -> str:
    """A status from free text: the enhanced code, else the class of an SMTP reply code."""
    match = _STATUS.search(text)
    if match:
        return match.group(0)
    code = _SMTP_CODE.search(text)
    return f"{code.group(1)[0]}.0.0" if code else ""


def _arf(msg: email.message.Message, proof: Returned) -> Returned:
    blocks = _field_blocks(msg, ("message/feedback-report",))
    fields = blocks[0] if blocks else email.message.Message()
    feedback = str(fields.get("Feedback-Type", "")).strip().lower()
    agent = " ".join(str(fields.get("User-Agent", "")).split())[:80]
    rcpt = _address_field(str(fields.get("Original-Rcpt-To", "")))
    evidence = _one_line(f"ARF feedback-type {feedback or 'missing'}"
                         + (f" from {agent}" if agent else ""))
    kind = ReturnedKind.COMPLAINT if feedback in COMPLAINT_TYPES else ReturnedKind.REPORT
    # Its Original-Mail-From (our VERP address) was searched with the other quoted text.
    failures = (Failure(rcpt, hard=False, action="complaint"),) if rcpt else ()
    return replace(proof, kind=kind, failures=failures, evidence=evidence)


def _mailto_token(msg: email.message.Message) -> str | None:
    match = MAILTO_SUBJECT.match(_header(msg, "Subject"))
    return match.group(1) if match else None


def _from_mail_system(msg: email.message.Message) -> bool:
    """Sent by a mail server rather than a person: the null reverse path (RFC 5321 §4.5.5)
    or a MAILER-DAEMON / postmaster sender."""
    if str(msg.get("Return-Path", "")).strip() == "<>":
        return True
    sender = email.utils.parseaddr(str(msg.get("From", "")))[1]
    return sender.partition("@")[0].lower() in _SYSTEM_SENDERS


def _is_auto_reply(msg: email.message.Message) -> bool:
    auto = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto and auto != "no":  # RFC 3834 §5
        return True
    if any(msg.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")):
        return True
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.match(_header(msg, "Subject")))


def _text_bounce(msg: email.message.Message, proof: Returned,
                 quoted: str) -> Returned | None:
    """A bounce in one of the many non-standard formats (qmail, Exim, Exchange …), as
    flufl.bounce (Mailman's detectors) reads them."""
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a detector tripped over hostile input: not a bounce we can read
        log.warning("a returned mail could not be read by the bounce detectors")
        return None
    if not temporary and not permanent:
        return None
    status = _status_from(quoted)
    hard = bool(permanent) and not NOT_THE_ADDRESS.match(status)
    failures = tuple(
        Failure(email_key(a.decode("utf-8", "replace")), hard=hard and a in permanent,
                status=status, action="failed" if a in permanent else "delayed")
        for a in sorted(permanent | temporary))
    line = next((ln for ln in quoted.splitlines() if status and status in ln), "")
    evidence = (f"non-standard bounce: {'permanent' if hard else 'temporary'} failure"
                + (f" ({line.strip()})" if line.strip() else ""))
    kind = ReturnedKind.HARD_BOUNCE if hard else ReturnedKind.SOFT_BOUNCE
    return replace(proof, kind=kind, failures=failures, evidence=_one_line(evidence))


def _one_line(text: str) -> str:
    return redact_addresses(" ".join(text.split()))[:300]


# --- acting -------------------------------------------------------------------------------


@dataclass
class Applied:
    """What was done with one mail: `action` for the table, `sentence` for the operator."""

    kind: ReturnedKind
    action: str
    sentence: str
    delivery: q.Delivery | None = None
    matched_by: str = ""
    list_name: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def match(conn: Connection, returned: Returned, tokens: Tokens) -> tuple[q.Delivery | None, str]:
    """The delivery this mail is about, and how we know: VERP token, then the Message-ID of
    our message, then the final recipient confirmed by the quoted unsubscribe token."""
    for token in returned.verp_tokens:
        try:
            run_id, delivery_id = tokens.read_verp(token)
        except TokenError:
            continue
        row = q.delivery(conn, delivery_id)
        if row is not None and row.run_id == run_id:
            return row, "verp"
    for mid in returned.message_ids:
        row = q.delivery_by_message_id(conn, mid)
        if row is not None:
            return row, "message-id"
    for token in returned.manage_tokens:
        try:
            manage = tokens.read_manage(token)
        except TokenError:
            continue
        key = email_key(manage.email)
        if key in returned.recipients or (returned.kind == ReturnedKind.COMPLAINT
                                          and not returned.recipients):
            row = q.latest_delivery(conn, campaign_id=manage.campaign, email_key=key,
                                    list_name=manage.list)
            if row is not None:
                return row, "final-recipient"
    return None, ""


def apply(conn: Connection, returned: Returned, *, settings: Settings, tokens: Tokens,
          source: str) -> Applied | None:
    """Act on one mail in the caller's transaction; None if it was read before."""
    applied = _decide(conn, returned, settings=settings, tokens=tokens)
    row = applied.delivery
    if not q.record_returned(conn, mail_key=returned.mail_key, source=source,
                             kind=applied.kind, matched_by=applied.matched_by,
                             run_id=row.run_id if row else None,
                             delivery_id=row.id if row else None,
                             list_name=applied.list_name, action=applied.action,
                             detail=returned.evidence):
        return None
    _act(conn, applied, returned, settings=settings)
    return applied


def _decide(conn: Connection, returned: Returned, *, settings: Settings, tokens: Tokens
            ) -> Applied:
    kind = returned.kind
    if kind == ReturnedKind.UNSUBSCRIBE:
        return _decide_mailto(conn, returned, tokens)
    if kind in (ReturnedKind.REPLY, ReturnedKind.AUTO_REPLY, ReturnedKind.REPORT):
        what = {ReturnedKind.REPLY: "a reply", ReturnedKind.AUTO_REPLY: "an automatic reply",
                ReturnedKind.REPORT: "a report that asks for nothing"}[kind]
        return Applied(kind, "left alone", f"{what}: left alone ({returned.evidence})")
    row, how = match(conn, returned, tokens)
    if row is None:
        mailed = q.was_mailed(conn, returned.recipients)
        why = ("it names an address we mailed but carries no token or Message-ID of ours, "
               "so anyone could have written it" if mailed else
               "it is about an address we never mailed (or names none)")
        return Applied(kind, "unmatched", f"{kind.value.replace('_', ' ')}: left alone: {why}")
    if row.email_key.startswith(q.HASH_PREFIX):
        return Applied(kind, "erased", f"{kind.value.replace('_', ' ')} for an erased "
                       "address: nothing to do", delivery=row, matched_by=how)
    return Applied(kind, "", "", delivery=row, matched_by=how, list_name=row.list_name)


def _decide_mailto(conn: Connection, returned: Returned, tokens: Tokens) -> Applied:
    kind = ReturnedKind.UNSUBSCRIBE
    try:
        manage = tokens.read_manage(returned.unsubscribe_token or "")
    except TokenError:
        return Applied(kind, "unmatched", "unsubscribe by mail: left alone: the token in the "
                       "subject is not one of ours (altered or incomplete)")
    row = q.latest_delivery(conn, campaign_id=manage.campaign, email_key=email_key(manage.email),
                            list_name=manage.list)
    return Applied(kind, "", "", delivery=row, matched_by="token", list_name=manage.list,
                   extra={"email": manage.email})


def _act(conn: Connection, applied: Applied, returned: Returned, *, settings: Settings) -> None:
    if applied.action:
        return  # left alone, unmatched, erased: decided already
    row = applied.delivery
    kind = applied.kind
    if kind == ReturnedKind.HARD_BOUNCE and row is not None:
        applied.action, applied.sentence = _hard(conn, row, returned)
    elif kind == ReturnedKind.SOFT_BOUNCE and row is not None:
        applied.action, applied.sentence = _soft(conn, row, returned, settings)
    elif kind in (ReturnedKind.COMPLAINT, ReturnedKind.UNSUBSCRIBE):
        address = applied.extra.get("email") or (row.email if row else "")
        source = "complaint" if kind == ReturnedKind.COMPLAINT else "mailto"
        done = unsubscribe(conn, settings, email=address, list_name=applied.list_name,
                           origin=Origin(source=source), detail=returned.evidence)
        what = "complaint" if kind == ReturnedKind.COMPLAINT else "unsubscribe by mail"
        applied.action = "unsubscribed" if done else "already"
        applied.sentence = (f"{what}: unsubscribed from {applied.list_name}" if done else
                            f"{what}: already unsubscribed from {applied.list_name}")
    q.set_returned_action(conn, returned.mail_key, applied.action)


def _hard(conn: Connection, row: q.Delivery, returned: Returned) -> tuple[str, str]:
    code = _reply_code(returned)
    reason = f"returned: {returned.evidence}"
    q.mark_bounced(conn, row.id, code=code, reason=reason)
    if q.suppress(conn, row.email_key, reason="hard_bounce", source="dsn",
                  detail=returned.evidence):
        record_event(conn, row.email_key, ConsentEvent.BOUNCED, origin=Origin(source="dsn"),
                     list_name=q.GLOBAL, detail=returned.evidence)
        return "suppressed", f"hard bounce: the address is suppressed ({returned.evidence})"
    return "already", "hard bounce: the address was already suppressed"


def _soft(conn: Connection, row: q.Delivery, returned: Returned, settings: Settings
          ) -> tuple[str, str]:
    """Counted; `soft_limit` of them within `soft_window_days` suppress the address. The
    mail being read is recorded already, so it counts itself."""
    cfg = settings.bounces
    since = q.utcnow() - timedelta(days=cfg.soft_window_days)
    count = q.soft_bounces(conn, row.email_key, since=since)
    if count < cfg.soft_limit:
        return "counted", (f"soft bounce {count} of {cfg.soft_limit} within "
                           f"{cfg.soft_window_days} days ({returned.evidence})")
    detail = (f"{count} soft bounces within {cfg.soft_window_days} days; last: "
              f"{returned.evidence}")
    if q.suppress(conn, row.email_key, reason="soft_bounce", source="dsn", detail=detail):
        record_event(conn, row.email_key, ConsentEvent.BOUNCED, origin=Origin(source="dsn"),
                     list_name=q.GLOBAL, detail=detail)
        return "suppressed", f"soft bounce: the address is suppressed ({detail})"
    return "already", "soft bounce: the address was already suppressed"


def _reply_code(returned: Returned) -> int | None:
    for failure in returned.failures:
        found = _SMTP_CODE.search(failure.diagnostic)
        if found:
            return int(found.group(1))
    return None

