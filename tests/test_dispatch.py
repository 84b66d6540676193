"""The dispatcher against a real SMTP server with injected faults, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, update
from sqlalchemy.exc import DBAPIError

from mailer.checks import Checked, check_campaign
from mailer.config import Settings
from mailer.dispatch import (
    LEASE_S,
    GroupCommit,
    backoff_s,
    deliver_run,
    is_stale,
    worker_id,
)
from mailer.errors import AuthenticationFailure, LedgerError, ListError
from mailer.sending import plan_run
from mailer.store import Store, open_store
from mailer.store import queries as q
from mailer.store.subscriber_tables import consent_events
from mailer.store.tables import deliveries
from mailer.transport import SmtpPool
from tests.conftest import CROWD_CAMPAIGN as CAMPAIGN
from tests.conftest import Project, both_databases
from tests.helpers import finish, refuse_sent_rows, smtp_env, start_mailer
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)

env_for = smtp_env


def planned(project: Project, server: FaultServer, **env: str
            ) -> tuple[Settings, Store, Checked, q.Run]:
    """Settings for this relay, the store, the checked crowd campaign and its started run."""
    settings = project.settings(**env_for(server, **env))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    return settings, store, checked, plan.run


async def send_all(project: Project, server: FaultServer, **env: str):
    settings, store, checked, run = planned(project, server, **env)
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    return settings, store, result


class Notes:
    """A progress display that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []

    def update(self, *, done: int, total: int, note: str = "") -> None:
        self.calls.append((done, total, note))


@both_databases
async def test_every_recipient_gets_exactly_one_mail(project, fault_server):  # noqa: F811
    addresses = project.crowd(60)
    server = await fault_server()
    _, store, result = await send_all(project, server)
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses)
    assert max(received.values()) == 1
    assert result.counts == {"pending": 0, "sending": 0, "sent": 60, "failed": 0,
                             "bounced": 0}
    with store.engine.connect() as conn:
        run = q.get_run(conn, result.run.id)
        assert run.status == "finished" and run.total == 60


@both_databases
async def test_starting_the_same_run_twice_adds_nothing(project, fault_server):  # noqa: F811
    project.crowd(10)
    server = await fault_server()
    settings, store, first = await send_all(project, server)
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is None and "already went out" in plan.message
    with store.engine.connect() as conn:
        assert len(q.runs_of(conn, "crowd")) == 1
        assert sum(q.status_counts(conn, first.run.id).values()) == 10


@both_databases
async def test_temporary_failures_are_retried_until_sent(project, fault_server):  # noqa: F811
    project.crowd(40)
    server = await fault_server(Faults(temp_fail_share=0.3, drop_in_data_every=7))
    _, store, result = await send_all(project, server)
    assert result.counts["sent"] == 40
    assert len({m.rcpt_tos[0] for m in server.messages}) == 40
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("select max(attempts) from deliveries").scalar()
    assert rows >= 2  # some rows really went through a retry


@both_databases
async def test_no_such_user_fails_and_suppresses(project, fault_server):  # noqa: F811
    addresses = project.crowd(12, special={3: "gone@example.org"})
    server = await fault_server(Faults(rcpt={"gone@example.org": (550, "5.1.1 no such user")}))
    settings, store, result = await send_all(project, server)
    assert result.counts["failed"] == 1 and result.counts["sent"] == 11
    with store.engine.connect() as conn:
        assert q.suppressed_among(conn, [("gone@example.org", "crowd")]) == {"gone@example.org"}
        (failure,) = q.failures_by_code(conn, result.run.id)
        events = [dict(r._mapping) for r in conn.execute(consent_events.select())]
    assert failure[0] == 550
    with store.engine.connect() as conn:
        [held] = q.list_suppressions(conn)
    assert (held["email_key"], held["reason"], held["source"]) == (
        "gone@example.org", "hard_bounce", "smtp")
    assert held["detail"] == "550 5.1.1 no such user"
    # A consent event like every other reason an address stops getting mail (DESIGN).
    assert [(e["email_key"], e["event"], e["list_name"], e["source"]) for e in events] == [
        ("gone@example.org", "bounced", "*", "smtp")]
    assert "550 5.1.1 no such user" in events[0]["detail"]
    # A later run never includes the suppressed address.
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    plan = plan_run(checked, settings, store, again=True, retry_failed=False)
    assert plan.run is not None and plan.run.total == len(addresses) - 1


async def test_policy_rejection_fails_without_suppressing(project, fault_server):  # noqa: F811
    project.crowd(3, special={0: "policy@example.org"})
    server = await fault_server(Faults(rcpt={"policy@example.org": (550, "5.7.1 rejected")}))
    _, store, result = await send_all(project, server)
    assert result.counts["failed"] == 1
    with store.engine.connect() as conn:
        assert q.suppressed_among(conn, [("policy@example.org", "crowd")]) == set()


