"""Opaque, tamper-proof tokens for unsubscribe, preferences and confirmation links.

A token is its payload (address, list, campaign) encrypted with AES-SIV under a key derived from
the signing key: it reveals nothing about the subscriber, any change to it is detected, and the
same payload always gives the same token (a retried message is byte-for-byte the same mail).
One token per recipient and list serves both the unsubscribe and the preferences page, so the
per-recipient cost is one AES-SIV call (~2 µs). Unsubscribe tokens do not expire: RFC 8058
one-click must keep working for old mails. Confirmation tokens expire after 7 days.

Mails sent before tokens were encrypted carry signed (readable) itsdangerous tokens; those are
still accepted, never issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

CONFIRM_MAX_AGE_S = 7 * 24 * 3600
MAX_TOKEN_CHARS = 1024  # far above any real token; longer input is not even decoded
VERP_TOKEN_CHARS = 42  # base32 of 10 bytes of ids + the 16-byte SIV tag, unpadded
_SEP = "\x00"  # cannot occur in an address, a list name or a campaign id
INVALID = "this link is not valid (altered or incomplete)"
EXPIRED = "this confirmation link has expired; please subscribe again"


# Lower-case base32 (RFC 4648 §6) by pairs of characters, 10 bits at a time: per message, and
# base64.b32encode is a Python loop that costs more than the encryption (Python 3.11).
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
_B32_SHIFTS = tuple(range(200, -10, -10))


def _b32_lower(data: bytes) -> str:
    """Unpadded base32 of 26 bytes (a VERP token): 208 bits and 2 zero bits, 21 pairs."""
    n = int.from_bytes(data, "big") << 2
    return "".join([_B32_PAIRS[(n >> shift) & 1023] for shift in _B32_SHIFTS])


class TokenError(ValueError):
    """The token is forged, altered, expired or for another purpose."""


@dataclass(frozen=True, slots=True)
class ManageToken:
    email: str
    list: str
    campaign: str = ""


class Tokens:
    def __init__(self, secret: str) -> None:
        key = hmac.new(secret.encode(), b"imag-mailer token key v1", hashlib.sha512).digest()
        self._siv = AESSIV(key)  # 512-bit key: AES-256-SIV
        self._legacy_manage = URLSafeSerializer(secret, salt="imag-mailer.manage")
        self._legacy_confirm = URLSafeTimedSerializer(secret, salt="imag-mailer.confirm")

    def _seal(self, purpose: bytes, fields: list[str]) -> str:
        data = self._siv.encrypt(_SEP.join(fields).encode("utf-8"), [purpose])
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    def _open(self, purpose: bytes, token: str, count: int) -> list[str]:
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(INVALID)
        try:
            data = base64.urlsafe_b64decode(token + "==")  # surplus padding is ignored
            fields = self._siv.decrypt(data, [purpose]).decode("utf-8").split(_SEP)
        except (InvalidTag, ValueError, binascii.Error):
            raise TokenError(INVALID) from None
        if len(fields) != count:
            raise TokenError(INVALID)
        return fields

    # -- unsubscribe and preferences --------------------------------------------------------

    def manage(self, email: str, list_name: str, campaign: str = "") -> str:
        return self._seal(b"manage", [email, list_name, campaign])

    def read_manage(self, token: str) -> ManageToken:
        if "." in token:
            return self._read_legacy_manage(token)
        email, list_name, campaign = self._open(b"manage", token, 3)
        return ManageToken(email, list_name, campaign)

    def _read_legacy_manage(self, token: str) -> ManageToken:
        try:
            email, list_name, campaign = self._legacy_manage.loads(token)
        except (BadSignature, ValueError, TypeError):
            raise TokenError(INVALID) from None
        return ManageToken(str(email), str(list_name), str(campaign))

    # -- the VERP return path (mailbox.py reads it back) -------------------------------------

    def verp(self, run_id: int, delivery_id: int) -> str:
        """The token in `bounces+<token>@domain`: run and ledger row, sealed like the others
        but in lower-case base32, because some mail servers change the case of a local part
        (RFC 5321 §2.4 lets them) and a local part holds at most 64 octets (§4.5.3.1.1): the
        ids go as 4 + 6 bytes, so every token is VERP_TOKEN_CHARS long."""
        plain = run_id.to_bytes(4, "big") + delivery_id.to_bytes(6, "big")
        return _b32_lower(self._siv.encrypt(plain, [b"verp"]))

    def read_verp(self, token: str) -> tuple[int, int]:
        """(run id, ledger row id) of a VERP token; TokenError if it is not one of ours."""
        if len(token) != VERP_TOKEN_CHARS:
            raise TokenError(INVALID)
        try:
            sealed = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
            data = self._siv.decrypt(sealed, [b"verp"])
        except (InvalidTag, ValueError, binascii.Error):
            raise TokenError(INVALID) from None
        # The last character carries two padding bits: only the one spelling we write counts.
        if base64.b32encode(sealed).rstrip(b"=").decode("ascii") != token.upper():
            raise TokenError(INVALID)
        if len(data) != 10:
            raise TokenError(INVALID)
        return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")

    # -- double opt-in ------------------------------------------------------------------------

    def confirm(self, email: str, lists: list[str], nonce: str, *,
                now: float | None = None) -> str:
        issued = str(int(time.time() if now is None else now))
        return self._seal(b"confirm", [issued, email, ",".join(lists), nonce])

    def read_confirm(
        self, token: str, *, max_age_s: int = CONFIRM_MAX_AGE_S
    ) -> tuple[str, list[str], str]:
        if "." in token:
            return self._read_legacy_confirm(token, max_age_s)
        issued, email, lists, nonce = self._open(b"confirm", token, 4)
        if not issued.isdigit() or time.time() - int(issued) > max_age_s:
            raise TokenError(EXPIRED)
        return email, [x for x in lists.split(",") if x], nonce

    def _read_legacy_confirm(self, token: str, max_age_s: int) -> tuple[str, list[str], str]:
        try:
            email, lists, nonce = self._legacy_confirm.loads(token, max_age=max_age_s)
        except SignatureExpired:
            raise TokenError(EXPIRED) from None
        except (BadSignature, ValueError, TypeError):
            raise TokenError(INVALID) from None
        return str(email), [str(x) for x in lists], str(nonce)
