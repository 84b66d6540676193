"""Per-recipient message bytes: merge fields, unsubscribe token, every bulk-mail header.

Everything that is the same for all recipients of a language (MIME skeleton, attachments,
static headers) is encoded once in `Composer.__init__`; per recipient we fill the stage-2
templates, quoted-printable encode the two text parts and write headers. The static lines of
a body are encoded once and spliced in (`QPPieces`); only the merge values are encoded
per recipient. The stdlib `email` package is only used to encode single
header values.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formataddr
from pathlib import Path

import markupsafe

from .audience import Recipient
from .config import Settings
from .render import (
    Attachment,
    LangRendition,
    Links,
    Pieces,
    Rendition,
    mostly_ascii,
    personalise_pieces,
    static_text,
)
from .tokens import Tokens

CRLF = b"\r\n"
DKIM_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"list-id",
                b"list-unsubscribe", b"list-unsubscribe-post", b"mime-version", b"content-type",
                b"content-language", b"reply-to"]


def _clean(value: str) -> str:
    """No header can be injected: line breaks and control characters become spaces."""
    if value.isprintable():
        return value
    return "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in value)


# RFC 2047 §4.2 "Q" encoding: letters, digits and a few marks stay; space is "_"; the rest =XX.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q = ["_" if b == 32 else chr(b) if b in _Q_SAFE else f"={b:02X}" for b in range(256)]
_WORD_ROOM = 75 - len("=?utf-8?q??=")  # an encoded word is at most 75 characters (§2)


class _QTable(dict[int, str]):
    """Code point -> its Q encoding, for str.translate; filled as characters are met."""

    def __missing__(self, code: int) -> str:
        piece = "".join(_Q[b] for b in chr(code).encode("utf-8"))
        if len(self) < 4096:  # the characters of names and subjects; bounded anyway
            self[code] = piece
        return piece


_Q_TABLE = _QTable()


def encoded_words(value: str, *, indent: int = 0) -> str:
    """RFC 2047 encoded words for a non-ASCII text, folded between words, never inside a
    character (§5: each word must decode on its own). `indent`: what precedes the first."""
    room = _WORD_ROOM - indent
    whole = value.translate(_Q_TABLE)
    if len(whole) <= room:  # most subjects and names: one word, no loop over the characters
        return f"=?utf-8?q?{whole}?="
    words: list[str] = []
    current = ""
    for ch in value:
        piece = _Q_TABLE[ord(ch)]
        if len(current) + len(piece) > room and current:
            room = _WORD_ROOM
            words.append(current)
            current = ""
        current += piece
    words.append(current)
    return "\r\n ".join(f"=?utf-8?q?{w}?=" for w in words)


def _fold_ascii(name: str, value: str) -> str:
    """Fold a long ASCII header at spaces (RFC 5322 §2.2.3) to stay near 78 characters."""
    lines, current = [], f"{name}:"
    for word in value.split(" "):
        if len(current) + 1 + len(word) > 78 and current != f"{name}:":
            lines.append(current)
            current = ""
        current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def _plain(value: str, room: int) -> bool:
    """ASCII that can go as it is: nothing that looks encoded (it would be decoded) and no
    word too long to fold (folding happens only between words; RFC 5322 §2.1.1)."""
    return value.isascii() and "=?" not in value and all(
        len(word) <= room for word in value.split(" "))


def encode_header(name: str, value: str) -> bytes:
    value = _clean(value)
    if _plain(value, 76 - len(name)):
        if len(value) + len(name) < 76:
            return f"{name}: {value}".encode("ascii")
        return _fold_ascii(name, value).encode("ascii")
    return f"{name}: {encoded_words(value, indent=len(name) + 2)}".encode("ascii")


def address_header(name: str, display: str, address: str) -> bytes:
    display, address = _clean(display).strip(), _clean(address)
    if not display:
        return f"{name}: <{address}>".encode()
    # A quoted name cannot be folded; up to a few hundred characters it need not be (and
    # mail parsers read adjacent encoded words in a name back with spaces between them).
    if _plain(display, 900) and len(display) < 900:
        return f"{name}: {formataddr((display, address))}".encode()
    # SMTPUTF8 (RFC 6532): a non-ASCII address itself goes raw in UTF-8.
    return f"{name}: {encoded_words(display, indent=len(name) + 2)} <{address}>".encode()


def _file_param(param: str, name: str) -> str:
    """A file name as a MIME parameter: quoted when it is plain ASCII, else RFC 2231
    (`filename*=utf-8''…`, RFC 2047 words are not allowed inside quotes)."""
    if name.isascii() and not any(c in name for c in '"\\'):
        return f'{param}="{name}"'
    return f"{param}*=utf-8''{urllib.parse.quote(name, safe='')}"


def qp(text: str) -> bytes:
    """Quoted-printable (RFC 2045 §6.7) with CRLF line ends."""
    # b2a_qp copies the input's first line ending to its soft breaks: feed it bare LF only.
    data = lf_only(text).encode("utf-8")
    return _fit_lines(binascii.b2a_qp(data, istext=True).replace(b"\n", CRLF))


def lf_only(text: str) -> str:
    """Every line end (CRLF, a lone CR) as LF, the one b2a_qp and the CRLF joins expect."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _fit_lines(encoded: bytes, *, last: int = 76) -> bytes:
    """Lines of at most 76 characters (`last` for the last one), as RFC 2045 §6.7 rule 5 wants,
    none of them starting with a dot.

    b2a_qp encodes a blank that ends a line (=20) without checking the room left: such a
    line runs to 77 or 78. A soft break goes before the overflow, never inside an escape.
    A dot that would begin a line is written =2E, so the SMTP client has no dot to double
    (RFC 5321 §4.5.2) and need not scan the message for one (Outgoing.composed).
    """
    lines = encoded.split(CRLF)
    if (len(lines[-1]) <= last and all(len(line) <= 76 for line in lines)
            and not encoded.startswith(b".") and b"\n." not in encoded):
        return encoded
    fitted = []
    for i, line in enumerate(lines):
        width = last if i == len(lines) - 1 else 76
        while True:
            if line.startswith(b"."):
                line = b"=2E" + line[1:]
            if len(line) <= width:
                break
            at = width - 1  # the soft break's "=" takes the last place
            while b"=" in line[at - 2:at]:
                at -= 1
            fitted.append(line[:at] + b"=")
            line = line[at:]
        fitted.append(line)
    return CRLF.join(fitted)