async def test_each_result_is_recorded_with_code_time_and_message_id(
        project, fault_server):  # noqa: F811
    project.crowd(4, special={3: "busy@example.org"})
    server = await fault_server(Faults(rcpt={"busy@example.org": (451, "4.3.0 busy")}))
    settings, store, checked, run = planned(project, server)
    before = q.utcnow()
    async with SmtpPool(settings.smtp) as pool:  # a limit of 4: one attempt each
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   limit=4)
    after = q.utcnow()
    assert result.sent_now == 3 and result.stopped
    assert result.counts == {"pending": 1, "sending": 0, "sent": 3, "failed": 0, "bounced": 0}
    with store.engine.connect() as conn:
        rows = {r.email_key: r for r in conn.execute(deliveries.select())}
    ids = {email.message_from_bytes(m.content)["Message-ID"]: m.rcpt_tos[0]
           for m in server.messages}
    for key, row in rows.items():
        if key == "busy@example.org":
            # Waiting for its retry, it keeps the reply it got and the Message-ID it will reuse.
            assert (row.status, row.smtp_code, row.smtp_text, row.sent_at) == (
                "pending", 451, "4.3.0 busy", None)
            assert row.message_id and row.message_id not in ids
            continue
        assert (row.status, row.smtp_code, row.smtp_text) == ("sent", 250, "2.0.0 OK")
        assert ids[row.message_id] == key
        assert before <= q.as_utc(row.sent_at) <= after


async def test_a_limit_counts_across_claim_batches(project, fault_server):  # noqa: F811
    project.crowd(10)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    async with SmtpPool(settings.smtp) as pool:  # batches of 3: 3 + 2 for a limit of 5
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   limit=5, batch_size=3)
    assert len(server.messages) == 5 and result.counts["pending"] == 5


async def test_a_limit_is_the_number_of_transactions(project, fault_server):  # noqa: F811
    project.crowd(10)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   limit=3)
    assert len(server.messages) == 3 and result.sent_now == 3
    assert result.counts["sent"] == 3 and result.counts["pending"] == 7 and result.stopped


async def test_long_replies_are_kept_to_500_characters(project, fault_server):  # noqa: F811
    project.crowd(2, special={0: "long@example.org", 1: "busy@example.org"})
    server = await fault_server(Faults(rcpt={"long@example.org": (550, "5.7.1 " + "x" * 600),
                                             "busy@example.org": (451, "4.3.0 " + "x" * 600)}))
    _, store, result = await send_all(project, server, MAILER_SMTP_MAX_ATTEMPTS="1")
    assert result.counts["failed"] == 2
    with store.engine.connect() as conn:
        rows = {r.email_key: r.smtp_text for r in conn.execute(deliveries.select())}
    assert len(rows["long@example.org"]) == 500 and rows["long@example.org"].startswith("5.7.1")
    assert len(rows["busy@example.org"]) == 500
    assert rows["busy@example.org"].startswith("gave up after 1 attempts: 4.3.0 xxx")


async def test_gives_up_after_max_attempts(project, fault_server):  # noqa: F811
    project.crowd(3, special={1: "busy@example.org"})
    server = await fault_server(Faults(rcpt={"busy@example.org": (451, "4.3.0 busy")}))
    _, store, result = await send_all(project, server, MAILER_SMTP_MAX_ATTEMPTS="3")
    assert result.counts == {"pending": 0, "sending": 0, "sent": 2, "failed": 1,
                             "bounced": 0}
    assert server.rcpt_seen["busy@example.org"] == 3
    with store.engine.connect() as conn:
        (row,) = q.failed_rows(conn, result.run.id)
    assert "gave up after 3 attempts" in row[3]


async def test_stalling_server_times_out_and_retries(project, fault_server):  # noqa: F811
    project.crowd(2)
    server = await fault_server(Faults(stall_s=1.0))
    settings = project.settings(**env_for(server, MAILER_SMTP_TIMEOUT_S="0.3"))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    stop = asyncio.Event()
    async with SmtpPool(settings.smtp) as pool:
        task = asyncio.create_task(deliver_run(settings, store, checked.rendition, plan.run,
                                               transport=pool, stop=stop))
        await asyncio.sleep(1.0)
        server.faults.stall_s = 0.0
        result = await asyncio.wait_for(task, 20)
    assert result.counts["sent"] == 2
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("select max(attempts) from deliveries").scalar() >= 2


async def test_auth_failure_stops_and_leaves_the_run_resumable(project, fault_server):  # noqa: F811
    project.crowd(5)
    server = await fault_server(Faults(auth=("imag", "right")))
    env = env_for(server, MAILER_SMTP_USERNAME="imag", MAILER_SMTP_PASSWORD="wrong")
    with pytest.raises(AuthenticationFailure):
        await send_all(project, server, **{k: v for k, v in env.items()
                                           if k.startswith("MAILER_SMTP_") and "HOST" not in k
                                           and "PORT" not in k})
    assert server.messages == []
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        (run,) = q.runs_of(conn, "crowd")
        assert q.status_counts(conn, run.id)["pending"] == 5
    server.faults.auth = None
    _, _, result = await send_all(project, server)
    assert result.counts["sent"] == 5


async def test_suppressed_after_snapshot_is_never_sent(project, fault_server):  # noqa: F811
    project.crowd(5)
    server = await fault_server()
    settings = project.settings(**env_for(server))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    with store.engine.begin() as conn:
        q.suppress(conn, "person2@example.org", reason="unsubscribed", list_name="crowd")
    notes = Notes()
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, plan.run, transport=pool,
                                   progress=notes)
    assert "person2@example.org" not in {m.rcpt_tos[0] for m in server.messages}
    assert result.counts["failed"] == 1 and result.counts["sent"] == 4
    assert notes.calls[-1] == (5, 5, "")  # the suppressed row counts as done, once
    with store.engine.connect() as conn:
        [row] = [r for r in conn.execute(deliveries.select()) if r.status == "failed"]
    assert (row.email_key, row.smtp_code, row.smtp_text) == (
        "person2@example.org", None, "not sent: the address is suppressed")


