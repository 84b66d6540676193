"""Signed, tamper-proof tokens for unsubscribe, preferences and confirmation links.

One token per recipient and list serves both the unsubscribe and the preferences page, so the
per-recipient cost is one HMAC. Unsubscribe tokens do not expire: RFC 8058 one-click must keep
working for old mails. Confirmation tokens expire after 7 days.
"""

from __future__ import annotations

from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

CONFIRM_MAX_AGE_S = 7 * 24 * 3600


class TokenError(ValueError):
    """The token is forged, altered, expired or for another purpose."""


@dataclass(frozen=True, slots=True)
class ManageToken:
    email: str
    list: str
    campaign: str = ""


class Tokens:
    def __init__(self, secret: str) -> None:
        self._manage = URLSafeSerializer(secret, salt="imag-mailer.manage")
        self._confirm = URLSafeTimedSerializer(secret, salt="imag-mailer.confirm")

    def manage(self, email: str, list_name: str, campaign: str = "") -> str:
        return str(self._manage.dumps([email, list_name, campaign]))

    def read_manage(self, token: str) -> ManageToken:
        try:
            email, list_name, campaign = self._manage.loads(token)
        except (BadSignature, ValueError, TypeError):
            raise TokenError("this link is not valid (altered or incomplete)") from None
        return ManageToken(str(email), str(list_name), str(campaign))

    def confirm(self, email: str, lists: list[str], nonce: str) -> str:
        return str(self._confirm.dumps([email, lists, nonce]))

    def read_confirm(
        self, token: str, *, max_age_s: int = CONFIRM_MAX_AGE_S
    ) -> tuple[str, list[str], str]:
        try:
            email, lists, nonce = self._confirm.loads(token, max_age=max_age_s)
        except SignatureExpired:
            raise TokenError("this confirmation link has expired; please subscribe again") from None
        except (BadSignature, ValueError, TypeError):
            raise TokenError("this link is not valid (altered or incomplete)") from None
        return str(email), [str(x) for x in lists], str(nonce)
