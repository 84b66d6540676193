"""A real aiosmtpd server for tests, with faults scripted on the server side.

    async def test_x(fault_server):
        server = await fault_server(Faults(rcpt={"gone@example.org": (550, "5.1.1 no such user")}))
        ... deliver to server.host, server.port ...
        server.faults.stall_s = 1.0      # faults may change while the server runs

The client under test (aiosmtplib in mailer.transport) is never mocked: it talks SMTP over
loopback to this server, like aiosmtplib's own test suite does. To use the fixtures in a test
module, re-export them (`fault_server = smtpd.fault_server`) or import them with a noqa.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "fault.test"


@dataclass
class Faults:
    connect_421: int = 0  # the next N connections get "421 4.3.2 try later" and are closed
    refuse_connections: bool = False  # accept, then hang up without a greeting
    mail: dict[str, tuple[int, str]] = field(default_factory=dict)  # sender -> MAIL reply
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)  # address -> RCPT reply
    rcpt_first_attempt: dict[str, tuple[int, str]] = field(default_factory=dict)  # first RCPT only
    temp_fail_share: float = 0.0  # share of addresses (stable, by CRC32) 451'd on first RCPT
    data_reply: dict[str, tuple[int, str]] = field(default_factory=dict)  # rcpt -> reply to DATA
    drop_in_data_every: int = 0  # hang up instead of answering every Nth message's DATA
    stall_s: float = 0.0  # wait this long before answering DATA
    auth: tuple[str, str] | None = None  # require AUTH (PLAIN/LOGIN) with these credentials
    auth_refusal: str | None = None  # reply to wrong credentials instead of aiosmtpd's 535
    data_command: tuple[int, str] | None = None  # reply to the DATA command instead of 354
    # Awaited with the recipient once a message's content has arrived, before any reply:
    # lets a test act (lock the ledger, …) at an exact point of the SMTP dialogue.
    on_data: Callable[[str], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool  # the session was encrypted (STARTTLS or implicit TLS)


class _Hangup(asyncio.Protocol):
    """A connection that is answered with `greeting` (if any) and closed at once."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.greeting:
            transport.write(self.greeting)  # type: ignore[attr-defined]
        transport.close()