async def test_a_resumed_run_starts_its_progress_at_what_is_done(
        project, fault_server):  # noqa: F811
    project.crowd(5, special={0: "gone@example.org"})
    server = await fault_server(Faults(rcpt={"gone@example.org": (550, "5.1.1 no such user")}))
    settings, store, checked, run = planned(project, server)
    async with SmtpPool(settings.smtp) as pool:
        await deliver_run(settings, store, checked.rendition, run, transport=pool, limit=2)
        with store.engine.begin() as conn:
            [sent] = [r for r in conn.execute(deliveries.select()) if r.status == "sent"]
            assert q.mark_bounced(conn, sent.id, code=550, reason="5.1.1 returned later")
            assert q.status_counts(conn, run.id) == {
                "pending": 3, "sending": 0, "sent": 0, "failed": 1, "bounced": 1}
        notes = Notes()
        await deliver_run(settings, store, checked.rendition, run, transport=pool,
                          progress=notes)
    assert notes.calls[0] == (2, 5, "")  # one failed and one bounced are done
    assert notes.calls[-1] == (5, 5, "")


async def test_headers_of_a_delivered_mail(project, fault_server):  # noqa: F811
    project.crowd(1, special={0: "anna.lena+news@example.org"})
    server = await fault_server()
    await send_all(project, server)
    (received,) = server.messages
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "anna.lena+news@example.org"
    assert msg["Subject"] == "Hallo Person 0"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"] and msg["Date"] and msg["Message-ID"].endswith("@imag.example.org>")
    unsubscribe = str(msg["List-Unsubscribe"])
    assert "<http://127.0.0.1:8000/unsubscribe/" in unsubscribe and "<mailto:" in unsubscribe
    from mailer.tokens import Tokens

    token = unsubscribe.split("/unsubscribe/", 1)[1].split(">", 1)[0]
    held = Tokens(project.settings().secret()).read_manage(token)
    assert (held.email, held.list) == ("anna.lena+news@example.org", "crowd")
    assert msg["Content-Language"] == "de"
    assert msg.get_content_type() == "multipart/alternative"


# --- crash and restart ------------------------------------------------------------------


@both_databases
async def test_sigkill_mid_run_then_restart_sends_everyone_once(project, fault_server):  # noqa: F811
    n = 3000
    addresses = project.crowd(n)
    server = await fault_server()
    # One process: the crash of a whole `mailer send` (test_workers.py kills one of several).
    proc = await start_mailer(project, "send", "crowd", "--workers", "1", **env_for(server))
    store = open_store(project.settings().database_url)

    def sending() -> int:
        with store.engine.connect() as conn:
            runs = q.runs_of(conn, "crowd")
            return q.status_counts(conn, runs[0].id)["sending"] if runs else 0

    # Kill it mid-batch: a third sent and rows claimed whose results are not yet recorded
    # (between two claim batches there may be none for a moment).
    for _ in range(600):
        await asyncio.sleep(0.05)
        if len(server.messages) >= n // 3 and await asyncio.to_thread(sending) > 0:
            break
    assert proc.returncode is None, "the first process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    before = len(server.messages)
    assert 0 < before < n
    with store.engine.connect() as conn:
        (run,) = q.runs_of(conn, "crowd")
        caught = q.status_counts(conn, run.id)["sending"]  # claimed, result not recorded

    code, out, err = await finish(await start_mailer(project, "send", "crowd", **env_for(server)))
    assert code == 0, err
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses)  # nobody lost
    duplicates = sum(c - 1 for c in received.values())
    pool_size = project.settings().smtp.pool_size
    assert duplicates <= min(pool_size, caught)  # only the transactions in flight
    # A copy sent again carries the first one's Message-ID (the claim gave it to the row):
    # the receiving side can drop it. Every recipient's is their own.
    message_ids: dict[str, set[bytes]] = {}
    for m in server.messages:
        found = re.search(rb"^Message-ID: (<[^>\r\n]+>)", m.content, re.M | re.I)
        assert found is not None
        message_ids.setdefault(m.rcpt_tos[0], set()).add(found[1])
    assert all(len(ids) == 1 for ids in message_ids.values())
    assert len(set().union(*message_ids.values())) == n
    with store.engine.connect() as conn:
        run = q.get_run(conn, run.id)
        assert q.status_counts(conn, run.id)["sent"] == n
    assert run.in_flight_recovered == caught  # every row caught sending counted, once
    assert (f"{caught} messages were in flight" in out) == (caught > 0)
    assert run.status == "finished"



@both_databases
async def test_two_dispatchers_on_one_run_share_it_without_duplicates(project, fault_server):  # noqa: F811
    """A fire and a resume of the same run in one process must not take each other's rows."""
    addresses = project.crowd(500)  # more than one claim batch (200)
    fast_server = await fault_server()
    slow_server = await fault_server(Faults(stall_s=0.05))
    settings = project.settings(**env_for(fast_server))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    slow_settings = project.settings(**env_for(slow_server))
    other_store = open_store(settings.database_url)  # e.g. a scheduler fire beside a resume
    async with SmtpPool(settings.smtp) as fast, SmtpPool(slow_settings.smtp) as slow:
        results = await asyncio.gather(
            deliver_run(settings, store, checked.rendition, plan.run, transport=fast),
            deliver_run(slow_settings, other_store, checked.rendition, plan.run, transport=slow))
    received = Counter(m.rcpt_tos[0] for m in fast_server.messages + slow_server.messages)
    assert set(received) == set(addresses) and max(received.values()) == 1
    assert all(r.recovered == 0 for r in results)
    assert slow_server.messages  # both really worked on it


