"""The web app's security middleware in-process: client address behind proxies, log paths,
security headers, CSRF and rate windows (the served app's tests only see them from outside)."""

from __future__ import annotations

from typing import Any

import pytest

from mailer.web.security import (
    CSP,
    REDACTED,
    ClientAddress,
    Csrf,
    SecurityHeaders,
    SlidingWindow,
    parse_ip,
    rate_key,
    redact_path,
)

SECRET = "web-security-test-secret-0123456789abcdef"


async def call(middleware: Any, scope: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Run an ASGI middleware around an app that records the scope it was given."""
    seen: dict[str, Any] = {}
    sent: list[dict] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"x-frame-options", b"SAMEORIGIN")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    await middleware(app)(scope, receive, send)
    return seen, sent


def http(peer: str | None, *headers: tuple[bytes, bytes], kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "client": (peer, 5555) if peer else None, "headers": list(headers),
            "scheme": "http", "path": "/"}


TRUSTED = ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"]


def proxied(**kwargs: Any) -> Any:
    return lambda app: ClientAddress(app, **kwargs)


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # right-most untrusted
    ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # trusted hops skipped
    ("127.0.0.1", ["203.0.113.7", "10.1.2.3"], "203.0.113.7"),  # several header lines
    ("127.0.0.1", ["unknown, 10.1.2.3"], "10.1.2.3"),  # garbage stops the walk
    ("127.0.0.1", ["10.9.9.9"], "10.9.9.9"),  # only trusted hops: the left-most of them
    ("127.0.0.1", [" , "], "127.0.0.1"),  # empty entries ignored
    ("127.0.0.1", ["[2001:db8::1]:443, 203.0.113.9:1234"], "203.0.113.9"),
    ("2001:db8::5", ["2a00:1450::1"], "2a00:1450::1"),
    ("192.0.2.50", ["203.0.113.7"], "192.0.2.50"),  # untrusted peer: header ignored
    ("::ffff:127.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # mapped IPv4 is IPv4
])
async def test_client_address_resolution(peer: str, forwarded: list[str], client: str) -> None:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    headers.append((b"x-forwarded-proto", b" HTTPS "))
    seen, _ = await call(proxied(trusted=TRUSTED), http(peer, *headers))
    assert seen["client"][0] == client
    moved = client != peer
    assert seen["client"][1] == (0 if moved else 5555)
    assert seen["scheme"] == ("https" if moved else "http")


async def test_forwarded_proto_only_from_a_trusted_proxy_and_only_http_or_https() -> None:
    xff = (b"x-forwarded-for", b"203.0.113.7")
    seen, _ = await call(proxied(trusted=TRUSTED),
                         http("127.0.0.1", xff, (b"x-forwarded-proto", b"gopher")))
    assert seen["client"][0] == "203.0.113.7" and seen["scheme"] == "http"
    seen, _ = await call(proxied(trusted=TRUSTED),
                         http("127.0.0.1", xff, (b"x-forwarded-proto", b"http"),
                              (b"x-forwarded-proto", b"https")))
    assert seen["scheme"] == "https"  # the last one, set by our proxy
    seen, _ = await call(proxied(trusted=TRUSTED), http("127.0.0.1", xff))
    assert seen["scheme"] == "http"


async def test_without_trusted_proxies_or_header_nothing_changes() -> None:
    xff = (b"x-forwarded-for", b"203.0.113.7")
    for middleware, scope in [
        (proxied(trusted=[]), http("127.0.0.1", xff)),
        (proxied(), http("127.0.0.1", xff)),
        (proxied(trusted=TRUSTED), http("127.0.0.1")),
        (proxied(trusted=TRUSTED), http(None, xff)),
        (proxied(trusted=TRUSTED), http("127.0.0.1", xff, kind="lifespan")),
    ]:
        before = dict(scope)
        seen, _ = await call(middleware, scope)
        assert seen["client"] == before["client"]
    seen, _ = await call(proxied(trusted=TRUSTED), http("127.0.0.1", xff, kind="websocket"))
    assert seen["client"][0] == "203.0.113.7"


def test_trusted_networks_are_parsed_loosely() -> None:
    middleware = ClientAddress(lambda *a: None, trusted=["10.1.2.3/8"])  # host bits allowed
    assert middleware.is_trusted(parse_ip("10.200.0.1"))
    assert not middleware.is_trusted(parse_ip("11.0.0.1"))
    assert not middleware.is_trusted(None)


@pytest.mark.parametrize(("text", "ip"), [
    ("203.0.113.7", "203.0.113.7"), (" 203.0.113.7:8080 ", "203.0.113.7"),
    ("[2001:db8::1]:443", "2001:db8::1"), ("[2001:db8::1]", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"), ("::ffff:192.0.2.1", "192.0.2.1"),
    ("unknown", None), ("", None), ("example.org:80", None), ("1.2.3", None),
])
def test_parse_ip(text: str, ip: str | None) -> None:
    parsed = parse_ip(text)
    assert (str(parsed) if parsed is not None else None) == ip


@pytest.mark.parametrize(("client", "key"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("testclient", "testclient"),
])
def test_rate_key(client: str, key: str) -> None:
    assert rate_key(client) == key


@pytest.mark.parametrize(("target", "logged"), [
    ("/subscribe", "/subscribe"),
    ("/static/imag.css", "/static/imag.css"),
    ("/archive/wir-alle-2026-12?lang=tr", "/archive/wir-alle-2026-12?lang=tr"),
    ("/unsubscribe/AbC.dEf-123", f"/unsubscribe/{REDACTED}"),
    ("/Unsubscribe/AbC/x", f"/Unsubscribe/{REDACTED}"),
    ("/CONFIRM/tok", f"/CONFIRM/{REDACTED}"),
    ("/preferences/tok?lang=de", f"/preferences/{REDACTED}?lang=de"),
    ("/confirm", "/confirm"),
    ("/archive/Anna%40example.org", f"/archive/{REDACTED}"),
    ("/x/" + "a" * 81, f"/x/{REDACTED}"),
    ("/x/" + "a" * 80, "/x/" + "a" * 80),
    ("/-x", f"/{REDACTED}"),
    ("/subscribe?email=anna@example.org", f"/subscribe?{REDACTED}"),
    ("/subscribe?lang=de&email=a", f"/subscribe?{REDACTED}"),
    ("/subscribe?lang=deutsch", f"/subscribe?{REDACTED}"),
    ("/subscribe?lang=de&lang=tr", "/subscribe?lang=de&lang=tr"),
    ("/a//b/", "/a//b/"),
    ("*", REDACTED),
    ("http://evil.example/x", f"{REDACTED}//evil.example/x"),
    ("HTTP://Evil.example/x", f"{REDACTED}//{REDACTED}/x"),
])
def test_redact_path(target: str, logged: str) -> None:
    assert redact_path(target) == logged


async def test_security_headers_on_every_response_without_overriding_the_app() -> None:
    _, sent = await call(lambda app: SecurityHeaders(app), http("127.0.0.1"))
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    assert headers["content-security-policy"] == CSP
    assert headers["x-frame-options"] == "SAMEORIGIN"  # set by the page itself: kept
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in headers
    assert sent[1] == {"type": "http.response.body", "body": b"ok"}
    _, sent = await call(lambda app: SecurityHeaders(app, hsts=True), http("127.0.0.1"))
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    assert headers["strict-transport-security"] == "max-age=31536000"
    _, sent = await call(lambda app: SecurityHeaders(app), http("127.0.0.1", kind="websocket"))
    assert all(b"content-security-policy" not in k.lower() for k, _ in sent[0]["headers"])


def test_csrf_cookie_names_and_checks() -> None:
    plain, secure = Csrf(SECRET, secure=False), Csrf(SECRET, secure=True)
    assert plain.cookie == "imag_csrf" and secure.cookie == "__Host-imag_csrf"
    assert not plain.secure and secure.secure
    value = plain.new_value()
    assert len(value) >= 24 and value != plain.new_value()
    field = plain.field_for(value)
    assert plain.check(value, field) and secure.check(value, field)  # same key, same salt
    assert not plain.check(None, field) and not plain.check(value, None)
    assert not plain.check("", field) and not plain.check(value, "")
    assert not plain.check(value, field + "x") and not plain.check(value + "x", field)
    assert not plain.check(value, "x" * 201)
    assert not Csrf(SECRET + "-other", secure=False).check(value, field)
    assert not plain.check(value, field.encode("utf-8").decode("latin-1") + "\udcff")


def test_sliding_window() -> None:
    now = [0.0]
    window = SlidingWindow(limit=2, window_s=10, max_clients=2, clock=lambda: now[0])
    assert window.allow("a") and window.allow("a") and not window.allow("a")
    now[0] = 9.9
    assert not window.allow("a")
    now[0] = 10.0  # the first two hits are exactly a window old: gone
    assert window.allow("a") and window.allow("a") and not window.allow("a")
    assert window.allow("b") and window.allow("c")  # "a" is the oldest client: forgotten
    assert window.allow("a")
    assert window.limit == 2 and window.window_s == 10 and window.max_clients == 2


async def test_a_trusted_proxy_can_say_http_too() -> None:
    """X-Forwarded-Proto: http from our proxy turns an https scope into http (and back)."""
    xff = (b"x-forwarded-for", b"203.0.113.7")
    for raw, said in (("https", b"http"), ("http", b"https")):
        scope = {**http("127.0.0.1", xff, (b"x-forwarded-proto", said)), "scheme": raw}
        seen, _ = await call(proxied(trusted=TRUSTED), scope)
        assert seen["scheme"] == said.decode()


async def test_security_headers_pass_other_scopes_through_untouched() -> None:
    """Lifespan (and websocket) messages reach the app with the server's own receive."""
    got: list[dict] = []
    sent: list[dict] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        got.append(await receive())
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> dict:
        return {"type": "lifespan.startup"}

    async def send(message: dict) -> None:
        sent.append(message)

    await SecurityHeaders(app, hsts=True)({"type": "lifespan"}, receive, send)
    assert got == [{"type": "lifespan.startup"}]
    assert sent == [{"type": "lifespan.startup.complete"}]  # no headers added to it


def test_the_sliding_window_keeps_exactly_max_clients() -> None:
    window = SlidingWindow(limit=1, window_s=60, max_clients=2, clock=lambda: 0.0)
    assert window.allow("a") and window.allow("b")
    assert not window.allow("a")  # two clients fit: "a" is still counted
    # a third pushes out the least recently seen ("b"; "a" was just seen, though refused)
    assert window.allow("c") and not window.allow("a") and window.allow("b")
