"""One relay session after its handshake: commands written, replies read from one buffer.

aiosmtplib opens the connection, says EHLO, does STARTTLS and AUTH; then `SmtpSession` takes
the transport over. aiosmtplib's protocol keeps one reply at a time and drops data that
arrives while a reply waits for pickup, so commands sent as a group (PIPELINING, RFC 2920)
would lose their replies there. Here every complete reply is parsed into a queue, in order,
and each is paired with the command that is owed it; a reply nobody is owed ends the session.
"""

from __future__ import annotations

import asyncio
from collections import deque

import aiosmtplib
from aiosmtplib import SMTPResponse

# aiosmtplib's bounds: a line, and a whole reply with its continuation lines.
MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
LOST = "the connection was lost"


class SmtpSession(asyncio.Protocol):
    """The transport of a handshaken aiosmtplib client, now driven by this protocol."""

    def __init__(self, smtp: aiosmtplib.SMTP, *, timeout_s: float) -> None:
        transport = smtp.transport
        if transport is None:
            raise aiosmtplib.SMTPServerDisconnected("the relay closed the connection")
        self._extensions = frozenset(smtp.esmtp_extensions)
        self.pipelining = "pipelining" in self._extensions
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._owed = 0  # replies the server still owes for commands written
        self._waiter: asyncio.Future[None] | None = None
        self._error: aiosmtplib.SMTPException | None = None
        # From here on the connection's events (data, EOF, loss) come to this object; the
        # aiosmtplib client is dropped without closing it.
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]
        transport.set_protocol(self)

    @property
    def is_connected(self) -> bool:
        return self._error is None and not self._transport.is_closing()

    def supports_extension(self, extension: str) -> bool:
        return extension.lower() in self._extensions

    def write(self, data: bytes, replies: int) -> None:
        """Send `data` (whole command lines, or a message body) that `replies` replies answer."""
        if self._error is not None:
            raise self._error
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected(LOST)
        self._owed += replies
        self._transport.write(data)

    async def read(self, timeout_s: float | None = None) -> SMTPResponse:
        """The next reply, in the order the commands were written."""
        if self._replies:
            return self._replies.popleft()
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        wait_s = self._timeout_s if timeout_s is None else timeout_s
        timer = self._loop.call_later(wait_s, self._expire, wait_s)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()
        if self._replies:
            return self._replies.popleft()
        raise self._error or aiosmtplib.SMTPServerDisconnected(LOST)

    def close(self) -> None:
        self._transport.close()  # connection_lost follows and fails what still waits

    async def quit(self, timeout_s: float) -> None:
        try:
            self.write(b"QUIT\r\n", 1)
            await self.read(timeout_s)
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        if b"\n" in data:
            try:
                self._parse()
            except aiosmtplib.SMTPException as exc:
                self._transport.close()  # a relay out of step cannot be trusted with the next
                self._fail(exc)
                return
        elif len(self._buffer) > MAX_REPLY_LENGTH:
            self._transport.close()
            self._fail(_malformed("reply too long"))
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the relay closed the connection"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"{LOST} ({exc})" if exc else LOST))

    # -- internals ------------------------------------------------------------------------------

    def _parse(self) -> None:
        """Move every complete reply out of the buffer; keep a partial one for later."""
        buffer = self._buffer
        start = 0  # where the reply being read began
        offset = 0
        lines: list[str] = []
        while (end := buffer.find(b"\n", offset)) != -1:
            line = bytes(buffer[offset:end + 1])
            if len(line) > MAX_LINE_LENGTH:
                raise _malformed("reply line too long")
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise _malformed(f"malformed reply line {line[:80]!r}")
            lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            offset = end + 1
            if line[3:4] == b"-":
                continue
            if self._owed == 0:
                raise _malformed(f"a reply nobody asked for: {line[:80]!r}")
            self._owed -= 1
            reply = SMTPResponse(int(code), "\n".join(lines))
            self._replies.append(reply)
            lines = []
            start = offset
            if reply.code == 421:  # RFC 5321 §3.8: the relay is closing the channel
                self._transport.close()
                self._fail(aiosmtplib.SMTPServerDisconnected(f"421 {reply.message}"))
                return
        if start:
            del buffer[:start]
        if len(buffer) > MAX_REPLY_LENGTH:
            raise _malformed("reply too long")

    def _expire(self, wait_s: float) -> None:
        # The session is done: a reply arriving late would answer the wrong command.
        self._fail(aiosmtplib.SMTPReadTimeoutError(f"no reply from the relay within {wait_s:g} s"))

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _malformed(what: str) -> aiosmtplib.SMTPServerDisconnected:
    return aiosmtplib.SMTPServerDisconnected(f"the relay broke the protocol: {what}")
