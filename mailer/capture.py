"""The embedded capture server: a real SMTP server on loopback filing every message in a maildir.

With the shipped config (`smtp.host: embedded`) the whole delivery path - pool, SMTP dialogue,
ledger - runs for real, and what "went out" can be read under var/outbox/ with any mail reader.
The server runs in the caller's event loop (aiosmtpd's SMTP class as the protocol factory of
`loop.create_server`), not in aiosmtpd's threaded Controller.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import weakref
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from .files import private_dir

log = logging.getLogger(__name__)

DATA_SIZE_LIMIT = 50 * 1024 * 1024
SERVER_HOSTNAME = "capture.imag-mailer.invalid"  # RFC 2606: never resolves, never leaks


class _MaildirHandler:
    """aiosmtpd handler: one maildir file per accepted transaction."""

    def __init__(self, outbox: Path, *, trace_headers: bool) -> None:
        private_dir(outbox.parent)  # Maildir makes only the last level; mail is private
        self.maildir = mailbox.Maildir(outbox, create=True)
        self.trace_headers = trace_headers
        self.accepted = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if self.trace_headers:
            content = _trace(envelope) + content
        # The maildir keeps the message byte for byte as it arrived (CRLF line endings).
        key = self.maildir.add(content)
        self.accepted += 1
        log.debug("captured %s for %s", key, envelope.rcpt_tos)
        return f"250 2.0.0 OK: queued as {key}"


def _trace(envelope: Envelope) -> bytes:
    """Trace fields as a final-delivery MTA adds them (RFC 5321 §4.4), plus X-Envelope-To."""
    encode = _header_bytes
    return (
        b"Return-Path: <" + encode(envelope.mail_from or "") + b">\r\n"
        + b"X-Envelope-To: " + encode(", ".join(envelope.rcpt_tos)) + b"\r\n"
    )


def _header_bytes(text: str) -> bytes:
    # aiosmtpd decodes SMTPUTF8 arguments as UTF-8 with surrogateescape; undo exactly that.
    return text.encode("utf-8", "surrogateescape")


class CaptureServer:
    """`async with CaptureServer(outbox) as server:` then deliver to server.host:server.port."""

    def __init__(
        self,
        outbox: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_size_limit: int = DATA_SIZE_LIMIT,
        trace_headers: bool = True,
    ) -> None:
        self.outbox = Path(outbox)
        self.host = host
        self.port = port
        self._data_size_limit = data_size_limit
        self._trace_headers = trace_headers
        self._handler: _MaildirHandler | None = None
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    @property
    def accepted(self) -> int:
        """Messages filed since start()."""
        return self._handler.accepted if self._handler else 0

    @property
    def maildir(self) -> mailbox.Maildir:
        if self._handler is None:
            raise RuntimeError("the capture server has not been started")
        return self._handler.maildir

    async def __aenter__(self) -> CaptureServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            return
        handler = self._handler = _MaildirHandler(self.outbox, trace_headers=self._trace_headers)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._new_session(handler, loop), host=self.host, port=self.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("capture server on %s:%d filing mail in %s", self.host, self.port, self.outbox)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Pooled clients keep their sessions open; since Python 3.12 wait_closed() would wait
        # for them, so close them from this side first.
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost() run and end the session tasks

    def _new_session(self, handler: _MaildirHandler, loop: asyncio.AbstractEventLoop) -> SMTP:
        session = SMTP(
            handler,
            data_size_limit=self._data_size_limit,
            enable_SMTPUTF8=True,  # RFC 6531; 8BITMIME is on because decode_data is False
            decode_data=False,
            # A fixed name: aiosmtpd would otherwise call socket.getfqdn() for every connection,
            # blocking the event loop on a DNS lookup.
            hostname=SERVER_HOSTNAME,
            loop=loop,
        )
        self._sessions.add(session)
        return session
