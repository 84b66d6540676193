"""The dispatcher against a real SMTP server with injected faults, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import sys
from collections import Counter

import pytest

from mailer.checks import check_campaign
from mailer.dispatch import deliver_run
from mailer.errors import AuthenticationFailure, ListError
from mailer.sending import plan_run
from mailer.store import open_store
from mailer.store import queries as q
from mailer.transport import SmtpPool
from tests.conftest import CROWD_CAMPAIGN as CAMPAIGN
from tests.conftest import Project, both_databases
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)


def env_for(server: FaultServer, **extra: str) -> dict[str, str]:
    return {"MAILER_SMTP_HOST": server.host, "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_RETRY_BASE_S": "0.05", "MAILER_SMTP_TIMEOUT_S": "2",
            "MAILER_SMTP_RATE_PER_SECOND": "5000", **extra}


async def send_all(project: Project, server: FaultServer, **env: str):
    settings = project.settings(**env_for(server, **env))
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    plan = plan_run(checked, settings, store, again=False, retry_failed=False)
    assert plan.run is not None
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, plan.run, transport=pool)
    return settings, store, result


@both_databases
async def test_every_recipient_gets_exactly_one_mail(project, fault_server):  # noqa: F811
    addresses = project.crowd(60)
    server = await fault_server()
    _, store, result = await send_all(project, server)
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses)
    assert max(received.values()) == 1
    assert result.counts == {"pending": 0, "sending": 0, "sent": 60, "failed": 0}
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
    assert failure[0] == 550
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


async def test_gives_up_after_max_attempts(project, fault_server):  # noqa: F811
    project.crowd(3, special={1: "busy@example.org"})
    server = await fault_server(Faults(rcpt={"busy@example.org": (451, "4.3.0 busy")}))
    _, store, result = await send_all(project, server, MAILER_SMTP_MAX_ATTEMPTS="3")
    assert result.counts == {"pending": 0, "sending": 0, "sent": 2, "failed": 1}
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
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, plan.run, transport=pool)
    assert "person2@example.org" not in {m.rcpt_tos[0] for m in server.messages}
    assert result.counts["failed"] == 1 and result.counts["sent"] == 4


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
    assert msg["Content-Language"] == "de"
    assert msg.get_content_type() == "multipart/alternative"


# --- crash and restart ------------------------------------------------------------------


async def _mailer(project: Project, server: FaultServer, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, **project.env, **env_for(server), "MAILER_CONFIG": str(project.config)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer", "send", "crowd", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


@both_databases
async def test_sigkill_mid_run_then_restart_sends_everyone_once(project, fault_server):  # noqa: F811
    n = 3000
    addresses = project.crowd(n)
    server = await fault_server()
    proc = await _mailer(project, server)
    for _ in range(600):
        await asyncio.sleep(0.05)
        if len(server.messages) >= n // 3:
            break
    assert proc.returncode is None, "the first process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    before = len(server.messages)
    assert 0 < before < n

    proc = await _mailer(project, server)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses)  # nobody lost
    duplicates = sum(c - 1 for c in received.values())
    pool_size = project.settings().smtp.pool_size
    assert duplicates <= pool_size  # only the in-flight window
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        (run,) = q.runs_of(conn, "crowd")
        assert q.status_counts(conn, run.id)["sent"] == n
        assert run.in_flight_recovered >= duplicates  # counted and reported
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
    async with SmtpPool(settings.smtp) as fast, SmtpPool(slow_settings.smtp) as slow:
        results = await asyncio.gather(
            deliver_run(settings, store, checked.rendition, plan.run, transport=fast),
            deliver_run(slow_settings, store, checked.rendition, plan.run, transport=slow))
    received = Counter(m.rcpt_tos[0] for m in fast_server.messages + slow_server.messages)
    assert set(received) == set(addresses) and max(received.values()) == 1
    assert all(r.recovered == 0 for r in results)
    assert slow_server.messages  # both really worked on it


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


async def test_a_recipient_missing_a_merge_field_fails_alone(project, fault_server):  # noqa: F811
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
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    assert result.counts["sent"] == 1 and result.counts["failed"] == 1
    assert [m.rcpt_tos[0] for m in server.messages] == ["a@example.org"]
    with store.engine.connect() as conn:
        (row,) = q.failed_rows(conn, run.id)
    assert "could not be built" in row[3] and "stadtteil" in row[3]


async def test_a_relay_saying_421_on_connect_slows_the_run_down_not_fails_it(
        project, fault_server):  # noqa: F811
    project.crowd(20)
    server = await fault_server(Faults(connect_421=3))
    _, _, result = await send_all(project, server)
    assert result.counts["sent"] == 20 and result.counts["failed"] == 0
    assert server.connections > 3  # it came back after the refusals
    assert len({m.rcpt_tos[0] for m in server.messages}) == 20