async def test_a_dispatcher_looks_again_soon_at_rows_another_one_holds(
        project, fault_server, monkeypatch):  # noqa: F811
    """The one that finds every row taken waits for the other's last transactions: it looks
    again within a fraction of a second, not after the long idle poll."""
    from mailer import dispatch

    monkeypatch.setattr(dispatch, "IDLE_POLL_S", 60.0)  # the old wait: every look a minute
    addresses = project.crowd(30)
    server = await fault_server(Faults(stall_s=0.02))
    settings = project.settings(**env_for(server))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    other_store = open_store(settings.database_url)
    loop = asyncio.get_running_loop()
    ended: list[float] = []

    async def deliver(store: Store, transport: SmtpPool) -> None:
        await deliver_run(settings, store, checked.rendition, plan.run, transport=transport)
        ended.append(loop.time())

    async with SmtpPool(settings.smtp) as one, SmtpPool(settings.smtp) as two:
        await asyncio.wait_for(asyncio.gather(deliver(store, one), deliver(other_store, two)),
                               30)
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(addresses)
    # Before: the waiting one slept its poll out (capped at 5 s) after the other had finished.
    assert ended[1] - ended[0] < 2.0


@both_databases
def test_a_bad_row_late_in_a_list_leaves_no_half_written_run(project: Project) -> None:
    rows = ["email,name"] + [f"p{i}@example.org,P{i}" for i in range(5000)] + ["broken@,X"]
    project.list_file("crowd.csv", "\n".join(rows) + "\n")
    project.campaign("crowd.yaml", CAMPAIGN)
    settings = project.settings()
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings,
                             with_audience=False)
    store = open_store(settings.database_url)
    with pytest.raises(ListError, match="line 5002"):
        plan_run(checked, settings, store, again=False, retry_failed=False)
    with store.engine.connect() as conn:
        assert q.runs_of(conn, "crowd") == []
        assert conn.exec_driver_sql("select count(*) from deliveries").scalar() == 0


async def test_a_recipient_missing_a_merge_field_fails_alone(
        project, fault_server, caplog):  # noqa: F811
    from mailer.audience import Recipient
    from mailer.dispatch import start_run

    project.list_file("crowd.csv", "email,name,stadtteil\na@example.org,A,Hörde\n")
    project.campaign("crowd.yaml", CAMPAIGN.replace("Liebe {{ recipient.name }}",
                                                    "Liebe Menschen in {{ recipient.stadtteil }}"))
    server = await fault_server()
    settings = project.settings(**env_for(server))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    people = [Recipient(email="a@example.org", fields={"stadtteil": "Hörde"}, list="crowd"),
              Recipient(email="b@example.org", fields={}, list="crowd")]  # e.g. a stale row
    run, _ = start_run(store, campaign_id="crowd", occurrence="once", trigger="send",
                       recipients=people)
    notes = Notes()
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   progress=notes)
    assert result.counts["sent"] == 1 and result.counts["failed"] == 1
    assert [m.rcpt_tos[0] for m in server.messages] == ["a@example.org"]
    assert notes.calls[-1] == (2, 2, "")  # the failed row is done
    with store.engine.connect() as conn:
        (row,) = q.failed_rows(conn, run.id)
    assert "could not be built" in row[3] and "stadtteil" in row[3]
    [logged] = [r.getMessage() for r in caplog.records if "could not be built" in r.getMessage()]
    assert logged.startswith(f"run row {row[0]}: the message could not be built: ")
    assert "stadtteil" in logged and "b@example.org" not in logged


async def test_each_mail_goes_in_its_recipients_language(project, fault_server):  # noqa: F811
    project.list_file("crowd.csv", "email,name,language\na@example.org,A,de\nb@example.org,B,tr\n")
    project.campaign("crowd.yaml", CAMPAIGN + """\
  tr:
    subject: "Merhaba {{ recipient.name }}"
    blocks:
      - text: "FORUM INTEGRATION sizi davet ediyor."
""")
    server = await fault_server()
    await send_all(project, server)
    subjects = {m.rcpt_tos[0]: email.message_from_bytes(m.content, policy=email.policy.default)
                for m in server.messages}
    assert subjects["a@example.org"]["Subject"] == "Hallo A"
    assert subjects["b@example.org"]["Subject"] == "Merhaba B"
    assert subjects["b@example.org"]["Content-Language"] == "tr"


async def test_without_a_transport_the_configured_relay_is_used(project, fault_server):  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    result = await deliver_run(settings, store, checked.rendition, run)
    assert result.counts["sent"] == 3 and len(server.messages) == 3


async def test_a_run_stopped_before_it_starts_sends_nothing(project, fault_server):  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    stop = asyncio.Event()
    stop.set()
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   stop=stop)
    assert server.messages == [] and result.stopped and result.counts["pending"] == 3


async def test_with_a_bounce_address_each_delivery_has_its_own_return_path(
        project, fault_server):  # noqa: F811
    from mailer.tokens import Tokens

    project.crowd(3)
    server = await fault_server()
    settings, store, checked, run = planned(
        project, server, MAILER_BOUNCES_ADDRESS="bounces@imag.example.org")
    async with SmtpPool(settings.smtp) as pool:
        await deliver_run(settings, store, checked.rendition, run, transport=pool)
    tokens = Tokens(settings.secret())
    with store.engine.connect() as conn:
        ids = {r.email_key: r.id for r in conn.execute(deliveries.select())}
    for message in server.messages:
        local, _, domain = message.mail_from.partition("@")
        base, _, token = local.partition("+")
        assert (base, domain) == ("bounces", "imag.example.org")
        assert tokens.read_verp(token) == (run.id, ids[message.rcpt_tos[0]])


