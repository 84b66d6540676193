"""`mailer send`, `report` and `suppressions` as staff use them: a real process, real SMTP."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from mailer.store import open_store
from mailer.store.tables import deliveries
from tests import helpers
from tests.conftest import REPO, Project
from tests.helpers import finish, refuse_sent_rows, smtp_env, start_mailer
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)


async def mailer(project: Project, server: FaultServer, *args: str,
                 **env: str) -> tuple[int, str, str]:
    """`mailer ARGS` against this test relay: (exit code, stdout, stderr)."""
    return await helpers.mailer(project, *args, **{**smtp_env(server), **env})


async def test_dry_run_sends_and_records_nothing(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(20)
    server = await fault_server()
    code, out, _ = await mailer(project, server, "send", "crowd", "--dry-run")
    assert code == 0 and "20 messages would be sent" in out
    assert server.messages == []
    code, out, _ = await mailer(project, server, "report", "crowd")
    assert "no runs yet" in out


async def test_test_send_goes_only_to_the_given_address(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(20)
    server = await fault_server()
    code, out, _ = await mailer(project, server, "send", "crowd", "--to", "staff@example.org")
    assert code == 0 and "sent" in out
    (received,) = server.messages
    assert received.rcpt_tos == ["staff@example.org"]
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert msg["Subject"].startswith("[TEST] ")
    code, out, _ = await mailer(project, server, "report", "crowd")
    assert "no runs yet" in out  # a test send is not a run
    code, _, err = await mailer(project, server, "send", "crowd", "--to", "not-an-address")
    assert code == 1 and "not a valid address" in err and "Traceback" not in err


async def test_a_test_send_in_each_language_of_the_campaign(project: Project,
                                                            fault_server) -> None:  # noqa: F811
    name = "wir-alle-sind-dortmund-2026-12.yaml"
    (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    server = await fault_server()
    seen = {}
    for lang in ("de", "tr", "ar"):
        code, out, err = await mailer(project, server, "send", name[:-5], "--to",
                                      "staff@example.org", "--lang", lang)
        assert code == 0, out + err
        msg = email.message_from_bytes(server.messages[-1].content, policy=email.policy.default)
        seen[lang] = (msg["Content-Language"], msg["Subject"])
    assert {lang: cl for lang, (cl, _) in seen.items()} == {"de": "de", "tr": "tr", "ar": "ar"}
    assert len({subject for _, subject in seen.values()}) == 3
    assert all(subject.startswith("[TEST] ") for _, subject in seen.values())
    code, _, err = await mailer(project, server, "send", name[:-5], "--to", "staff@example.org",
                                "--lang", "pl")
    assert code == 1 and "no 'pl' text (it has de, tr, ar)" in err
    code, _, err = await mailer(project, server, "send", name[:-5], "--lang", "tr")
    assert code == 1 and "use it with --to" in err
    assert len(server.messages) == 3


async def test_limit_then_resume_then_report(project: Project, fault_server) -> None:  # noqa: F811
    addresses = project.crowd(30)
    server = await fault_server(Faults(rcpt={"person7@example.org": (550, "5.1.1 no such user")}))
    code, out, _ = await mailer(project, server, "send", "crowd", "--limit", "10")
    assert code == 3 and len(server.messages) <= 10 and "continue with" in out  # 3: some failed
    assert out.splitlines()[-1] == (
        "1 of 10 messages failed: see who and why with: mailer report crowd --failed")
    code, out, _ = await mailer(project, server, "send", "crowd")
    assert code == 3 and "resuming run 1 of crowd (one-off)" in out
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
        a for a in addresses if a != "person7@example.org")
    code, out, _ = await mailer(project, server, "report", "crowd", "--json", "--failed")
    report = json.loads(out)
    assert report["totals"] == {"pending": 0, "sending": 0, "sent": 29, "failed": 1,
                                "bounced": 0}
    (run,) = report["runs"]
    assert run["failures"][0]["code"] == 550
    assert run["failed"][0]["email"] == "person7@example.org"
    code, out, _ = await mailer(project, server, "suppressions", "list")
    assert "person7@example.org" in out and "hard_bounce" in out
    code, out, _ = await mailer(project, server, "send", "crowd")
    assert code == 0 and "already went out" in out  # a one-off is only sent once


async def test_retry_failed_and_manual_suppressions(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(5)
    server = await fault_server(Faults(rcpt={"person1@example.org": (554, "5.7.1 policy"),
                                             "person2@example.org": (554, "5.7.1 policy")}))
    code, _, _ = await mailer(project, server, "send", "crowd")
    assert code == 3 and len(server.messages) == 3
    code, out, _ = await mailer(project, server, "suppressions", "add", "person2@example.org")
    assert code == 0 and "1 added" in out
    server.faults.rcpt.clear()
    code, out, _ = await mailer(project, server, "send", "crowd", "--retry-failed")
    # person2, suppressed meanwhile, stays failed: the run still has a failure (exit 3).
    assert code == 3 and "run 1 of crowd: 1 failed rows get another try" in out
    assert "person1@example.org" in [m.rcpt_tos[0] for m in server.messages]
    assert "person2@example.org" not in [m.rcpt_tos[0] for m in server.messages]
    code, out, _ = await mailer(project, server, "suppressions", "remove", "person2@example.org")
    assert code == 0 and "1 removed" in out


async def test_sigint_finishes_in_flight_and_leaves_the_run_resumable(project: Project,
                                                                       fault_server) -> None:  # noqa: F811
    addresses = project.crowd(400)
    server = await fault_server(Faults(stall_s=0.02))
    proc = await start_mailer(project, "send", "crowd", **smtp_env(server))
    for _ in range(400):
        await asyncio.sleep(0.05)
        if len(server.messages) >= 40:
            break
    proc.send_signal(signal.SIGINT)
    code, out, _ = await finish(proc, 60)
    assert code == 130 and "continue with" in out
    assert 0 < len(server.messages) < len(addresses)
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.status, deliveries.c.attempts)).all()
    # Nothing left `sending`; what was claimed but never sent is pending, no attempt used up.
    assert {status for status, _ in rows} == {"sent", "pending"}
    assert {attempts for status, attempts in rows if status == "pending"} == {0}
    code, out, _ = await mailer(project, server, "send", "crowd")
    assert code == 0 and "in flight" not in out  # a graceful stop leaves nothing in doubt
    received = [m.rcpt_tos[0] for m in server.messages]
    assert sorted(received) == sorted(addresses)  # everyone once, nobody twice


async def test_a_failing_ledger_stops_send_with_one_sentence_and_send_resumes(
        project: Project, fault_server) -> None:  # noqa: F811
    addresses = project.crowd(30)
    server = await fault_server()
    store = open_store(project.settings().database_url)
    refuse_sent_rows(store, on=True)
    code, out, err = await mailer(project, server, "send", "crowd")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "error: the ledger could not record a delivery (ledger write refused); sending stopped")
    delivered = len(server.messages)
    pool_size = project.settings().smtp.pool_size
    assert 1 <= delivered <= pool_size  # nothing sent after the failed write
    refuse_sent_rows(store, on=False)
    code, out, err = await mailer(project, server, "send", "crowd")
    assert code == 0, err
    assert "resuming run" in out and f"{delivered} messages were in flight" in out
    received = [m.rcpt_tos[0] for m in server.messages]
    assert sorted(set(received)) == sorted(addresses)
    assert len(received) - len(addresses) == delivered  # the unrecorded ones, sent again


# `mailer` as installed (mailer/entry.py), with a look at the cyclic collector as it exits.
COLLECTOR_AT_EXIT = """\
import atexit, gc, sys
atexit.register(lambda: print("collector", gc.isenabled(), gc.get_freeze_count() > 0))
sys.argv = ["mailer", *sys.argv[1:]]
from mailer.entry import run
run()
"""


@pytest.mark.parametrize(("args", "expected"), [
    (["--version"], "collector False False"),  # start-up runs without it ...
    (["validate"], "collector True False"),  # ... and every command turns it back on,
    (["send", "crowd", "--dry-run"], "collector True True"),  # send once start-up is frozen
])
def test_start_up_runs_without_the_cyclic_collector_and_the_command_turns_it_back_on(
        project: Project, args: list[str], expected: str) -> None:
    project.crowd(5)
    result = subprocess.run([sys.executable, "-c", COLLECTOR_AT_EXIT, *args], text=True,
                            capture_output=True, env=helpers.mailer_env(project),
                            cwd=project.root, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == expected