class QPPieces:
    """Quoted-printable of a text given in pieces, the template's own pieces encoded once.

    A language's template yields its own text as the same pieces for every recipient; only
    the merge values between them differ. Each piece is encoded on its own, as if it began a
    line, and the encodings are joined: where a piece's first line would not fit on the line
    the last one left open, a soft line break (RFC 2045 §6.7 rule 5) comes first (no piece's
    last line is longer than 75, so that one always fits). An encoding never ends in a raw
    blank (b2a_qp encodes a blank at the end of its data), so the joined text decodes exactly
    like `qp(whole)`. `static`: the template's text pieces, encoded up front; merge values are
    encoded each time and never kept, so memory does not grow with the audience. The memo
    maps a piece to its own encoding: what is in it changes speed, never the text.

    No line of the result starts with a dot: no piece's encoding has a line that does, its
    first included (see `_fit_lines`), wherever the piece then stands.
    """

    def __init__(self, static: Iterable[str] = ()) -> None:
        # piece -> (its encoding, length of its first line, of its last line or -1 if one);
        # a piece with a CR is never looked up (see __call__)
        self._memo = {piece: _encode_piece(piece) for piece in static
                      if piece and "\r" not in piece}

    def __call__(self, pieces: Sequence[str],
                 values: dict[str, tuple[bytes, int, int]] | None = None) -> bytes:
        """`values`: merge values already encoded for this message (its other part)."""
        get = self._memo.get
        out: list[bytes] = []
        column = 0
        if values is None:
            values = {}  # a merge value used twice: encoded once
        for piece in pieces:
            known = get(piece)
            if known is None:
                known = values.get(piece)
            if known is None:
                if "\r" in piece:  # a CRLF may be split between two pieces: encode them whole
                    return self([lf_only("".join(pieces))], values)
                if not piece:
                    continue
                known = values[piece] = _encode_piece(piece)
            encoded, first, last = known
            # 75, not 76: a later soft break may still need a place on this line.
            if column and column + first > 75:
                out.append(b"=\r\n")
                column = 0
            out.append(encoded)
            column = column + first if last < 0 else last
        return b"".join(out)


# A piece that quoted-printable leaves as it is but for soft line breaks: printable ASCII
# without "=", no blank at its end and no "." at its start (see `_fit_lines`).
_QP_AS_IS = re.compile(r"[!-\-/-<>-~](?:[ !-<>-~]*[!-<>-~])?")


def _encode_piece(piece: str) -> tuple[bytes, int, int]:
    # Most merge values (names, links, dates) are such pieces: no encoder needed.
    if _QP_AS_IS.fullmatch(piece):
        size = len(piece)
        if size <= 75:
            return piece.encode("ascii"), size, -1
        broken = _soft_broken(piece)
        if broken is not None:  # most links
            return broken
    return _qp_piece(piece)


