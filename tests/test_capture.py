"""mailer.capture: the embedded server, exercised through the real SmtpPool."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
from pathlib import Path

import aiosmtplib

from mailer.capture import DATA_SIZE_LIMIT, CaptureServer
from mailer.config import SmtpSettings
from mailer.transport import Outcome, Outgoing, SmtpPool

SENDER = "bounces@imag.example.org"
SUBJECT = "Einladung: Straßenfest – Dortmund ist Heymat 🎉 / Sokak şenliği / مهرجان"


def message(n: int, *, subject: str = "Hallo") -> bytes:
    return (
        f"From: IMAG <newsletter@imag.example.org>\r\n"
        f"To: r{n}@example.org\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{n}@imag.example.org>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n"
        f"\r\n"
        f"Nachricht {n}: Grüße aus der Nordstadt.\r\n"
        f".eine Zeile mit Punkt am Anfang\r\n"
        f"..\r\n"
    ).encode()


def pool(server: CaptureServer) -> SmtpPool:
    smtp = SmtpSettings.model_validate(
        {"pool_size": 2, "rate_per_second": 10_000, "timeout_s": 5, "helo": "client.test"}
    )
    return SmtpPool(smtp, host=server.host, port=server.port)


def stored(outbox: Path) -> dict[bytes, bytes]:
    """Maildir contents keyed by Message-ID."""
    result = {}
    maildir = mailbox.Maildir(outbox, create=False)
    for key in maildir.iterkeys():
        raw = maildir.get_bytes(key)
        parsed = email.message_from_bytes(raw)
        result[parsed["Message-ID"].encode()] = raw
    return result


async def test_every_accepted_message_is_filed_byte_for_byte(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    async with CaptureServer(outbox) as server, pool(server) as transport:
        results = await asyncio.gather(*(
            transport.send(Outgoing(key=n, sender=SENDER, recipient=f"r{n}@example.org",
                                    data=message(n)))
            for n in range(12)
        ))
        assert server.accepted == 12
    assert all(r.outcome is Outcome.SENT for r in results)
    files = stored(outbox)
    assert len(files) == 12
    for n in range(12):
        raw = files[f"<{n}@imag.example.org>".encode()]
        trace = f"Return-Path: <{SENDER}>\r\nX-Envelope-To: r{n}@example.org\r\n".encode()
        assert raw == trace + message(n)  # CRLF kept, dot-stuffing undone exactly


async def test_utf8_subject_and_smtputf8_address_survive(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    recipient = "gül.yılmaz@straßenfest.de"
    data = message(1, subject=SUBJECT)  # raw UTF-8 header: RFC 6532, needs SMTPUTF8
    async with CaptureServer(outbox) as server, pool(server) as transport:
        result = await transport.send(
            Outgoing(key=1, sender=SENDER, recipient=recipient, data=data)
        )
    assert result.outcome is Outcome.SENT
    [raw] = stored(outbox).values()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == SUBJECT
    assert parsed["X-Envelope-To"] == recipient
    assert "Grüße aus der Nordstadt" in parsed.get_content()


async def test_server_offers_8bitmime_smtputf8_and_a_generous_size(tmp_path: Path) -> None:
    async with CaptureServer(tmp_path / "outbox") as server:
        client = aiosmtplib.SMTP(hostname=server.host, port=server.port, local_hostname="t.test")
        async with client:
            await client.ehlo()
            assert client.supports_extension("8bitmime")
            assert client.supports_extension("smtputf8")
            assert int(client.esmtp_extensions["size"]) == DATA_SIZE_LIMIT >= 50_000_000


async def test_without_trace_headers_the_file_is_the_message(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    async with CaptureServer(outbox, trace_headers=False) as server, pool(server) as transport:
        await transport.send(Outgoing(key=1, sender=SENDER, recipient="a@example.org",
                                      data=message(1)))
    assert list(stored(outbox).values()) == [message(1)]


async def test_stop_closes_pooled_sessions(tmp_path: Path) -> None:
    server = CaptureServer(tmp_path / "outbox")
    await server.start()
    transport = pool(server)
    first = await transport.send(Outgoing(key=1, sender=SENDER, recipient="a@example.org",
                                          data=message(1)))
    await asyncio.wait_for(server.stop(), timeout=2)  # does not wait for the idle client
    second = await transport.send(Outgoing(key=2, sender=SENDER, recipient="a@example.org",
                                           data=message(2)))
    await transport.aclose()
    assert first.outcome is Outcome.SENT
    assert (second.outcome, second.code) == (Outcome.TEMPORARY, None)
    assert server.accepted == 1
