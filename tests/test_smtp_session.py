"""PIPELINING and the reply reader (mailer.smtp_session), against relays scripted byte by byte.

aiosmtpd (tests/smtpd.py) answers like a well-behaved relay; the relays here answer exactly as a
test says: all replies in one packet, one byte at a time, out of step, or not at all.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from mailer.smtp_session import MAX_LINE_LENGTH, MAX_REPLY_LENGTH
from mailer.transport import Outcome, Outgoing, SmtpPool
from tests import smtpd
from tests.smtpd import Faults
from tests.test_transport import BODY, SENDER, outgoing, pool_for, settings

fault_server = smtpd.fault_server

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
EHLO_PIPELINING = b"250-relay.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-relay.test\r\n250 8BITMIME\r\n"
WIRE_BODY = BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class Relay:
    """A TCP server that greets, answers EHLO, then runs a test's script on each connection."""

    def __init__(self, script: Script, ehlo: bytes) -> None:
        self.script = script
        self.ehlo = ehlo
        self.connections = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def pool(self, **kwargs: Any) -> SmtpPool:
        return SmtpPool(settings(**kwargs), host="127.0.0.1", port=self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 relay.test ESMTP\r\n")
            assert (await reader.readline()).startswith(b"EHLO ")
            writer.write(self.ehlo)
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # an assertion in the script: the test reports it
            self.errors.append(exc)
        finally:
            writer.close()


@pytest.fixture
async def relay() -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    relays: list[Relay] = []

    async def start(script: Script, *, ehlo: bytes = EHLO_PIPELINING) -> Relay:
        server = Relay(script, ehlo)
        await server.start()
        relays.append(server)
        return server

    yield start
    for server in relays:
        await server.stop()


async def read_commands(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    return [await reader.readline() for _ in range(count)]


async def read_body(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n.\r\n")


async def serve_messages(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A relay that takes every message, answering each command as it comes."""
    replies = {b"MAIL": b"250 sender ok\r\n", b"RCPT": b"250 recipient ok\r\n",
               b"RSET": b"250 reset\r\n", b"QUIT": b"221 bye\r\n"}
    while line := await reader.readline():
        verb = line[:4]
        if verb == b"DATA":
            writer.write(b"354 go on\r\n")
            await read_body(reader)
            writer.write(b"250 2.0.0 queued\r\n")
            continue
        writer.write(replies[verb])
        if verb == b"QUIT":
            return


# -- the commands go out as one group ---------------------------------------------------------

async def test_a_pipelining_relay_gets_mail_rcpt_and_data_before_it_answers_any(relay) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Nothing is answered until all three commands are here: a client that waits for the
        # reply to MAIL before it sends RCPT times out.
        seen.extend(await read_commands(reader, 3))
        writer.write(b"250 sender ok\r\n250 recipient ok\r\n354 go on\r\n")
        seen.append(await read_body(reader))
        writer.write(b"250 2.0.0 queued as 1\r\n")
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool(timeout_s=2) as pool:
        result = await pool.send(outgoing("a@example.org", key=3))
        again = await pool.send(outgoing("b@example.org", key=4))
    assert not server.errors
    assert (result.key, result.outcome, result.code, result.text) == (
        3, Outcome.SENT, 250, "2.0.0 queued as 1")
    assert seen == [b"MAIL FROM:<" + SENDER.encode() + b">\r\n", b"RCPT TO:<a@example.org>\r\n",
                    b"DATA\r\n", WIRE_BODY]
    assert again.outcome is Outcome.SENT and server.connections == 1


async def test_without_pipelining_each_command_waits_for_its_reply(relay) -> None:
    early: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (b"250 sender ok\r\n", b"250 recipient ok\r\n", b"354 go on\r\n"):
            await reader.readline()
            await asyncio.sleep(0.05)  # a client that did not wait has written the next one
            if reader._buffer:  # noqa: SLF001 - what arrived before this reply was sent
                early.append(bytes(reader._buffer))  # noqa: SLF001
            writer.write(reply)
        await read_body(reader)
        writer.write(b"250 queued\r\n")

    server = await relay(script, ehlo=EHLO_PLAIN)
    async with server.pool() as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert not server.errors
    assert result.outcome is Outcome.SENT
    assert early == []


async def test_aiosmtpd_with_and_without_pipelining_takes_the_same_mail(fault_server) -> None:
    results = []
    for pipelining in (True, False):
        server = await fault_server(
            Faults(rcpt={"gone@example.org": (550, "5.1.1 no such user")},
                   mail={"blocked@example.org": (451, "4.3.0 sender queue full")}),
            pipelining=pipelining)
        async with pool_for(server) as pool:
            sent = await pool.send(outgoing("a@example.org", key=1))
            gone = await pool.send(outgoing("gone@example.org", key=2))
            blocked = await pool.send(Outgoing(key=3, sender="blocked@example.org",
                                               recipient="b@example.org", data=BODY))
            after = await pool.send(outgoing("c@example.org", key=4))
        results.append((pipelining, server, sent, gone, blocked, after))
    for pipelining, server, sent, gone, blocked, after in results:
        assert (sent.outcome, gone.outcome, gone.code, gone.suppress, after.outcome) == (
            Outcome.SENT, Outcome.PERMANENT, 550, True, Outcome.SENT), pipelining
        assert (blocked.outcome, blocked.code, blocked.suppress) == (
            Outcome.TEMPORARY, 451, False), pipelining
        assert [m.rcpt_tos for m in server.messages] == [["a@example.org"], ["c@example.org"]]
        assert [m.content for m in server.messages] == [BODY, BODY]
        assert server.connections == 1, pipelining  # refusals are RSET, not reconnected


# -- refusals inside a group -------------------------------------------------------------------

async def test_data_taken_after_a_refused_recipient_is_ended_empty(relay) -> None:
    """RFC 2920 §3.1: a relay that says 354 although no recipient was taken gets a lone dot."""
    after_354: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"250 ok\r\n550 5.1.1 no such user\r\n354 go on anyway\r\n")
        after_354.append(await reader.readline())
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        after_354.append(await reader.readline())
        writer.write(b"250 reset\r\n")
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool() as pool:
        gone = await pool.send(outgoing("gone@example.org", key=5))
        after = await pool.send(outgoing("a@example.org", key=6))
    assert not server.errors
    assert (gone.key, gone.outcome, gone.code, gone.text, gone.suppress) == (
        5, Outcome.PERMANENT, 550, "5.1.1 no such user", True)
    assert after_354 == [b".\r\n", b"RSET\r\n"]
    assert after.outcome is Outcome.SENT and server.connections == 1


async def test_a_refused_sender_in_a_group_reads_every_reply_then_resets(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"451 4.3.0 sender queue full\r\n503 5.5.1 need MAIL\r\n"
                     b"503 5.5.1 need RCPT\r\n")
        assert await reader.readline() == b"RSET\r\n"
        writer.write(b"250 reset\r\n")
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool() as pool:
        refused = await pool.send(outgoing("a@example.org", key=7))
        after = await pool.send(outgoing("b@example.org", key=8))
    assert not server.errors
    assert (refused.outcome, refused.code, refused.text, refused.suppress) == (
        Outcome.TEMPORARY, 451, "4.3.0 sender queue full", False)
    assert after.outcome is Outcome.SENT and server.connections == 1


async def test_a_refusal_then_a_hangup_keeps_the_refusal(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"250 ok\r\n550 5.1.1 no such user\r\n")
        await writer.drain()  # and the DATA reply never comes: the relay hangs up

    server = await relay(script)
    async with server.pool() as pool:
        gone = await pool.send(outgoing("gone@example.org"))
    assert (gone.outcome, gone.code, gone.suppress) == (Outcome.PERMANENT, 550, True)


async def test_421_inside_a_group_ends_the_session_and_cools_down(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await read_commands(reader, 3)
            # the rest of the group is never answered; the relay is going away
            writer.write(b"250 ok\r\n421 4.3.2 shutting down\r\n")
            await asyncio.sleep(6)  # the client must not wait for the DATA reply (or timeout)
            return
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool(timeout_s=5) as pool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        closing = await pool.send(outgoing("a@example.org"))
        elapsed = loop.time() - started
        after = await pool.send(outgoing("b@example.org"))
    assert (closing.outcome, closing.code, closing.text) == (
        Outcome.TEMPORARY, 421, "4.3.2 shutting down")
    assert elapsed < 3  # not the 5 s timeout, not the relay's 6 s
    assert after.outcome is Outcome.SENT and server.connections == 2
    assert pool.stats.cooldowns == 1


# -- the reply reader -------------------------------------------------------------------------

async def test_replies_arriving_one_byte_at_a_time_are_read_whole(relay) -> None:
    replies = (b"250-sender\r\n250 ok\r\n250 recipient ok\r\n354 go on\r\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        for i in range(len(replies)):
            writer.write(replies[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        await read_body(reader)
        for byte in b"250-queued\r\n250 as 42\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool() as pool:
        result = await pool.send(outgoing("a@example.org"))
        after = await pool.send(outgoing("b@example.org"))
    assert not server.errors
    assert (result.outcome, result.code, result.text) == (Outcome.SENT, 250, "queued\nas 42")
    assert after.outcome is Outcome.SENT and server.connections == 1


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        (b"250 ok\r\n250 ok\r\n354 go\r\n250 extra\r\n", "a reply nobody asked for"),
        (b"250 ok\r\nOK fine\r\n354 go\r\n", "malformed reply line"),
        (b"250 ok\r\n25 short\r\n354 go\r\n", "malformed reply line"),
        (b"250 ok\r\n250" + b"x" * 9000 + b"\r\n354 go\r\n", "reply line too long"),
        (b"250 ok\r\n" + b"250-more\r\n" * 4000, "reply too long"),
        (b"250 ok\r\n" + b"y" * 40_000, "reply too long"),
    ],
    ids=["unsolicited", "no-code", "short-code", "long-line", "endless-continuation",
         "no-line-end"],
)
async def test_a_relay_out_of_step_loses_the_session_not_the_message(
        relay, replies: bytes, reason: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await read_commands(reader, 3)
            writer.write(replies)
            await writer.drain()
            await asyncio.sleep(1)
            return
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool(timeout_s=3) as pool:
        broken = await pool.send(outgoing("a@example.org", key=9))
        after = await pool.send(outgoing("a@example.org", key=10))
    assert (broken.key, broken.outcome, broken.code) == (9, Outcome.TEMPORARY, None)
    assert reason in broken.text and "relay broke the protocol" in broken.text
    assert after.outcome is Outcome.SENT and server.connections == 2


async def test_a_reply_that_is_not_utf8_is_kept_readable(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"250 ok\r\n550 5.1.1 unbekannter Empf\xe4nger\r\n503 no\r\n")
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool() as pool:
        gone = await pool.send(outgoing("gone@example.org"))
    assert (gone.outcome, gone.code) == (Outcome.PERMANENT, 550)
    assert gone.text == "5.1.1 unbekannter Empf\udce4nger"


async def test_a_reply_that_never_comes_times_out_and_the_late_one_is_not_paired(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await read_commands(reader, 3)
            writer.write(b"250 ok\r\n250 ok\r\n")
            await asyncio.sleep(0.6)  # past the client's timeout, then the DATA reply
            writer.write(b"354 go on\r\n")
            await asyncio.sleep(0.5)
            return
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool(timeout_s=0.3) as pool:
        late = await pool.send(outgoing("a@example.org", key=1))
        await asyncio.sleep(0.5)
        after = await pool.send(outgoing("b@example.org", key=2))
    assert (late.outcome, late.code) == (Outcome.TEMPORARY, None)
    assert late.text.startswith("timed out")
    assert after.outcome is Outcome.SENT and server.connections == 2


# -- what a broken session says, and what stays open ------------------------------------------

async def test_a_hang_up_mid_group_says_the_relay_closed_the_connection(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"250 ok\r\n")
        await writer.drain()  # and nothing more: the relay hangs up

    server = await relay(script)
    async with server.pool() as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code, result.text) == (
        Outcome.TEMPORARY, None, "connection failed: the relay closed the connection")


async def test_a_reset_connection_says_so_with_the_reason(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server = await relay(script)
    async with server.pool() as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, None)
    assert result.text in (
        "connection failed: the connection was lost ([Errno 104] Connection reset by peer)",
        "connection failed: the relay closed the connection")  # if the RST came as an EOF


async def test_a_timeout_says_how_long_it_waited(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        await asyncio.sleep(1)

    server = await relay(script)
    async with server.pool(timeout_s=0.25) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.text == "timed out: no reply from the relay within 0.25 s"


async def test_a_session_idle_longer_than_the_timeout_is_used_again(relay) -> None:
    """Each reply's timer ends with its reply: a session that waits between messages is fine."""
    server = await relay(serve_messages)
    async with server.pool(timeout_s=1) as pool:
        first = await pool.send(outgoing("a@example.org"))
        await asyncio.sleep(1.5)
        second = await pool.send(outgoing("b@example.org"))
    assert (first.outcome, second.outcome) == (Outcome.SENT, Outcome.SENT)
    assert server.connections == 1


async def test_quit_waits_two_seconds_at_most_whatever_the_timeout(relay) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await read_body(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()  # QUIT, never answered
        await asyncio.sleep(30)

    server = await relay(script)
    pool = server.pool(timeout_s=30)
    assert (await pool.send(outgoing("a@example.org"))).outcome is Outcome.SENT
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(pool.aclose(), 15)
    assert loop.time() - started < 10  # QUIT_TIMEOUT_S (2 s), not the 30 s of a reply


@pytest.mark.parametrize(("pipelining", "refused"), [(True, False), (True, True),
                                                      (False, False)],
                         ids=["pipelined", "pipelined-refusal", "one-by-one"])
async def test_every_reply_is_owed_exactly_once(relay, pipelining: bool, refused: bool) -> None:
    """After a transaction (and its RSET, and the dot that ends a wrongly taken DATA) nothing
    is owed: one reply more ends the session."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections > 1:
            await serve_messages(reader, writer)
            return
        if pipelining:
            await read_commands(reader, 3)
            writer.write(b"250 ok\r\n" + (b"550 5.1.1 gone\r\n" if refused else b"250 ok\r\n")
                         + b"354 go on\r\n")
        else:
            for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go on\r\n"):
                await reader.readline()
                writer.write(reply)
        if refused:
            assert await reader.readline() == b".\r\n"
            writer.write(b"554 no valid recipients\r\n")
            assert await reader.readline() == b"RSET\r\n"
            writer.write(b"250 reset\r\n")
        else:
            await read_body(reader)
            writer.write(b"250 queued\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"250 one too many\r\n")
        await writer.drain()
        extra_sent.set()
        await asyncio.sleep(1)

    extra_sent = asyncio.Event()
    server = await relay(script, ehlo=EHLO_PIPELINING if pipelining else EHLO_PLAIN)
    async with server.pool() as pool:
        first = await pool.send(outgoing("a@example.org", key=1))
        await asyncio.wait_for(extra_sent.wait(), 10)
        await asyncio.sleep(0.2)  # the extra reply reaches the idle session, not the next one
        after = await pool.send(outgoing("b@example.org", key=2))
    assert not server.errors
    assert first.outcome is (Outcome.PERMANENT if refused else Outcome.SENT)
    assert after.outcome is Outcome.SENT and server.connections == 2


@pytest.mark.parametrize("replies", [
    b"250\r\n250\n354\r\n",  # codes without text, one with a bare LF
    b"250 ok\n250 ok\n354 go on\n",  # bare LF line ends
    b"250-first\r\n250-" + b"m" * (MAX_LINE_LENGTH - 6) + b"\r\n250 last\r\n250 ok\r\n354 go\r\n",
], ids=["code-only", "bare-lf", "longest-line"])
async def test_replies_of_every_allowed_shape_are_read(relay, replies: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_commands(reader, 3)
        writer.write(replies)
        await read_body(reader)
        writer.write(b"250 X queued as X1X\r\n")
        await serve_messages(reader, writer)

    server = await relay(script)
    async with server.pool() as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert not server.errors
    assert (result.outcome, result.text) == (Outcome.SENT, "X queued as X1X")
    assert server.connections == 1


@pytest.mark.parametrize(("replies", "reason"), [
    (b"250 ok\r\nABC fine\r\n354 go\r\n", "malformed reply line"),
    (b"250 ok\r\n250-" + b"m" * (MAX_LINE_LENGTH - 5) + b"\r\n250 ok\r\n354 go\r\n",
     "reply line too long"),
    (b"y" * (MAX_REPLY_LENGTH + 1), "reply too long"),  # no line end at all
], ids=["letters-for-a-code", "line-one-too-long", "no-line-end-at-all"])
async def test_replies_out_of_shape_end_the_session(relay, replies: bytes, reason: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections > 1:
            await serve_messages(reader, writer)
            return
        await read_commands(reader, 3)
        writer.write(replies)
        await writer.drain()
        await asyncio.sleep(1)

    server = await relay(script)
    async with server.pool(timeout_s=3) as pool:
        broken = await pool.send(outgoing("a@example.org"))
        after = await pool.send(outgoing("b@example.org"))
    assert broken.text == f"connection failed: the relay broke the protocol: {reason}" or (
        reason == "malformed reply line" and broken.text.startswith(
            f"connection failed: the relay broke the protocol: {reason} b'ABC fine"))
    assert after.outcome is Outcome.SENT and server.connections == 2