def _soft_broken(piece: str) -> tuple[bytes, int, int] | None:
    """What `_qp_piece` makes of a long piece that needs no escapes: lines of 75 and a soft
    break; the last line at most 75 (one of 76 is cut at 74, as `_fit_lines` cuts it).
    None where a line would start with a dot: `_fit_lines` cuts those lines otherwise."""
    piece = str(piece)  # an HTML merge value is a Markup, whose every slice is wrapped again
    lines, at, size = [], 0, len(piece)
    while size - at > 76:
        lines.append(piece[at:at + 75] + "=")
        at += 75
    rest = piece[at:]
    lines += [rest[:74] + "=", rest[74:]] if len(rest) == 76 else [rest]
    encoded = "\r\n".join(lines)
    if "\n." in encoded:
        return None
    return encoded.encode("ascii"), len(lines[0]), len(lines[-1])


def _qp_piece(piece: str) -> tuple[bytes, int, int]:
    # b2a_qp copies the input's first line ending to its soft breaks: only LF comes in.
    encoded = binascii.b2a_qp(piece.encode("utf-8"), istext=True)
    if len(encoded) <= 75 and b"\n" not in encoded and encoded[:1] != b".":
        return encoded, len(encoded), -1  # one line that fits (a name, a word)
    # The last line keeps a place for the soft break that may join the next piece.
    return _measured(_fit_lines(encoded.replace(b"\n", CRLF), last=75))


def _measured(encoded: bytes) -> tuple[bytes, int, int]:
    """An encoding with the lengths of its first line and of its last (-1 if it is one)."""
    cut = encoded.find(CRLF)
    if cut < 0:
        return encoded, len(encoded), -1
    return encoded, cut, len(encoded) - encoded.rfind(CRLF) - 2


def b64(data: bytes) -> bytes:
    encoded = base64.encodebytes(data)  # 76-char lines
    return encoded.replace(b"\n", CRLF)


@dataclass(frozen=True, slots=True)
class Composed:
    data: bytes
    subject: str
    lang: str


