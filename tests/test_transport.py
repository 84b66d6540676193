"""mailer.transport against a real aiosmtpd server; faults are scripted on the server side."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from mailer.config import SmtpSettings
from mailer.errors import AuthenticationFailure
from mailer.transport import (
    DeliveryResult,
    Outcome,
    Outgoing,
    SmtpPool,
    Transport,
    classify,
)
from tests import smtpd
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


class FakeTime:
    """An injected clock: sleeping advances it instantly and records the wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds
        await asyncio.sleep(0)


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


async def test_421_mid_session_drops_the_session_and_cools_down(fault_server) -> None:
    server = await fault_server(Faults(rcpt={"x@example.org": (421, "4.3.2 shutting down")}))
    fake = FakeTime()
    async with pool_for(server, clock=fake.clock, sleep=fake.sleep) as pool:
        closing = await pool.send(outgoing("x@example.org"))
        after = await pool.send(outgoing("a@example.org"))
    assert (closing.outcome, closing.code) == (Outcome.TEMPORARY, 421)
    assert after.outcome is Outcome.SENT
    assert server.connections == 2 and fake.sleeps == [0.5]


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
        with pytest.raises(AuthenticationFailure, match="does not offer STARTTLS"):
            await pool.send(outgoing("a@example.org"))
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


async def test_rate_limit_with_injected_clock(fault_server) -> None:
    server = await fault_server()
    fake = FakeTime()
    async with pool_for(server, rate_per_second=20, clock=fake.clock, sleep=fake.sleep) as pool:
        for i in range(30):
            await pool.send(outgoing(f"r{i}@example.org"))
    assert fake.sleeps == [0.05] * 10


async def test_rate_per_hour_is_a_second_bucket(fault_server) -> None:
    server = await fault_server()
    fake = FakeTime()
    pool = pool_for(server, rate_per_hour=2, clock=fake.clock, sleep=fake.sleep)
    async with pool:
        for i in range(3):
            await pool.send(outgoing(f"r{i}@example.org"))
    assert fake.sleeps == [1800.0]  # the hour's quota of 2 is used; the third waits its turn


def test_embedded_host_needs_an_address() -> None:
    with pytest.raises(ValueError, match="CaptureServer"):
        SmtpPool(SmtpSettings.model_validate({}))