class _TrackedSMTP(SMTP):
    """aiosmtpd's SMTP, counting live sessions (STARTTLS calls connection_made again)."""

    def __init__(self, owner: FaultServer, **kwargs: Any) -> None:
        self.owner = owner
        super().__init__(owner, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.owner._active.add(self)
        self.owner.peak_connections = max(self.owner.peak_connections, len(self.owner._active))

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._active.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        refusal = self.owner.faults.data_command
        if refusal is not None and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(f"{refusal[0]} {refusal[1]}")
            return
        await super().smtp_DATA(arg)


class FaultServer:
    """The server and, as aiosmtpd handler, the fault logic (handle_MAIL/RCPT/DATA hooks)."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        starttls: ssl.SSLContext | None = None,  # offer STARTTLS with this context
        tls: ssl.SSLContext | None = None,  # implicit TLS on connect (port 465 style)
        smtputf8: bool = True,  # offer SMTPUTF8 (RFC 6531)
        offer_auth: bool = True,  # offer AUTH (RFC 4954)
        offer_size: bool = True,  # offer SIZE (RFC 1870)
        pipelining: bool = True,  # offer PIPELINING (RFC 2920); aiosmtpd reads commands in order
    ) -> None:
        self.faults = faults or Faults()
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[Received] = []
        self.connections = 0  # TCP connections accepted, faulty ones included
        self.peak_connections = 0  # most SMTP sessions open at once
        self.rcpt_seen: Counter[str] = Counter()
        self.rcpt_times: dict[str, list[float]] = {}  # monotonic time of each RCPT, by address
        self.data_count = 0
        self.data_seen: list[Received] = []  # every message whose content arrived, any reply
        self.auth_attempts = 0  # AUTH commands that reached the authenticator
        self.helo_names: list[str] = []  # the EHLO/HELO name of each transaction's session
        self._starttls = starttls
        self._tls = tls
        self._smtputf8 = smtputf8
        self._offer_auth = offer_auth
        self._offer_size = offer_size
        self._pipelining = pipelining
        self._active: set[_TrackedSMTP] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FaultServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._new_connection(loop), host=self.host, port=0, ssl=self._tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.hang_up()
        await server.wait_closed()
        await asyncio.sleep(0)

    def hang_up(self) -> None:
        """Close every open session from the server side, as an idle timeout would."""
        for session in list(self._active):
            if session.transport is not None:
                session.transport.close()

    @property
    def active_connections(self) -> int:
        return len(self._active)

    def _new_connection(self, loop: asyncio.AbstractEventLoop) -> asyncio.BaseProtocol:
        self.connections += 1
        faults = self.faults
        if faults.refuse_connections:
            return _Hangup()
        if faults.connect_421 > 0:
            faults.connect_421 -= 1
            return _Hangup(b"421 4.3.2 try later\r\n")  # RFC 5321 §3.1
        return _TrackedSMTP(
            self,
            hostname=HOSTNAME,
            enable_SMTPUTF8=self._smtputf8,
            data_size_limit=50 * 1024 * 1024 if self._offer_size else None,
            tls_context=self._starttls,
            # Tests authenticate over plain loopback; without TLS, requiring it hides AUTH.
            auth_require_tls=not self._offer_auth,
            authenticator=self._authenticate,
            loop=loop,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        # handled=False: aiosmtpd then replies 535 itself; the default (handled=True) on a
        # failure means "I already replied" and the client would wait for nothing.
        self.auth_attempts += 1
        expected = self.faults.auth
        if expected is None:
            return AuthResult(success=True)
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        given = (data.login.decode(), data.password.decode())
        if given != expected and self.faults.auth_refusal is not None:
            return AuthResult(success=False, handled=False, message=self.faults.auth_refusal)
        return AuthResult(success=given == expected, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self._pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.helo_names.append(session.host_name or "")
        if self.faults.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"  # RFC 4954 §6
        if address in self.faults.mail:
            code, text = self.faults.mail[address]
            return f"{code} {text}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        faults = self.faults
        self.rcpt_seen[address] += 1
        self.rcpt_times.setdefault(address, []).append(time.monotonic())
        first = self.rcpt_seen[address] == 1
        if address in faults.rcpt:
            code, text = faults.rcpt[address]
            if code // 100 == 2:  # 251 "will forward": accepted all the same
                envelope.rcpt_tos.append(address)
            return f"{code} {text}"
        if first and address in faults.rcpt_first_attempt:
            code, text = faults.rcpt_first_attempt[address]
            return f"{code} {text}"
        if first and _share(address) < faults.temp_fail_share:
            return "451 4.7.1 greylisted, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.faults
        self.data_count += 1
        content = envelope.original_content or b""
        encrypted = self._tls is not None or session.ssl is not None
        received = Received(envelope.mail_from or "", list(envelope.rcpt_tos), content,
                            list(envelope.mail_options), encrypted)
        self.data_seen.append(received)
        if faults.on_data is not None:
            await faults.on_data(envelope.rcpt_tos[0] if envelope.rcpt_tos else "")
        if faults.drop_in_data_every and self.data_count % faults.drop_in_data_every == 0:
            # The whole message arrived but the reply never comes: the client cannot tell
            # whether it was delivered (RFC 5321 §6.1 - the duplicate window).
            if isinstance(server.transport, asyncio.Transport):
                server.transport.abort()
            await asyncio.Event().wait()  # cancelled by connection_lost()
        if faults.stall_s:
            await asyncio.sleep(faults.stall_s)
        for address in envelope.rcpt_tos:
            if address in faults.data_reply:
                code, text = faults.data_reply[address]
                return f"{code} {text}"
        self.messages.append(received)
        return "250 2.0.0 OK"


def make_tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts around a fresh self-signed certificate for 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))  # verifies chain and host name
    return server, client


def _share(address: str) -> float:
    """A stable pseudo-random number in [0, 1) per address."""
    return (zlib.crc32(address.lower().encode("utf-8", "surrogateescape")) % 10_000) / 10_000


ServerFactory = Callable[..., Awaitable[FaultServer]]


@pytest.fixture
async def fault_server() -> AsyncIterator[ServerFactory]:
    """A factory: `await fault_server(Faults(...), starttls=ctx)`; servers stop at teardown."""
    servers: list[FaultServer] = []

    async def start(faults: Faults | None = None, **kwargs: Any) -> FaultServer:
        server = FaultServer(faults, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture(scope="session")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) SSL contexts for a self-signed 127.0.0.1 certificate (needs openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    return make_tls_contexts(tmp_path_factory.mktemp("tls"))
