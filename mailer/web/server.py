"""`mailer serve` under uvicorn: limits for slow and idle clients, and log lines without
addresses or tokens that cannot flood the log.

uvicorn (h11) waits for a request head for ever and keeps every connection it accepts: a few
hundred half-sent requests hold as many file descriptors, and once the process runs out asyncio
logs every failed accept() with a traceback, thousands of lines a second. Here a connection must
deliver its whole request within `web.request_timeout_s` (else 408 and closed), connections
beyond `web.max_connections` are closed at once (the limit kept well below the process's file
limit), and repeated log lines are throttled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import Settings, WebSettings
from ..redact import redact_addresses
from .security import redact_path

log = logging.getLogger("mailer.web")
REPORT_EVERY_S = 60.0
FD_RESERVE = 64  # files the process needs besides client connections (database, SMTP, logs)
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                     b"connection: close\r\n\r\n")


class Guard:
    """Shared by every connection of one server: the limits and what was cut off."""

    def __init__(self, *, request_timeout_s: float, max_connections: int) -> None:
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.timed_out = 0
        self.refused = 0
        self._last_report = -REPORT_EVERY_S
        self._report: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, *, timed_out: int = 0,
             refused: int = 0) -> None:
        """Count a connection cut off; one summary line at most every REPORT_EVERY_S."""
        self.timed_out += timed_out
        self.refused += refused
        if self._report is None:  # a burst first, then at most one line a minute
            delay = max(1.0, self._last_report + REPORT_EVERY_S - time.monotonic())
            self._report = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        self._report = None
        self._last_report = time.monotonic()
        if self.timed_out or self.refused:
            log.warning("closed %d connections that sent no complete request within %g s and "
                        "%d over the limit of %d connections", self.timed_out,
                        self.request_timeout_s, self.refused, self.max_connections)
        self.timed_out = self.refused = 0


def guarded_protocol(guard: Guard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline per request and a cap on connections."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > guard.max_connections:
                guard.note(self.loop, refused=1)
                transport.abort()
                return
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def _track(self) -> None:
            """Armed while a request is awaited or arriving; off once it is all in."""
            if self.transport.is_closing():
                self._disarm()
            elif self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                if self._deadline is None:
                    self._deadline = self.loop.call_later(guard.request_timeout_s,
                                                          self._too_slow)
            else:
                self._disarm()

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            waiting = self.conn.their_state is h11.IDLE and (
                self.cycle is None or self.cycle.response_complete)
            if not waiting:  # a body still arriving: the app sees a disconnect
                guard.note(self.loop, timed_out=1)
            elif self.conn.trailing_data[0]:  # a request head begun and never finished
                guard.note(self.loop, timed_out=1)
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()  # an idle connection (nothing sent) goes quietly

    return GuardedH11Protocol


def max_connections(web: WebSettings, *, soft_file_limit: int | None = None) -> int:
    """`web.max_connections`, lowered to what the process's file limit leaves after twice the
    accept backlog and FD_RESERVE: asyncio accepts up to `backlog` sockets in one go, and
    those refused are closed only on the next turn of the loop, while it may accept more."""
    if soft_file_limit is None:
        import resource

        soft_file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_file_limit == -1:  # RLIM_INFINITY
        return web.max_connections
    room = soft_file_limit - 2 * web.backlog - FD_RESERVE
    return max(1, min(web.max_connections, room))


def uvicorn_config(app: Any, settings: Settings, *, host: str, port: int,
                   log_level: str = "info", json_logs: bool = False) -> Any:
    """The uvicorn.Config of `mailer serve`: no proxy headers (the app resolves the client
    from `web.trusted_proxies`), the limits of the `web` block, filtered logs. With
    `json_logs`, uvicorn keeps its hands off logging and its lines reach the root logger's
    JSON handler (mailer/logs.py)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    web = settings.web
    limit = max_connections(web)
    if limit < web.max_connections:
        log.warning("web.max_connections lowered to %d: the process may open few files "
                    "(raise it with ulimit -n)", limit)
    guard = Guard(request_timeout_s=web.request_timeout_s, max_connections=limit)
    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(guard), proxy_headers=False,
        server_header=False, log_level=log_level, limit_concurrency=web.limit_concurrency,
        timeout_keep_alive=web.timeout_keep_alive_s, backlog=web.backlog,
        h11_max_incomplete_event_size=web.max_header_bytes, ws="none", lifespan="on",
        log_config=None if json_logs else LOGGING_CONFIG)
    install_log_filters(throttle=True)  # after uvicorn.Config, which sets up its loggers
    return config


# --- log filters ----------------------------------------------------------------------------


class RedactPaths(logging.Filter):
    """Access-log lines show request paths without tokens, addresses or queries (see
    `redact_path`), whatever the case or the route."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            args = list(record.args)
            for i, arg in enumerate(args):  # uvicorn's: (client, method, path, version, status)
                if isinstance(arg, str) and (arg.startswith("/") or (i == 2 and len(args) == 5)):
                    args[i] = redact_path(arg)
            record.args = tuple(args)
        return True


class RedactAddresses(logging.Filter):
    """No address in a message or a traceback (exception texts often quote one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_addresses(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_addresses(record.exc_text)
        return True


class Throttle(logging.Filter):
    """At most `per_window` lines of one kind (logger and first line of the message) per
    `window_s`; the first line after a window with suppressed lines says how many."""

    def __init__(self, *, per_window: int = 10, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self._kinds: dict[str, list[float]] = {}  # kind -> [window start, lines, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = f"{record.name}:{str(record.msg).partition(chr(10))[0][:120]}"
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= 1000:
                self._kinds.clear()
            state = self._kinds[kind] = [now, 0, 0]
        if now - state[0] >= self.window_s:
            if state[2]:
                record.msg = f"{record.msg} [{int(state[2])} more like this suppressed]"
            state[:] = [now, 0, 0]
        state[1] += 1
        if state[1] > self.per_window:
            state[2] += 1
            return False
        return True


def install_log_filters(*, throttle: bool = False) -> None:
    """Idempotent: the access log without tokens, the server's and our own lines without
    addresses; with `throttle` (a server process) the server's repeated lines are capped, so
    that a flood of bad connections cannot flood the log."""
    _add(logging.getLogger("uvicorn.access"), RedactPaths)
    for name in ("uvicorn.error", "asyncio", "mailer.web"):
        _add(logging.getLogger(name), RedactAddresses)
    if throttle:
        for name in ("uvicorn.error", "asyncio"):
            _add(logging.getLogger(name), Throttle)


def _add(logger: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())
