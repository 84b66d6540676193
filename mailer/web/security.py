"""Security headers, CSRF tokens for the forms, and a per-client rate limit."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from itsdangerous import BadSignature, TimestampSigner
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# No script at all; styles and images only from us; no framing (clickjacking on the
# one-button unsubscribe page); forms post only to us.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    # The tokens are in the URL path: never leak them to another site in a Referer.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class SecurityHeaders:
    """Pure ASGI middleware: adds the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.headers = dict(HEADERS)
        if hsts:
            self.headers["Strict-Transport-Security"] = "max-age=31536000"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Csrf:
    """Double-submit token: a random value in a SameSite=Strict cookie, the same value signed
    with the server key in a hidden form field. A replayed form without the cookie, or a
    cookie without a matching, fresh field, is refused."""

    FIELD = "csrf"
    MAX_AGE_S = 4 * 3600

    def __init__(self, secret: str, *, secure: bool) -> None:
        self._signer = TimestampSigner(secret, salt="imag-mailer.csrf")
        self.secure = secure
        # The __Host- prefix pins the cookie to this host and path "/" (RFC 6265bis §4.1.3.2).
        self.cookie = "__Host-imag_csrf" if secure else "imag_csrf"

    def new_value(self) -> str:
        return secrets.token_urlsafe(18)

    def field_for(self, value: str) -> str:
        return self._signer.sign(value).decode()

    def check(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or len(field) > 200:
            return False
        try:
            value = self._signer.unsign(field, max_age=self.MAX_AGE_S).decode()
        except (BadSignature, UnicodeDecodeError):
            return False
        return hmac.compare_digest(value, cookie)


class SlidingWindow:
    """At most `limit` hits per `window_s` per client; bounded memory (oldest clients go first).

    In-process: behind several web processes each keeps its own window, which still bounds a
    burst to limit × processes. The per-address limit lives in the database.
    """

    def __init__(self, *, limit: int, window_s: float, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def allow(self, client: str) -> bool:
        now = self.clock()
        hits = self._hits.get(client)
        if hits is None:
            hits = self._hits[client] = deque()
            while len(self._hits) > self.max_clients:
                self._hits.popitem(last=False)
        self._hits.move_to_end(client)
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True