class Composer:
    """Builds the message for one recipient of one rendition."""

    def __init__(
        self,
        rendition: Rendition,
        settings: Settings,
        *,
        tokens: Tokens,
        test: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rendition = rendition
        self.settings = settings
        self.tokens = tokens
        self.test = test
        self.clock = clock
        self.campaign_id = rendition.campaign.id
        self._tz = settings.tz
        token = secrets.token_hex(8)
        self._alt = f"=_alt_{token}"
        self._mixed = f"=_mix_{token}"
        self._static = self._static_headers()
        # Files go to everyone; each language has its own calendar entries.
        self._tails = {lang: self._attachment_tail((*rendition.attachments, *lr.calendar))
                       for lang, lr in rendition.languages.items()}
        self._dkim = _load_dkim(settings)
        self._subject_lines: dict[str, bytes] = {}  # the languages' subjects without merge fields
        self._date = (0, b"")  # the Date header of the current second
        # The view-online link is the same for everyone of a language: encoded once, too.
        online = [self._view_online(lang) for lang in rendition.languages]
        self._qp = QPPieces([*(piece for lr in rendition.languages.values()
                               for template in (lr.html, lr.text)
                               for piece in static_text(template)),
                             *online, *(str(markupsafe.escape(url)) for url in online)])

    def _static_headers(self) -> bytes:
        s = self.settings
        lines = [address_header("From", s.sender.name, s.sender.address)]
        if s.sender.reply_to:
            lines.append(address_header("Reply-To", "", s.sender.reply_to))
        lines += [
            encode_header("List-Id", s.list_id),
            # RFC 8058: one-click unsubscribe by POST to the https URL in List-Unsubscribe.
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            b"MIME-Version: 1.0",
        ]
        return CRLF.join(lines) + CRLF

    def _attachment_tail(self, attachments: tuple[Attachment, ...]) -> bytes:
        parts = []
        for att in attachments:
            name = _clean(att.filename)
            parts.append(
                f"--{self._mixed}\r\n"
                f"Content-Type: {att.content_type};\r\n {_file_param('name', name)}\r\n"
                f"Content-Disposition: attachment;\r\n {_file_param('filename', name)}\r\n"
                .encode() + _encoded_attachment(att)
            )
        if not parts:
            return b""
        return b"".join(parts) + f"--{self._mixed}--\r\n".encode()

    def links(self, recipient: Recipient, lang: str = "") -> Links:
        base = self.settings.base_url
        token = self.tokens.manage(recipient.email, recipient.list, self.campaign_id)
        return Links(
            unsubscribe=f"{base}/unsubscribe/{token}",
            preferences=f"{base}/preferences/{token}",
            view_online=self._view_online(lang),
        )

    def _view_online(self, lang: str) -> str:
        query = f"?lang={lang}" if lang else ""
        return f"{self.settings.base_url}/archive/{self.campaign_id}{query}"

    def compose(self, recipient: Recipient, *, message_id: str) -> Composed:
        """The message. Every line of it ends in CRLF and it holds no other CR or LF, whatever
        the recipient's data or the campaign's text: the transport relies on it."""
        lr = self.rendition.for_language(recipient.language)
        links = self.links(recipient, lr.lang)
        body = personalise_pieces(lr, recipient, links)
        tail = self._tails[lr.lang]
        data = (self._headers(recipient, body, links, message_id, mixed=bool(tail),
                              static_subject=lr.static_subject is not None)
                + self._body(body, lr, tail))
        if self._dkim is not None:
            data = self._dkim(data) + data
        return Composed(data=data, subject=body.subject, lang=lr.lang)

    def _headers(
        self, recipient: Recipient, body: Pieces, links: Links, message_id: str, *,
        mixed: bool, static_subject: bool,
    ) -> bytes:
        subject_line = self._subject_lines.get(body.subject)
        if subject_line is None:
            subject = f"[TEST] {body.subject}" if self.test else body.subject
            subject_line = encode_header("Subject", subject)
            if static_subject:
                self._subject_lines[body.subject] = subject_line
        token = links.unsubscribe.rsplit("/", 1)[1]
        mailto = f"mailto:{self.settings.unsubscribe_mailto}?subject=unsubscribe%20{token}"
        lines = [
            address_header("To", recipient.name, recipient.email),
            subject_line,
            self._date_line(),
            f"Message-ID: {message_id}".encode(),
            # RFC 2369 §3.2, folded between the two URIs to stay under 998 octets a line.
            f"List-Unsubscribe: <{links.unsubscribe}>,\r\n <{mailto}>".encode(),
            f"Content-Language: {body.lang}".encode(),
        ]
        if mixed:
            ctype = f'Content-Type: multipart/mixed; boundary="{self._mixed}"'
        else:
            ctype = f'Content-Type: multipart/alternative; boundary="{self._alt}"'
        return CRLF.join(lines) + CRLF + self._static + ctype.encode() + CRLF + CRLF

    def _date_line(self) -> bytes:
        now = self.clock()
        second = int(now)
        if second != self._date[0]:
            when = format_datetime(datetime.fromtimestamp(second, self._tz))
            self._date = (second, f"Date: {when}".encode())
        return self._date[1]

    def _body(self, body: Pieces, lr: LangRendition, tail: bytes) -> bytes:
        values: dict[str, tuple[bytes, int, int]] = {}  # the name, the links: in both parts

        def encode(pieces: Sequence[str]) -> bytes:
            return self._qp(pieces, values)

        alt = (
            f"--{self._alt}\r\nContent-Type: text/plain; charset=utf-8\r\n".encode()
            + encoded_part(body.text, lr.text_mostly_ascii, encode)
            + f"\r\n--{self._alt}\r\nContent-Type: text/html; charset=utf-8\r\n".encode()
            + encoded_part(body.html, lr.html_mostly_ascii, encode)
            + f"\r\n--{self._alt}--\r\n".encode()
        )
        if not tail:
            return alt
        head = (f"--{self._mixed}\r\n"
                f'Content-Type: multipart/alternative; boundary="{self._alt}"\r\n\r\n').encode()
        return head + alt + tail


def encoded_part(pieces: Sequence[str], mostly_ascii: bool,
                 encode_qp: Callable[[Sequence[str]], bytes]) -> bytes:
    """Quoted-printable for Latin scripts; base64 where it is smaller (Arabic, Cyrillic)."""
    if mostly_ascii:
        return b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encode_qp(pieces)
    # RFC 2045 §6.8: text is encoded in its canonical form, lines ending in CRLF.
    text = lf_only("".join(pieces)).replace("\n", "\r\n")
    return b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(text.encode("utf-8"))


def _encoded_attachment(att: Attachment) -> bytes:
    """A text attachment (calendar entries) like a text part, by size; files in base64."""
    if att.content_type.startswith("text/"):
        text = att.data.decode("utf-8")
        return encoded_part([text], mostly_ascii(text), QPPieces())
    return b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(att.data)


def message_id(*, domain: str) -> str:
    """A new Message-ID; the dispatcher stores it on the ledger row so a retry keeps it."""
    return f"<{secrets.token_hex(12)}@{domain}>"


def _load_dkim(settings: Settings) -> Callable[[bytes], bytes] | None:
    cfg = settings.smtp.dkim
    if cfg is None:
        return None
    import dkim

    from .dkimkeys import read_key_file

    key = read_key_file(Path(cfg.key_file))

    def sign(data: bytes) -> bytes:
        signature: bytes = dkim.sign(
            data, cfg.selector.encode(), cfg.domain.encode(), key, include_headers=DKIM_HEADERS
        )
        return signature

    return sign