async def test_a_relay_saying_421_on_connect_slows_the_run_down_not_fails_it(
        project, fault_server):  # noqa: F811
    project.crowd(20)
    server = await fault_server(Faults(connect_421=3))
    _, _, result = await send_all(project, server)
    assert result.counts["sent"] == 20 and result.counts["failed"] == 0
    assert server.connections > 3  # it came back after the refusals
    assert len({m.rcpt_tos[0] for m in server.messages}) == 20


# --- the ledger: commit before the next transaction, failed writes, stale claims ------------


class LedgerLock:
    """Another connection holding the ledger's write lock, as a long transaction would: SQLite's
    single writer lock (BEGIN IMMEDIATE), an EXCLUSIVE lock on deliveries in PostgreSQL. Writes
    to the ledger wait for it; reads go on."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._conn: Connection | None = None

    def _lock(self) -> None:
        conn = self.store.engine.connect()
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("LOCK TABLE deliveries IN EXCLUSIVE MODE")
        self._conn = conn

    def _unlock(self) -> None:
        assert self._conn is not None
        self._conn.rollback()
        self._conn.close()

    async def acquire(self) -> None:
        await asyncio.to_thread(self._lock)

    async def release(self) -> None:
        await asyncio.to_thread(self._unlock)


@both_databases
async def test_no_transaction_starts_before_the_last_result_is_committed(
        project, fault_server):  # noqa: F811
    """DESIGN's crash bound: a connection starts its next transaction only after the result of
    the last one is committed. With the ledger locked, no more than pool_size messages go out."""
    project.crowd(12)
    server = await fault_server()
    settings, store, checked, run = planned(project, server, MAILER_SMTP_POOL_SIZE="2")
    lock = LedgerLock(store)
    locked = asyncio.Event()
    started = asyncio.Event()
    held_at: list[int] = []

    async def lock_at_first_data(_: str) -> None:
        if not started.is_set():
            started.set()
            await lock.acquire()  # before the 250: its result cannot be committed now
            held_at.append(server.data_count)  # DATAs seen when the lock really held
            locked.set()

    server.faults.on_data = lock_at_first_data
    async with SmtpPool(settings.smtp) as pool:
        task = asyncio.create_task(
            deliver_run(settings, store, checked.rendition, run, transport=pool))
        await asyncio.wait_for(locked.wait(), 20)
        await asyncio.sleep(1.0)
        while_locked = server.data_count - held_at[0]
        await lock.release()
        result = await asyncio.wait_for(task, 30)
    # Once nothing can commit, each of the other pool_size - 1 connections finishes at most
    # the transaction it is in; none starts another (without the wait: all 12 go out).
    assert while_locked <= 1
    assert result.counts["sent"] == 12 and len(server.messages) == 12


@both_databases
async def test_on_sqlite_results_are_written_on_the_loops_own_thread(
        project, fault_server, monkeypatch):  # noqa: F811
    """A SQLite write of a few rows costs less than a hop to a thread and back; PostgreSQL's
    round trips stay off the loop."""
    import threading

    project.crowd(20)
    server = await fault_server()
    settings, store, checked, run = planned(project, server, MAILER_SMTP_POOL_SIZE="4")
    threads: list[bool] = []
    record = q.record

    def watched(conn: Connection, outcomes: Any, **kw: Any) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        record(conn, outcomes, **kw)

    monkeypatch.setattr(q, "record", watched)
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    assert result.counts["sent"] == 20 and threads
    assert set(threads) == {not store.is_postgres}


async def test_on_sqlite_the_wal_is_checkpointed_beside_the_loop_not_by_its_writes(
        project, fault_server, monkeypatch, tmp_path):  # noqa: F811
    """A checkpoint copies the WAL into the database file and syncs both (5-40 ms): done by a
    commit on the loop's connection it would hold up every SMTP session; a thread does it."""
    import shutil
    import sqlite3

    from mailer import dispatch
    from mailer.store.db import checkpoint, nowait_engine, sqlite_file

    monkeypatch.setattr(dispatch, "CHECKPOINT_EVERY", 4)
    ran: list[int] = []  # the real checkpoints, counted

    def counted(engine: Any) -> None:
        ran.append(1)
        checkpoint(engine)

    monkeypatch.setattr(dispatch, "checkpoint", counted)
    project.crowd(120)
    server = await fault_server()
    # One session: one result a commit, ~120 commits - far below the 1,000 pages at which
    # SQLite's own automatic checkpoint would copy anything.
    settings, store, checked, run = planned(project, server, MAILER_SMTP_POOL_SIZE="1")
    loop_engine = nowait_engine(store.engine)
    assert loop_engine is not None
    with loop_engine.connect() as conn, store.engine.connect() as other:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        assert other.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    loop_engine.dispose()
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    assert result.counts["sent"] == 120
    # At most one for every 4 of the ~120 commits (one result each: one session)
    assert 3 <= len(ran) <= 120 // 4
    # The database file alone (its WAL left behind) already holds most results: checkpoints
    # ran during the run. Without them it would hold none.
    path = sqlite_file(settings.database_url)
    assert path is not None
    shutil.copyfile(path, tmp_path / "main-file-only.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "main-file-only.db")) as copy:
        sent = copy.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'").fetchone()[0]
    assert 100 <= sent <= 120


async def test_a_checkpoint_that_fails_is_said_and_the_run_goes_on(
        project, fault_server, monkeypatch, caplog):  # noqa: F811
    from sqlalchemy.exc import OperationalError

    from mailer import dispatch

    def failing(engine: Any) -> None:
        raise OperationalError("PRAGMA wal_checkpoint(PASSIVE)", {}, Exception("disk I/O error"))

    monkeypatch.setattr(dispatch, "CHECKPOINT_EVERY", 4)
    monkeypatch.setattr(dispatch, "checkpoint", failing)
    project.crowd(40)
    server = await fault_server()
    settings, store, checked, run = planned(project, server, MAILER_SMTP_POOL_SIZE="1")
    with caplog.at_level("WARNING", logger="mailer.dispatch"):
        async with SmtpPool(settings.smtp) as pool:
            result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    assert result.counts["sent"] == 40 and len(server.messages) == 40
    said = [r.getMessage() for r in caplog.records if "checkpointed" in r.getMessage()]
    assert said and said[0].startswith("the ledger's WAL could not be checkpointed: ")
    assert "disk I/O error" in said[0]


@both_databases
async def test_a_failed_ledger_write_stops_the_run_and_a_restart_recovers(
        project, fault_server):  # noqa: F811
    addresses = project.crowd(12)
    server = await fault_server()
    settings, store, checked, run = planned(project, server, MAILER_SMTP_POOL_SIZE="2")
    refuse_sent_rows(store, on=True)
    async with SmtpPool(settings.smtp) as pool:
        with pytest.raises(LedgerError, match="ledger write refused") as raised:
            await asyncio.wait_for(
                deliver_run(settings, store, checked.rendition, run, transport=pool), 20)
        await asyncio.sleep(0.5)  # nothing keeps sending in the background either
    assert isinstance(raised.value.__cause__, DBAPIError)
    assert "@" not in str(raised.value)  # no address from the failed statement
    assert "[SQL:" not in str(raised.value)  # the database's reason, not the statement
    assert str(raised.value).startswith("the ledger could not record a delivery (")
    assert str(raised.value).endswith(
        "); sending stopped, and starting the run again resumes it")
    delivered = len(server.messages)
    assert 1 <= delivered <= 2  # no transaction started after the write failed
    with store.engine.connect() as conn:
        counts = q.status_counts(conn, run.id)
    # Delivered but not recorded: still `sending`; never started: back to `pending`.
    assert counts == {"pending": 12 - delivered, "sending": delivered, "sent": 0, "failed": 0,
                      "bounced": 0}
    with store.engine.connect() as conn:
        attempts = {r.id: r.attempts for r in conn.execute(deliveries.select())}
    assert sorted(attempts.values()) == [0] * (12 - delivered) + [1] * delivered

    refuse_sent_rows(store, on=False)
    async with SmtpPool(settings.smtp) as pool:  # the rows of the ended dispatcher are taken over
        result = await asyncio.wait_for(
            deliver_run(settings, store, checked.rendition, run, transport=pool), 20)
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses) and result.counts["sent"] == 12
    duplicates = sum(c - 1 for c in received.values())
    assert duplicates == delivered == result.recovered  # the in-flight window, counted
    with store.engine.connect() as conn:
        assert q.get_run(conn, run.id).in_flight_recovered == delivered


