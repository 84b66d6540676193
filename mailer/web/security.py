"""Security headers, CSRF tokens for the forms, the client's address behind a trusted proxy,
per-client rate limits, and paths made fit for a log line."""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

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
        except (BadSignature, UnicodeError):  # a lone surrogate cannot even be encoded
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


# --- the client's address -------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """An IP from a socket peer or an X-Forwarded-For entry ("[v6]:port" and "v4:port" too);
    IPv4-mapped IPv6 as IPv4. None for anything else (a name, "unknown", garbage)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def rate_key(client: str) -> str:
    """What a per-client limit counts: the IP, and for IPv6 its /64 (one end user's network:
    rotating through its addresses is free)."""
    ip = parse_ip(client)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip) if ip is not None else client


class ClientAddress:
    """Pure ASGI middleware: puts the real client into `scope["client"]`, so that the rate
    limits, the consent log and the access log all see the same address.

    X-Forwarded-For is believed only when the TCP peer is one of `trusted` (IPs or networks):
    its entries are read from the right (each proxy appends the address it was called from),
    skipping trusted proxies; the first one that is not trusted is the client. From any other
    peer the header is ignored: a client cannot make up its address.
    """

    def __init__(self, app: ASGIApp, *, trusted: Iterable[str] = ()) -> None:
        self.app = app
        self.networks = [ipaddress.ip_network(x, strict=False) for x in trusted]

    def is_trusted(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def resolve(self, peer: str, forwarded: list[str]) -> str:
        client = parse_ip(peer)
        if not self.is_trusted(client):
            return peer
        hops = [hop for value in forwarded for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            ip = parse_ip(hop)
            if ip is None:  # not an address: only the client can have written that
                break
            client = ip
            if not self.is_trusted(ip):
                break
        return str(client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.networks and scope["type"] in ("http", "websocket") and scope.get("client"):
            peer = scope["client"][0]
            headers = scope.get("headers") or []
            forwarded = [v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for"]
            if forwarded:
                resolved = self.resolve(peer, forwarded)
                if resolved != peer:
                    scope["client"] = (resolved, 0)
                    proto = [v for k, v in headers if k == b"x-forwarded-proto"]
                    if proto and proto[-1].strip().lower() in (b"http", b"https"):
                        scope["scheme"] = proto[-1].strip().lower().decode()
        await self.app(scope, receive, send)


# --- paths in log lines ---------------------------------------------------------------------

# The token routes, compared without case: whatever follows them is a token (an address).
TOKEN_ROUTES = frozenset({"unsubscribe", "preferences", "confirm"})
# A path segment shown as is: lower-case names like "subscribe", "imag.css", a campaign id.
# Tokens are base64 with upper-case letters; an address has an @ (%40).
_SAFE_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_SAFE_QUERY = re.compile(r"lang=[a-z]{2,3}")
REDACTED = "…"


def redact_path(target: str) -> str:
    """A request path (with query) fit for a log line: after /confirm/, /unsubscribe/ and
    /preferences/ (any case) nothing is kept; elsewhere only lower-case plain segments; of
    the query only `lang=`."""
    path, question, query = target.partition("?")
    head, *rest = path.split("/")
    if rest and rest[0].lower() in TOKEN_ROUTES:
        shown = [rest[0], REDACTED] if len(rest) > 1 else [rest[0]]
    else:
        shown = [x if not x or _SAFE_SEGMENT.fullmatch(x) else REDACTED for x in rest]
    redacted = "/".join([head and REDACTED, *shown])
    if question:
        safe = all(_SAFE_QUERY.fullmatch(part) for part in query.split("&"))
        redacted += "?" + (query if safe else REDACTED)
    return redacted
