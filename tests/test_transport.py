"""mailer.transport against a real aiosmtpd server; faults are scripted on the server side."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import aiosmtplib
import pytest

from mailer.config import SmtpSettings
from mailer.errors import AuthenticationFailure
from mailer.transport import (
    DeliveryResult,
    Outcome,
    Outgoing,
    SmtpPool,
    TokenBucket,
    Transport,
    _failure,
    _mail_parameters,
    classify,
    dot_stuffed,
)
from tests import smtpd
from tests.helpers import FakeTime
from tests.smtpd import Faults, FaultServer

fault_server = smtpd.fault_server  # fixtures shared with other test modules
tls_contexts = smtpd.tls_contexts

SENDER = "bounces@imag.example.org"
BODY = (
    b"From: IMAG <newsletter@imag.example.org>\r\n"
    b"To: someone@example.org\r\n"
    b"Subject: Einladung\r\n"
    b"\r\n"
    b"Hallo!\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"Ende.\r\n"
)


def settings(**overrides: Any) -> SmtpSettings:
    base = {"pool_size": 1, "rate_per_second": 10_000, "timeout_s": 5, "helo": "client.test"}
    return SmtpSettings.model_validate({**base, **overrides})


def pool_for(server: FaultServer, **kwargs: Any) -> SmtpPool:
    extra = {k: kwargs.pop(k) for k in ("clock", "sleep", "tls_context") if k in kwargs}
    return SmtpPool(settings(**kwargs), host=server.host, port=server.port, **extra)


def outgoing(recipient: str, key: int = 1, data: bytes = BODY) -> Outgoing:
    return Outgoing(key=key, sender=SENDER, recipient=recipient, data=data)


# -- classify -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("code", "text", "outcome", "suppress"),
    [
        (250, "2.0.0 OK queued", Outcome.SENT, False),
        (421, "4.3.2 try later", Outcome.TEMPORARY, False),
        (451, "4.7.1 greylisted", Outcome.TEMPORARY, False),
        (452, "4.2.2 mailbox full", Outcome.TEMPORARY, False),
        (550, "5.1.1 no such user", Outcome.PERMANENT, True),
        (550, "5.1.1 <x@example.org>: rejected\nsecond line", Outcome.PERMANENT, True),
        (553, "5.1.10 recipient domain has a null MX", Outcome.PERMANENT, True),
        (550, "5.7.1 message rejected as spam", Outcome.PERMANENT, False),
        (552, "5.2.2 mailbox full", Outcome.PERMANENT, False),
        (554, "5.7.1 relay access denied", Outcome.PERMANENT, False),
        (554, "transaction failed", Outcome.PERMANENT, False),
        (550, "5.1.8 bad sender domain", Outcome.PERMANENT, False),  # our address, not theirs
        (550, "4.1.1 mismatched class", Outcome.PERMANENT, False),
        (550, "user 5.1.1 later in the text", Outcome.PERMANENT, False),
        (None, "connection lost", Outcome.TEMPORARY, False),
        (354, "go ahead", Outcome.TEMPORARY, False),
        (500, "5.5.1 command unrecognized", Outcome.PERMANENT, False),
        (200, "2.0.0 odd but fine", Outcome.SENT, False),
    ],
)
def test_classify(code: int | None, text: str, outcome: Outcome, suppress: bool) -> None:
    assert classify(code, text) == (outcome, suppress)


# -- sessions and concurrency -----------------------------------------------------------------

async def test_many_messages_share_one_session(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        results = [await pool.send(outgoing(f"r{i}@example.org", key=i)) for i in range(20)]
    assert [r.outcome for r in results] == [Outcome.SENT] * 20
    assert [r.key for r in results] == list(range(20))
    assert server.connections == 1
    assert len(server.messages) == 20
    assert pool.stats.connections_opened == 1 and pool.stats.sent == 20


async def test_pool_size_bounds_concurrent_sessions(fault_server) -> None:
    server = await fault_server(Faults(stall_s=0.02))  # slow replies make sends overlap
    async with pool_for(server, pool_size=4) as pool:
        sends = [pool.send(outgoing(f"r{i}@example.org", key=i)) for i in range(40)]
        results = await asyncio.gather(*sends)
    assert all(r.outcome is Outcome.SENT for r in results)
    assert server.peak_connections == 4
    assert server.connections == 4


async def test_body_arrives_intact_with_dot_stuffing_and_8bitmime(fault_server) -> None:
    server = await fault_server()
    data = BODY.replace(b"Hallo!", "Grüße aus Dortmund!".encode())
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org", data=data))
    assert result.outcome is Outcome.SENT and result.code == 250
    [received] = server.messages
    assert received.content == data
    assert received.mail_from == SENDER and received.rcpt_tos == ["a@example.org"]
    assert "BODY=8BITMIME" in received.mail_options
    assert f"SIZE={len(data)}" in received.mail_options


async def test_close_quits_idle_sessions(fault_server) -> None:
    server = await fault_server()
    pool = pool_for(server, pool_size=2)
    assert isinstance(pool, Transport)
    await asyncio.gather(pool.send(outgoing("a@example.org")), pool.send(outgoing("b@example.org")))
    assert server.active_connections == 2
    await pool.aclose()
    await asyncio.sleep(0.05)
    assert server.active_connections == 0


# -- replies --------------------------------------------------------------------------------

async def test_unknown_user_is_permanent_and_suppressed_and_session_survives(fault_server) -> None:
    server = await fault_server(Faults(rcpt={"gone@example.org": (550, "5.1.1 no such user")}))
    async with pool_for(server) as pool:
        gone = await pool.send(outgoing("gone@example.org", key=7))
        ok = await pool.send(outgoing("ok@example.org", key=8))
    assert gone == DeliveryResult(7, Outcome.PERMANENT, 550, "5.1.1 no such user", True)
    assert ok.outcome is Outcome.SENT
    assert server.connections == 1  # RSET, not a reconnect
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.org"]]
    assert pool.stats.permanent == 1 and pool.stats.sent == 1


async def test_greylisting_is_temporary_then_sent(fault_server) -> None:
    faults = Faults(rcpt_first_attempt={"grey@example.org": (451, "4.7.1 greylisted")})
    server = await fault_server(faults)
    async with pool_for(server) as pool:
        first = await pool.send(outgoing("grey@example.org"))
        second = await pool.send(outgoing("grey@example.org"))
    assert (first.outcome, first.code, first.suppress) == (Outcome.TEMPORARY, 451, False)
    assert second.outcome is Outcome.SENT
    assert server.rcpt_seen["grey@example.org"] == 2


async def test_temp_fail_share_greylists_a_stable_part_of_the_list(fault_server) -> None:
    server = await fault_server(Faults(temp_fail_share=0.5))
    addresses = [f"r{i}@example.org" for i in range(30)]
    async with pool_for(server) as pool:
        first = [await pool.send(outgoing(a)) for a in addresses]
        second = [await pool.send(outgoing(a)) for a in addresses]
    temporary = sum(r.outcome is Outcome.TEMPORARY for r in first)
    assert 5 < temporary < 25
    assert all(r.outcome is Outcome.SENT for r in second)


async def test_rejection_after_data_is_permanent(fault_server) -> None:
    faults = Faults(data_reply={"spam@example.org": (554, "5.7.1 looks like spam")})
    server = await fault_server(faults)
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("spam@example.org"))
        after = await pool.send(outgoing("fine@example.org"))
    assert (result.outcome, result.code, result.suppress) == (Outcome.PERMANENT, 554, False)
    assert after.outcome is Outcome.SENT and server.connections == 1


async def test_refused_sender_never_suppresses_the_recipient(fault_server) -> None:
    server = await fault_server(Faults(mail={SENDER: (550, "5.1.1 sender unknown")}))
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code, result.suppress) == (Outcome.PERMANENT, 550, False)
    assert server.rcpt_seen == {}


async def test_auth_required_but_not_configured_is_refused(fault_server) -> None:
    server = await fault_server(Faults(auth=("u", "p")))  # MAIL without AUTH gets 530 5.7.0
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code) == (Outcome.PERMANENT, 530)


async def test_unsafe_address_is_permanent_and_not_sent(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org> NOTIFY=NEVER"))
    assert result.outcome is Outcome.PERMANENT and result.code is None
    assert server.rcpt_seen == {}


# -- internationalised addresses (RFC 6531) --------------------------------------------------

async def test_utf8_address_uses_smtputf8_when_offered(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("jürgen@straßenfest.de"))
    assert result.outcome is Outcome.SENT
    [received] = server.messages
    assert received.rcpt_tos == ["jürgen@straßenfest.de"]
    assert "SMTPUTF8" in received.mail_options


async def test_utf8_local_part_without_smtputf8_is_permanent(fault_server) -> None:
    server = await fault_server(smtputf8=False)
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("jürgen@example.org"))
        idn = await pool.send(outgoing("info@straßenfest.de"))
    assert result.outcome is Outcome.PERMANENT and "SMTPUTF8" in result.text
    assert not result.suppress
    assert idn.outcome is Outcome.SENT  # only the domain is non-ASCII: sent as an A-label
    assert server.messages[0].rcpt_tos == ["info@strassenfest.de"]


# -- dropped connections and timeouts --------------------------------------------------------

async def test_drop_in_data_is_temporary_and_next_send_reconnects(fault_server) -> None:
    server = await fault_server(Faults(drop_in_data_every=2))
    async with pool_for(server) as pool:
        first = await pool.send(outgoing("a@example.org", key=1))
        dropped = await pool.send(outgoing("b@example.org", key=2))
        third = await pool.send(outgoing("c@example.org", key=3))
    assert first.outcome is Outcome.SENT
    assert (dropped.key, dropped.outcome, dropped.code) == (2, Outcome.TEMPORARY, None)
    assert third.outcome is Outcome.SENT
    assert server.connections == 2
    assert pool.stats.reconnects == 1 and pool.stats.connections_opened == 2


async def test_stall_beyond_timeout_is_temporary(fault_server) -> None:
    server = await fault_server(Faults(stall_s=2.0))
    async with pool_for(server, timeout_s=0.3) as pool:
        started = time.perf_counter()
        result = await pool.send(outgoing("slow@example.org"))
        elapsed = time.perf_counter() - started
        server.faults.stall_s = 0.0
        after = await pool.send(outgoing("fast@example.org"))
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, None)
    assert "timed out" in result.text
    assert 0.25 < elapsed < 1.0
    assert after.outcome is Outcome.SENT and server.connections == 2


async def test_refused_connection_is_temporary() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SmtpPool(settings(), host="127.0.0.1", port=port) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, None)
    assert pool.stats.connect_failures == 1


# -- cool-down --------------------------------------------------------------------------------

async def test_421_on_connect_backs_off_exponentially(fault_server) -> None:
    server = await fault_server(Faults(connect_421=3))
    fake = FakeTime()
    async with pool_for(server, clock=fake.clock, sleep=fake.sleep) as pool:
        results = [await pool.send(outgoing("a@example.org", key=i)) for i in range(4)]
    assert [(r.outcome, r.code) for r in results[:3]] == [(Outcome.TEMPORARY, 421)] * 3
    assert results[3].outcome is Outcome.SENT
    assert fake.sleeps == [0.5, 1.0, 2.0]  # each new connection waited out a growing pause
    assert server.connections == 4


async def test_queued_sends_keep_escalating_the_cooldown(fault_server) -> None:
    server = await fault_server(Faults(connect_421=3))
    fake = FakeTime()
    async with pool_for(server, pool_size=1, clock=fake.clock, sleep=fake.sleep) as pool:
        results = await asyncio.gather(*(pool.send(outgoing("a@example.org")) for _ in range(4)))
    assert [r.code for r in results] == [421, 421, 421, 250]
    assert fake.sleeps == [0.5, 1.0, 2.0]


async def test_cooldown_resets_after_a_success(fault_server) -> None:
    server = await fault_server(Faults(connect_421=1))
    fake = FakeTime()
    async with pool_for(server, clock=fake.clock, sleep=fake.sleep) as pool:
        assert (await pool.send(outgoing("a@example.org"))).code == 421
        assert (await pool.send(outgoing("a@example.org"))).outcome is Outcome.SENT
        server.faults.drop_in_data_every = 1  # lose the pooled session...
        assert (await pool.send(outgoing("a@example.org"))).code is None
        server.faults.drop_in_data_every = 0
        server.faults.connect_421 = 1  # ...and get a 421 on the reconnect
        assert (await pool.send(outgoing("a@example.org"))).code == 421
        assert (await pool.send(outgoing("a@example.org"))).outcome is Outcome.SENT
    assert fake.sleeps == [0.5, 0.5]  # back to the first step, not 1.0


async def test_sessions_failing_together_count_as_one_cooldown_step(fault_server) -> None:
    server = await fault_server(Faults(refuse_connections=True))
    fake = FakeTime()
    async with pool_for(server, pool_size=4, clock=fake.clock, sleep=fake.sleep) as pool:
        sends = (pool.send(outgoing(f"r{i}@example.org")) for i in range(4))
        results = await asyncio.gather(*sends)
        assert all(r.outcome is Outcome.TEMPORARY and r.code is None for r in results)
        assert pool.stats.cooldowns == 1
        server.faults.refuse_connections = False
        assert (await pool.send(outgoing("a@example.org"))).outcome is Outcome.SENT
    assert fake.sleeps == [0.5]


async def test_421_mid_session_drops_the_session_and_cools_down(fault_server, caplog) -> None:
    server = await fault_server(Faults(rcpt={"x@example.org": (421, "4.3.2 shutting down")}))
    fake = FakeTime()
    caplog.set_level("INFO", logger="mailer.transport")
    async with pool_for(server, clock=fake.clock, sleep=fake.sleep) as pool:
        closing = await pool.send(outgoing("x@example.org"))
        after = await pool.send(outgoing("a@example.org"))
    assert (closing.outcome, closing.code) == (Outcome.TEMPORARY, 421)
    assert after.outcome is Outcome.SENT
    assert server.connections == 2 and fake.sleeps == [0.5]
    assert (f"relay {pool.address} unavailable (4.3.2 shutting down): new connections wait "
            "0.5 s") in caplog.messages


async def test_cooldown_waits_in_real_time(fault_server) -> None:
    server = await fault_server(Faults(connect_421=1))
    async with pool_for(server) as pool:
        await pool.send(outgoing("a@example.org"))
        started = time.perf_counter()
        result = await pool.send(outgoing("a@example.org"))
        elapsed = time.perf_counter() - started
    assert result.outcome is Outcome.SENT
    assert 0.45 < elapsed < 1.5


# -- authentication and TLS -------------------------------------------------------------------

async def test_auth_with_correct_credentials_sends(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(Faults(auth=("imag", "geheim")), starttls=server_ctx)
    async with pool_for(server, username="imag", password="geheim",
                        tls_context=client_ctx) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT
    assert len(server.messages) == 1 and server.messages[0].tls  # tls: none, STARTTLS offered


async def test_password_never_goes_over_an_unencrypted_connection(fault_server) -> None:
    server = await fault_server(Faults(auth=("imag", "geheim")))  # no STARTTLS on offer
    async with pool_for(server, username="imag", password="geheim") as pool:
        with pytest.raises(AuthenticationFailure, match="unencrypted connection"):
            await pool.send(outgoing("a@example.org"))
    assert server.messages == [] and server.auth_attempts == 0


async def test_starttls_is_used_whenever_offered(fault_server, tls_contexts) -> None:
    server = await fault_server(starttls=tls_contexts[0])  # self-signed: not verifiable
    async with pool_for(server) as pool:  # tls: none, no password
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT and server.messages[0].tls


async def test_with_a_password_the_certificate_is_verified(fault_server, tls_contexts) -> None:
    server = await fault_server(Faults(auth=("imag", "geheim")), starttls=tls_contexts[0])
    async with pool_for(server, username="imag", password="geheim") as pool:  # system CAs
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is not Outcome.SENT and "certificate" in result.text.lower()
    assert server.messages == [] and server.auth_attempts == 0


async def test_auth_with_wrong_credentials_raises(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(Faults(auth=("imag", "geheim")), starttls=server_ctx)
    async with pool_for(server, username="imag", password="falsch",
                        tls_context=client_ctx) as pool:
        with pytest.raises(AuthenticationFailure, match="refused the login for 'imag'") as caught:
            await pool.send(outgoing("a@example.org"))
    assert caught.value.code == 535
    assert server.messages == []


async def test_starttls_encrypts_the_session(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(Faults(auth=("imag", "geheim")), starttls=server_ctx)
    pool = pool_for(server, tls="starttls", username="imag", password="geheim",
                    tls_context=client_ctx)
    async with pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT
    assert server.messages[0].tls


async def test_starttls_required_but_not_offered_raises(fault_server, tls_contexts) -> None:
    server = await fault_server()
    async with pool_for(server, tls="starttls", tls_context=tls_contexts[1]) as pool:
        with pytest.raises(AuthenticationFailure) as caught:
            await pool.send(outgoing("a@example.org"))
    assert str(caught.value) == (
        f"smtp.tls is 'starttls' but the relay {pool.address} does not offer STARTTLS; "
        "set smtp.tls to 'tls' or 'none' to match the relay")
    assert server.messages == []


async def test_implicit_tls(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(tls=server_ctx)
    async with pool_for(server, tls="tls", tls_context=client_ctx) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT and server.messages[0].tls


# -- rate limit -------------------------------------------------------------------------------

async def test_rate_per_second_paces_sends(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server, rate_per_second=20, pool_size=2) as pool:
        started = time.perf_counter()
        await asyncio.gather(*(pool.send(outgoing(f"r{i}@example.org")) for i in range(30)))
        elapsed = time.perf_counter() - started
    # A burst of 20, then 20 per second: the last 10 need half a second.
    assert 0.45 < elapsed < 1.5
    assert len(server.messages) == 30


@pytest.mark.parametrize(("rate", "sends", "sleeps"), [
    (20, 30, [0.05] * 10),  # a burst of 20, then one every 50 ms
    (0.5, 3, [2.0, 2.0]),  # below one per second: a burst of one
])
async def test_rate_limit_with_injected_clock(fault_server, rate: float, sends: int,
                                              sleeps: list[float]) -> None:
    server = await fault_server()
    fake = FakeTime()
    async with pool_for(server, rate_per_second=rate, clock=fake.clock, sleep=fake.sleep) as pool:
        for i in range(sends):
            await pool.send(outgoing(f"r{i}@example.org"))
    assert fake.sleeps == sleeps


async def test_rate_per_hour_is_a_second_bucket(fault_server) -> None:
    server = await fault_server()
    fake = FakeTime()
    pool = pool_for(server, rate_per_hour=2, clock=fake.clock, sleep=fake.sleep)
    async with pool:
        for i in range(3):
            await pool.send(outgoing(f"r{i}@example.org"))
    assert fake.sleeps == [1800.0]  # the hour's quota of 2 is used; the third waits its turn


def test_embedded_host_needs_an_address() -> None:
    with pytest.raises(ValueError) as caught:
        SmtpPool(SmtpSettings.model_validate({}))
    assert str(caught.value) == (
        "smtp.host is 'embedded': start a CaptureServer, pass its host/port")


# -- the DATA payload -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),  # the last line gets its CRLF
        (b"", b"\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),  # a dot opening the message, too
        (b"a\r\n.\r\n.b\r\n", b"a\r\n..\r\n..b\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),  # bare LF
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # bare CR
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),  # as many LF as CRLF, but one CR more
        (b"a\r\nb\nc", b"a\r\nb\r\nc\r\n.\r\n"),
        (b"a\n.b", b"a\r\n..b\r\n.\r\n"),  # line ends are fixed before dots are doubled
        (b"a\r\n..b", b"a\r\n...b\r\n.\r\n"),
    ],
)
def test_dot_stuffed(data: bytes, wire: bytes) -> None:
    assert dot_stuffed(data) == wire
    if (data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
            and not data.startswith(b".") and b"\n." not in data):
        # What the composer vouches for (Outgoing.composed) needs no check: same wire.
        assert dot_stuffed(data, composed=True) == wire


def test_a_composed_message_is_taken_as_it_is() -> None:
    """The flag is what skips the scans: a dot the composer vouched against goes undoubled."""
    assert dot_stuffed(b"a\r\n.b\r\n", composed=True) == b"a\r\n.b\r\n.\r\n"
    assert dot_stuffed(b"a\r\n.b", composed=True) == b"a\r\n.b\r\n.\r\n"


async def test_a_message_not_vouched_for_gets_its_line_ends_fixed(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org", data=BODY.replace(b"\r\n", b"\n")))
    assert result.outcome is Outcome.SENT
    assert server.messages[0].content == BODY


# -- envelope and MAIL parameters -------------------------------------------------------------

async def _session(server: FaultServer, *, drop: tuple[str, ...] = ()) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False,
                           local_hostname="client.test")
    await smtp.connect()
    await smtp.ehlo()
    for extension in drop:  # what a relay without that extension would have said
        del smtp.esmtp_extensions[extension]
    return smtp


def _msg(recipient: str, *, sender: str = SENDER, data: bytes = BODY) -> Outgoing:
    return Outgoing(key=7, sender=sender, recipient=recipient, data=data)


@pytest.mark.parametrize(
    ("sender", "recipient", "data", "drop", "expected"),
    [
        (SENDER, "a@example.org", BODY, (), (SENDER, "a@example.org", [f"SIZE={len(BODY)}"])),
        (SENDER, "a@example.org", "ü\r\n".encode(), (),
         (SENDER, "a@example.org", ["SIZE=4", "BODY=8BITMIME"])),
        (SENDER, "a@example.org", "ü\r\n".encode(), ("size",),
         (SENDER, "a@example.org", ["BODY=8BITMIME"])),
        (SENDER, "a@example.org", "ü\r\n".encode(), ("8bitmime",),
         (SENDER, "a@example.org", ["SIZE=4"])),
        (SENDER, "jürgen@example.org", b"x", (),
         (SENDER, "jürgen@example.org", ["SIZE=1", "SMTPUTF8"])),
        ("bounces@müller.example.org", "a@example.org", b"x", (),
         ("bounces@müller.example.org", "a@example.org", ["SIZE=1", "SMTPUTF8"])),
        # No SMTPUTF8: an internationalised domain travels as IDNA A-labels (RFC 5890).
        (SENDER, "a@müller.example.org", b"x", ("smtputf8",),
         (SENDER, "a@xn--mller-kva.example.org", ["SIZE=1"])),
        ("bounces@müller.example.org", "a@example.org", b"x", ("smtputf8",),
         ("bounces@xn--mller-kva.example.org", "a@example.org", ["SIZE=1"])),
    ],
    ids=["ascii", "8bit", "8bit-no-size", "8bit-no-8bitmime", "utf8-recipient", "utf8-sender",
         "idna-recipient", "idna-sender"],
)
async def test_mail_parameters(fault_server, sender: str, recipient: str, data: bytes,
                               drop: tuple[str, ...], expected: tuple[str, str, list[str]]) -> None:
    smtp = await _session(await fault_server(), drop=drop)
    try:
        params = _mail_parameters(smtp, _msg(recipient, sender=sender, data=data))
    finally:
        smtp.close()
    assert not isinstance(params, DeliveryResult), params
    mail_from, rcpt_to, options = params
    assert (mail_from.decode(), rcpt_to.decode(), [o.decode() for o in options]) == expected


@pytest.mark.parametrize(
    ("sender", "recipient", "reason"),
    [
        (SENDER, "", "empty recipient address"),
        *((SENDER, f"a{c}b@example.org", "cannot be used in an SMTP envelope")
          for c in (" ", "\t", "\r", "\n", "<", ">", '"', "\x00", "\x1f", "\x7f")),
        ("bounce s@example.org", "a@example.org", "cannot be used in an SMTP envelope"),
        (SENDER, "jürgen@example.org", "does not offer SMTPUTF8"),
        ("jürgen@example.org", "a@example.org", "does not offer SMTPUTF8"),
        (SENDER, "jürgen", "does not offer SMTPUTF8"),  # no domain to encode
        (SENDER, "a@" + "ü" * 70 + ".example.org", "does not offer SMTPUTF8"),  # label > 63
    ],
    ids=["empty", *(f"unsafe-{i}" for i in range(10)), "unsafe-sender", "utf8-local",
         "utf8-sender-local", "no-domain", "long-label"],
)
async def test_envelopes_that_cannot_be_sent_are_permanent(
        fault_server, sender: str, recipient: str, reason: str) -> None:
    smtp = await _session(await fault_server(), drop=("smtputf8",))
    try:
        result = _mail_parameters(smtp, _msg(recipient, sender=sender))
    finally:
        smtp.close()
    assert isinstance(result, DeliveryResult)
    assert (result.key, result.outcome, result.code, result.suppress) == (
        7, Outcome.PERMANENT, None, False)
    assert reason in result.text
    if "SMTPUTF8" in reason:
        assert result.text == ("the address has non-ASCII characters and the relay does not "
                               "offer SMTPUTF8 (RFC 6531)")
    elif recipient == "":
        assert result.text == "empty recipient address"


async def test_unsafe_address_is_quoted_in_the_reason(fault_server) -> None:
    smtp = await _session(await fault_server())
    try:
        result = _mail_parameters(smtp, _msg("a b@example.org"))
    finally:
        smtp.close()
    assert isinstance(result, DeliveryResult)
    assert result.text == "address 'a b@example.org' cannot be used in an SMTP envelope"


async def test_size_is_left_out_when_the_relay_does_not_offer_it(fault_server) -> None:
    server = await fault_server(offer_size=False)
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT
    assert server.messages[0].mail_options == []


# -- replies to each command ------------------------------------------------------------------

async def test_a_forwarding_rcpt_reply_is_accepted(fault_server) -> None:
    server = await fault_server(Faults(rcpt={"fwd@example.org": (251, "2.1.5 will forward")}))
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("fwd@example.org", key=3))
    assert result == DeliveryResult(3, Outcome.SENT, 250, "2.0.0 OK", False)
    assert server.data_count == 1


@pytest.mark.parametrize(
    ("reply", "outcome", "suppress"),
    [((554, "5.5.1 no valid recipients"), Outcome.PERMANENT, False),
     ((451, "4.3.0 try again"), Outcome.TEMPORARY, False),
     ((550, "5.1.1 gone"), Outcome.PERMANENT, True)],
)
async def test_a_refused_data_command_is_the_result(
        fault_server, reply: tuple[int, str], outcome: Outcome, suppress: bool) -> None:
    server = await fault_server(Faults(data_command=reply))
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org", key=4))
        server.faults.data_command = None
        after = await pool.send(outgoing("b@example.org", key=5))
    assert (result.key, result.outcome, result.code, result.text, result.suppress) == (
        4, outcome, reply[0], reply[1], suppress)
    assert server.data_count == 0 or server.messages[0].rcpt_tos == ["b@example.org"]
    assert after.outcome is Outcome.SENT
    assert server.connections == 1  # RSET kept the session for the next message
    assert (pool.stats.sent, pool.stats.temporary, pool.stats.permanent) == (
        1, int(outcome is Outcome.TEMPORARY), int(outcome is Outcome.PERMANENT))


async def test_a_refused_sender_reply_is_the_result(fault_server) -> None:
    server = await fault_server(Faults(mail={SENDER: (451, "4.3.0 sender queue full")}))
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org", key=9))
    assert (result.key, result.outcome, result.code, result.text, result.suppress) == (
        9, Outcome.TEMPORARY, 451, "4.3.0 sender queue full", False)
    assert server.rcpt_seen == {}


async def test_a_temporary_reply_after_data_is_temporary(fault_server) -> None:
    server = await fault_server(Faults(data_reply={"a@example.org": (452, "4.2.2 over quota")}))
    async with pool_for(server) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code, result.text, result.suppress) == (
        Outcome.TEMPORARY, 452, "4.2.2 over quota", False)
    assert pool.stats.temporary == 1 and pool.stats.sent == 0


# -- session failures -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (aiosmtplib.SMTPResponseException(421, "4.3.2 closing"), 421, "4.3.2 closing"),
        (aiosmtplib.SMTPServerDisconnected("lost it"), None, "connection failed: lost it"),
        (TimeoutError("after 5 s"), None, "timed out: after 5 s"),
        (TimeoutError(), None, "timed out"),
        (ConnectionRefusedError(111, "Connection refused"), None,
         "connection failed: [Errno 111] Connection refused"),
        (OSError(), None, "connection failed: OSError"),
    ],
)
def test_failure_results(exc: BaseException, code: int | None, text: str) -> None:
    result = _failure(outgoing("a@example.org", key=11), exc)
    assert result == DeliveryResult(11, Outcome.TEMPORARY, code, text, False)


async def test_a_greeting_that_never_comes_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept and say nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SmtpPool(settings(timeout_s=0.3), host="127.0.0.1", port=port) as pool:
            started = time.perf_counter()
            result = await asyncio.wait_for(pool.send(outgoing("a@example.org")), 10)
            elapsed = time.perf_counter() - started
    finally:
        server.close()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, None)
    assert result.text.startswith("timed out")
    assert elapsed < 3
    assert (pool.stats.connect_failures, pool.stats.cooldowns, pool.stats.connections_opened) == (
        1, 1, 0)


async def test_the_helo_name_is_the_configured_one_or_the_hosts(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server, helo="mailer.imag.example.org") as pool:
        await pool.send(outgoing("a@example.org"))
    async with pool_for(server, helo=None) as pool:
        await pool.send(outgoing("a@example.org"))
    assert server.helo_names == ["mailer.imag.example.org", socket.getfqdn()]


async def test_stats_count_opened_lost_and_replaced_sessions(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        await pool.send(outgoing("a@example.org"))
        server.faults.drop_in_data_every = server.data_count + 1  # the next DATA is dropped
        lost = await pool.send(outgoing("b@example.org"))
        server.faults.drop_in_data_every = 0
        await pool.send(outgoing("c@example.org"))
        await pool.send(outgoing("d@example.org"))
    assert lost.outcome is Outcome.TEMPORARY and lost.code is None
    assert (pool.stats.connections_opened, pool.stats.reconnects, pool.stats.sent,
            pool.stats.temporary, pool.stats.permanent, pool.stats.connect_failures) == (
        2, 1, 3, 1, 0, 0)


async def test_an_idle_session_the_server_closed_is_replaced(fault_server) -> None:
    server = await fault_server()
    async with pool_for(server) as pool:
        await pool.send(outgoing("a@example.org"))
        server.hang_up()  # the idle session is closed by the server
        await asyncio.sleep(0.05)
        result = await pool.send(outgoing("b@example.org"))
    assert result.outcome is Outcome.SENT
    assert (pool.stats.connections_opened, pool.stats.reconnects) == (2, 1)


async def test_no_reconnect_is_counted_for_sessions_closed_on_purpose(fault_server) -> None:
    server = await fault_server()
    pool = pool_for(server)
    await pool.send(outgoing("a@example.org"))
    await pool.aclose()
    await pool.send(outgoing("b@example.org"))  # after close: a fresh session, not a reconnect
    assert (pool.stats.connections_opened, pool.stats.reconnects) == (2, 0)
    for _ in range(100):  # the send after aclose() did not pool its session
        if server.active_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert server.active_connections == 0


async def test_cooldown_doubles_up_to_its_ceiling_and_is_logged(fault_server, caplog) -> None:
    server = await fault_server(Faults(connect_421=8))
    fake = FakeTime()
    caplog.set_level("INFO", logger="mailer.transport")
    async with pool_for(server, clock=fake.clock, sleep=fake.sleep) as pool:
        for _ in range(9):
            await pool.send(outgoing("a@example.org"))
    assert fake.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert pool.stats.cooldowns == 8
    waits = [r.getMessage() for r in caplog.records if "new connections wait" in r.getMessage()]
    assert waits[0] == (f"relay {pool.address} unavailable (421 4.3.2 try later): "
                        "new connections wait 0.5 s")
    assert waits[-1].endswith("new connections wait 30.0 s") and len(waits) == 8


async def test_the_cooldown_reason_of_a_silent_failure_names_the_error(fault_server,
                                                                       caplog) -> None:
    server = await fault_server(Faults(refuse_connections=True))
    caplog.set_level("INFO", logger="mailer.transport")
    async with pool_for(server, clock=FakeTime().clock, sleep=FakeTime().sleep) as pool:
        await pool.send(outgoing("a@example.org"))
    [line] = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert re.fullmatch(rf"relay {pool.address} unavailable \(\S.*\): new connections wait 0\.5 s",
                        line), line


# -- logging in ---------------------------------------------------------------------------------

async def _wrong_password(fault_server, tls_contexts, refusal: str) -> tuple[FaultServer, SmtpPool]:
    """A relay refusing the password "falsch" with `refusal`, and a pool that offers it."""
    server_ctx, client_ctx = tls_contexts
    faults = Faults(auth=("imag", "geheim"), auth_refusal=refusal)
    server = await fault_server(faults, starttls=server_ctx)
    return server, pool_for(server, username="imag", password="falsch", tls_context=client_ctx)


async def test_a_temporary_login_refusal_is_retried_not_fatal(fault_server, tls_contexts) -> None:
    server, pool = await _wrong_password(fault_server, tls_contexts, "454 4.7.0 try again later")
    async with pool:
        result = await pool.send(outgoing("a@example.org"))
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, 454)
    assert server.messages == [] and server.auth_attempts >= 1


async def test_a_permanent_login_refusal_names_the_reply(fault_server, tls_contexts) -> None:
    _, pool = await _wrong_password(fault_server, tls_contexts, "535 5.7.8 credentials invalid")
    async with pool:
        with pytest.raises(AuthenticationFailure) as caught:
            await pool.send(outgoing("a@example.org"))
    assert str(caught.value) == (
        f"the relay {pool.address} refused the login for 'imag': 535 5.7.8 credentials invalid "
        "(check MAILER_SMTP_USERNAME / MAILER_SMTP_PASSWORD)")
    assert caught.value.code == 535


async def test_an_empty_password_is_sent_as_empty(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(Faults(auth=("imag", "")), starttls=server_ctx)
    async with pool_for(server, username="imag", tls_context=client_ctx) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT and server.auth_attempts == 1


async def test_a_relay_without_auth_cannot_log_in(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(tls=server_ctx, offer_auth=False)
    async with pool_for(server, tls="tls", username="imag", password="geheim",
                        tls_context=client_ctx) as pool:
        with pytest.raises(AuthenticationFailure) as caught:
            await pool.send(outgoing("a@example.org"))
    assert str(caught.value) == (
        f"the relay {pool.address} does not offer AUTH (RFC 4954), "
        "so the configured smtp.username cannot log in")
    assert server.auth_attempts == 0 and server.messages == []


async def test_implicit_tls_logs_in_without_starttls(fault_server, tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    server = await fault_server(Faults(auth=("imag", "geheim")), tls=server_ctx)
    async with pool_for(server, tls="tls", username="imag", password="geheim",
                        tls_context=client_ctx) as pool:
        result = await pool.send(outgoing("a@example.org"))
    assert result.outcome is Outcome.SENT and server.auth_attempts == 1


async def test_plain_text_refusal_names_the_relay(fault_server) -> None:
    server = await fault_server(Faults(auth=("imag", "geheim")))
    async with pool_for(server, username="imag", password="geheim") as pool:
        with pytest.raises(AuthenticationFailure) as caught:
            await pool.send(outgoing("a@example.org"))
    assert str(caught.value) == (
        f"refusing to send the SMTP password to {pool.address} over an unencrypted connection "
        "(the relay offers no STARTTLS): set smtp.tls to 'tls' for a relay on port 465, or use "
        "a relay that offers STARTTLS")


def test_the_address_names_host_and_port() -> None:
    pool = SmtpPool(settings(), host="relay.example.org", port=2525)
    assert pool.address == "relay.example.org:2525"
    configured = SmtpPool(settings(host="relay.example.org", port=587))
    assert configured.address == "relay.example.org:587"
    default = SmtpPool(settings(host="relay.example.org"))
    assert default.address == "relay.example.org:default port"


async def test_a_cancelled_wait_gives_its_token_back() -> None:
    waits: list[float] = []
    blocked = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        blocked.set()
        await asyncio.Event().wait()  # until cancelled

    bucket = TokenBucket(rate_per_s=1.0, burst=1.0, clock=lambda: 0.0, sleep=sleep)
    await bucket.acquire()  # the burst
    waiting = asyncio.create_task(bucket.acquire())
    await blocked.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    again = asyncio.create_task(bucket.acquire())
    await asyncio.sleep(0.05)
    again.cancel()
    assert waits == [1.0, 1.0]  # the cancelled reservation was given back, exactly


async def test_counters_add_up_over_many_failures(fault_server) -> None:
    server = await fault_server(Faults(rcpt={"busy@example.org": (451, "4.3.0 busy"),
                                             "gone@example.org": (550, "5.1.1 gone")}))
    async with pool_for(server) as pool:
        for address in ("busy@example.org", "gone@example.org") * 2:
            await pool.send(outgoing(address))
    assert (pool.stats.temporary, pool.stats.permanent, pool.stats.sent) == (2, 2, 0)
    refusing = await fault_server(Faults(refuse_connections=True))
    fake = FakeTime()
    async with pool_for(refusing, clock=fake.clock, sleep=fake.sleep) as pool:
        for _ in range(3):
            await pool.send(outgoing("a@example.org"))
    assert pool.stats.connect_failures == 3 and pool.stats.temporary == 3


async def test_only_replacements_of_lost_sessions_count_as_reconnects(fault_server) -> None:
    server = await fault_server(Faults(stall_s=0.05))
    async with pool_for(server, pool_size=2) as pool:
        await pool.send(outgoing("a@example.org"))
        server.hang_up()  # the idle session is lost...
        await asyncio.sleep(0.05)
        await pool.send(outgoing("b@example.org"))  # ...and replaced
        await asyncio.gather(*(pool.send(outgoing(f"c{i}@example.org")) for i in range(2)))
        assert (pool.stats.connections_opened, pool.stats.reconnects) == (3, 1)
        server.hang_up()  # both are lost, and both replaced
        await asyncio.sleep(0.05)
        await asyncio.gather(*(pool.send(outgoing(f"d{i}@example.org")) for i in range(2)))
        await asyncio.gather(*(pool.send(outgoing(f"e{i}@example.org")) for i in range(2)))
    assert (pool.stats.connections_opened, pool.stats.reconnects) == (5, 3)


async def test_each_window_of_failures_is_one_cooldown_step(fault_server) -> None:
    server = await fault_server(Faults(refuse_connections=True))
    fake = FakeTime()
    async with pool_for(server, pool_size=4, clock=fake.clock, sleep=fake.sleep) as pool:
        for _ in range(3):  # three rounds of four sessions failing together
            await asyncio.gather(*(pool.send(outgoing(f"r{i}@example.org")) for i in range(4)))
    assert pool.stats.cooldowns == 3
    assert sorted(set(fake.sleeps)) == [0.5, 1.0]  # each round waited out the last step


async def test_a_login_refused_for_good_with_a_5xx_stops_the_run(fault_server,
                                                                 tls_contexts) -> None:
    _, pool = await _wrong_password(fault_server, tls_contexts, "504 5.5.4 not supported")
    async with pool:
        with pytest.raises(AuthenticationFailure) as caught:
            await pool.send(outgoing("a@example.org"))
    assert caught.value.code == 504



def test_a_failure_is_logged_at_debug_with_key_and_recipient(caplog) -> None:
    caplog.set_level("DEBUG", logger="mailer.transport")
    _failure(outgoing("a@example.org", key=11), OSError())
    assert caplog.messages == ["key 11 to a@example.org: connection failed: OSError"]
    assert caplog.records[0].levelname == "DEBUG"  # addresses never at info level