async def test_a_fresh_claim_of_another_machine_is_left_alone(project, fault_server):  # noqa: F811
    project.crowd(2)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    with store.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.email_key == "person1@example.org")
                     .values(status="sending", claimed_by="mailer-2.example.org:4242:aaaaaa",
                             claimed_at=q.utcnow(), attempts=1))
    stop = asyncio.Event()
    async with SmtpPool(settings.smtp) as pool:
        task = asyncio.create_task(deliver_run(settings, store, checked.rendition, run,
                                               transport=pool, stop=stop))
        await asyncio.sleep(2.5)  # two polls for the rows others hold
        stop.set()
        result = await asyncio.wait_for(task, 10)
    assert [m.rcpt_tos[0] for m in server.messages] == ["person0@example.org"]
    assert result.stopped and result.counts["sending"] == 1 and result.recovered == 0


def test_a_run_keeps_when_it_was_due_and_how_late_it_started(project: Project) -> None:
    from datetime import UTC, datetime

    from mailer.audience import Recipient
    from mailer.dispatch import start_run

    store = open_store(project.settings().database_url)
    due = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)
    run, _ = start_run(store, campaign_id="c", occurrence="2026-11-29T09:30:00+00:00",
                       trigger="schedule", recipients=[
                           Recipient(email="a@example.org", language="tr", list="crowd")],
                       scheduled_at=due, late_s=12.5)
    assert (q.as_utc(run.scheduled_at), run.late_s, run.trigger) == (due, 12.5, "schedule")
    with store.engine.connect() as conn:
        [row] = conn.execute(deliveries.select()).all()
    assert (row.email, row.language, row.list_name) == ("a@example.org", "tr", "crowd")


def test_worker_ids_name_host_and_process() -> None:
    import re

    ids = {worker_id() for _ in range(20)}
    assert len(ids) == 20
    pattern = rf"{re.escape(socket.gethostname())}:{os.getpid()}:[0-9a-f]{{6}}"
    assert all(re.fullmatch(pattern, i) for i in ids), ids


def _gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_which_claims_are_stale() -> None:
    host = socket.gethostname()
    now = q.utcnow()
    fresh, old = now - timedelta(seconds=5), now - timedelta(seconds=LEASE_S + 100)
    me = worker_id()
    sibling = f"{host}:{os.getpid()}:abcdef"  # another dispatcher of this process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = f"{host}:{alive.pid}:abcdef"
        ended = f"{host}:{_gone_pid()}:abcdef"
        elsewhere = "mailer-2.example.org:4242:abcdef"

        def stale(by: str | None, at: Any, live: tuple[str, ...] = ()) -> bool:
            return is_stale(by, at, now, me=me, live=live)

        assert stale(None, fresh) and stale("", fresh)
        assert not stale(me, old)  # our own claim, however old
        assert not stale(sibling, old, live=(sibling,))  # a running dispatcher of ours
        assert stale(sibling, fresh)  # a dispatcher of ours that has finished
        assert not stale(running, old)  # a live, slow worker here keeps its claims
        assert not stale(running, None)
        with pytest.raises(subprocess.TimeoutExpired):  # asking did not signal it
            alive.wait(timeout=0.2)
        assert stale(ended, fresh)  # its process is gone: take over at once
        # Another machine's worker cannot be asked: its lease decides.
        assert not stale(elsewhere, now - timedelta(seconds=LEASE_S - 1))
        assert not stale(elsewhere, now - timedelta(seconds=LEASE_S))  # a lease lasts all of it
        assert stale(elsewhere, now - timedelta(seconds=LEASE_S + 1))
        assert stale(elsewhere, None)
        assert not stale(f"{host}:not-a-pid:abcdef", fresh)
        assert stale(f"{host}:not-a-pid:abcdef", old)
    finally:
        alive.kill()
        alive.wait()
    assert stale(running, old)  # now it is gone


def test_a_claim_of_another_users_live_process_is_not_stale() -> None:
    """os.kill(pid, 0) raises PermissionError for a process of another user: it exists."""
    claim = f"{socket.gethostname()}:1:abcdef"  # pid 1 belongs to root
    old = q.utcnow() - timedelta(seconds=LEASE_S + 100)
    # Asked here too, so that mutation testing sees this test reach is_stale (the child's
    # calls are not traced); as root the signal is allowed and the answer is the same.
    assert not is_stale(claim, old, q.utcnow(), me=worker_id(), live=())
    if os.getuid() != 0:
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: ask as an unprivileged user
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                os.kill(1, 0)
                kind = b"no permission error"
            except PermissionError:
                kind = b"permission error"
            answer = is_stale(claim, old, q.utcnow(), me=worker_id(), live=())
            os.write(write, kind + b" " + str(answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    assert said == b"permission error False"


@both_databases
async def test_live_workers_keep_their_claims_and_gone_ones_lose_them(
        project, fault_server, caplog):  # noqa: F811
    """Rows left `sending`: taken over at once from an ended process or from another machine's
    expired lease; never from a live worker here, however old its claim, until it ends."""
    project.crowd(4)
    server = await fault_server()
    settings, store, checked, run = planned(project, server)
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    now = q.utcnow()
    claims = {
        "person0@example.org": (f"{host}:{alive.pid}:aaaaaa", now - timedelta(seconds=900)),
        "person1@example.org": (f"{host}:{_gone_pid()}:bbbbbb", now),
        "person2@example.org": ("mailer-2.example.org:4242:cccccc",
                                now - timedelta(seconds=LEASE_S + 1)),
    }
    with store.engine.begin() as conn:
        for key, (by, at) in claims.items():
            conn.execute(update(deliveries).where(deliveries.c.email_key == key).values(
                status="sending", claimed_by=by, claimed_at=at, attempts=1))
    try:
        async with SmtpPool(settings.smtp) as pool:
            task = asyncio.create_task(
                deliver_run(settings, store, checked.rendition, run, transport=pool))
            for _ in range(200):
                await asyncio.sleep(0.05)
                if len(server.messages) >= 3:
                    break
            await asyncio.sleep(2.5)  # more than one poll for rows held by others
            early = sorted(m.rcpt_tos[0] for m in server.messages)
            assert not task.done()
            alive.kill()
            alive.wait()
            result = await asyncio.wait_for(task, 20)
    finally:
        alive.kill()
        alive.wait()
    assert early == ["person1@example.org", "person2@example.org", "person3@example.org"]
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        f"person{i}@example.org" for i in range(4)]
    assert result.counts["sent"] == 4 and result.recovered == 2
    assert (f"run {run.id}: 2 rows were in flight when the last process stopped; they are "
            f"retried (at most {settings.smtp.pool_size} can have been delivered twice)"
            ) in caplog.messages
    with store.engine.connect() as conn:
        assert q.get_run(conn, run.id).in_flight_recovered == 3


# --- retries: backoff, Message-ID, attempts -------------------------------------------------


def test_backoff_doubles_per_attempt_with_jitter_up_to_six_hours() -> None:
    for attempts in range(1, 10):  # 30 s × 2^8 = 2 h 8 min, below the cap
        expected = 30.0 * 2 ** (attempts - 1)
        waits = [backoff_s(attempts, 30.0) for _ in range(200)]
        assert all(0.8 * expected <= w <= 1.2 * expected for w in waits), attempts
        assert max(waits) - min(waits) > 0.2 * expected  # jittered, not in step
    assert 0.8 * 6 * 3600 <= backoff_s(40, 30.0) <= 1.2 * 6 * 3600
    assert 0.8 * 6 * 3600 <= backoff_s(10_000, 30.0) <= 1.2 * 6 * 3600


async def test_retries_wait_exponentially_longer(project, fault_server):  # noqa: F811
    project.crowd(2, special={0: "busy@example.org"})
    server = await fault_server(Faults(rcpt={"busy@example.org": (451, "4.3.0 busy")}))
    _, store, result = await send_all(project, server, MAILER_SMTP_MAX_ATTEMPTS="5",
                                      MAILER_SMTP_RETRY_BASE_S="0.15")
    times = server.rcpt_times["busy@example.org"]
    assert len(times) == 5 and result.counts["failed"] == 1
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for i, gap in enumerate(gaps):
        expected = 0.15 * 2 ** i
        assert 0.8 * expected <= gap <= 1.2 * expected + 0.5, (i, gaps)


async def test_waiting_for_a_retry_says_until_when_in_local_time(project, fault_server):  # noqa: F811
    project.crowd(2, special={0: "busy@example.org"})
    server = await fault_server(Faults(rcpt_first_attempt={"busy@example.org": (451, "4.3.0")}))
    settings, store, checked, run = planned(project, server, MAILER_SMTP_RETRY_BASE_S="0.4")
    notes = Notes()
    before = q.utcnow()
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool,
                                   progress=notes)
    after = q.utcnow()
    assert result.counts["sent"] == 2
    waits = [n for _, _, n in notes.calls if n]
    assert waits and all(n.startswith("waiting for 1 retries until ") for n in waits), waits
    until = waits[0].rsplit(" ", 1)[1]
    local = [t.astimezone(settings.tz) for t in (before, after)]
    assert local[0].strftime("%H:%M:%S") <= until <= local[1].strftime("%H:%M:%S") or (
        local[0].date() != local[1].date())  # (a run across midnight)
    assert str(settings.tz) == "Europe/Berlin" and local[0].utcoffset() != timedelta(0)
    assert notes.calls[0] == (0, 2, "") and notes.calls[-1][:2] == (2, 2)
    assert {total for _, total, _ in notes.calls} == {2}
    assert [d for d, _, _ in notes.calls] == sorted(d for d, _, _ in notes.calls)
    # The retry waited for its time (0.32-0.48 s), neither at once nor a whole poll longer.
    first, second = server.rcpt_times["busy@example.org"]
    assert 0.3 <= second - first <= 0.9


async def test_a_failed_group_write_fails_its_waiters_and_the_next_write_goes_on() -> None:
    written: list[list[int]] = []
    first_write = asyncio.Event()
    release = asyncio.Event()

    async def write(items: list[int]) -> None:
        if not written and not first_write.is_set():
            first_write.set()
            await release.wait()
            raise RuntimeError("disk full")
        written.append(items)

    commit = GroupCommit(write)
    doomed = asyncio.create_task(commit.submit(1))
    await first_write.wait()
    later = [asyncio.create_task(commit.submit(i)) for i in (2, 3)]  # pile up during the write
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(RuntimeError, match="disk full"):
        await doomed
    await asyncio.wait_for(asyncio.gather(*later), 2)
    assert written == [[2, 3]]  # one write for what piled up, after the failed one


@both_databases
async def test_a_4xx_after_data_is_retried_with_the_same_message_id_never_sent(
        project, fault_server):  # noqa: F811
    project.crowd(3, special={1: "later@example.org"})
    server = await fault_server(Faults(data_reply={"later@example.org": (451, "4.3.0 later")}))
    _, store, result = await send_all(project, server, MAILER_SMTP_MAX_ATTEMPTS="3")
    assert result.counts == {"pending": 0, "sending": 0, "sent": 2, "failed": 1,
                             "bounced": 0}
    tries = [m for m in server.data_seen if m.rcpt_tos == ["later@example.org"]]
    assert len(tries) == 3  # the whole message went out three times, refused each time
    ids = {email.message_from_bytes(m.content)["Message-ID"] for m in tries}
    assert len(ids) == 1  # one Message-ID: a receiver can tell the retries are one mail
    with store.engine.connect() as conn:
        (row,) = [r for r in conn.execute(deliveries.select())
                  if r.email_key == "later@example.org"]
    assert (row.status, row.smtp_code, row.attempts) == ("failed", 451, 3)
    assert row.message_id == ids.pop() and row.sent_at is None
    assert "gave up after 3 attempts" in row.smtp_text


async def test_a_dropped_reply_is_retried_with_the_same_message_id(
        project, fault_server):  # noqa: F811
    """The message arrived, the reply did not: the retry is the same mail (RFC 5322 §3.6.4)."""
    project.crowd(3)
    server = await fault_server(Faults(drop_in_data_every=2))
    _, _, result = await send_all(project, server, MAILER_SMTP_POOL_SIZE="1")
    assert result.counts["sent"] == 3
    by_rcpt: dict[str, set[str]] = {}
    for m in server.data_seen:
        by_rcpt.setdefault(m.rcpt_tos[0], set()).add(
            email.message_from_bytes(m.content)["Message-ID"])
    assert len(server.data_seen) > 3  # some went twice
    assert all(len(ids) == 1 for ids in by_rcpt.values()), by_rcpt
    assert len(set().union(*by_rcpt.values())) == 3


async def test_rows_released_at_a_stop_keep_their_attempts(project, fault_server):  # noqa: F811
    """An AUTH refusal stops the run before any message: no row has used up an attempt."""
    project.crowd(6)
    server = await fault_server(Faults(auth=("imag", "right")))
    with pytest.raises(AuthenticationFailure):
        await send_all(project, server, MAILER_SMTP_USERNAME="imag",
                       MAILER_SMTP_PASSWORD="wrong", MAILER_SMTP_POOL_SIZE="3")
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        rows = list(conn.execute(deliveries.select()))
    assert [(r.status, r.attempts, r.claimed_by) for r in rows] == [("pending", 0, None)] * 6

