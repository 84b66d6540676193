"""What staff see at the end of a command: exit codes, the last line, times and run numbers.

`mailer send`: 0 when every row is sent, 3 when some failed, 4 when all failed (1 stays a user
error, 2 a usage error, 130 an interrupt), the same for `--to` test sends. Real processes, a real
SMTP server (tests/smtpd.py) with scripted faults, real SQLite.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta

import pytest

from mailer.scheduler import serve
from mailer.store import RunStatus
from tests import helpers
from tests.conftest import Project
from tests.helpers import run_mailer, smtp_env
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)
from tests.test_scheduler import BERLIN, at_text, campaign_text, fast, runner_for, runs_of

NO_SUCH_USER = (550, "5.1.1 no such user")
POLICY = (554, "5.7.1 policy")
MICROSECONDS = re.compile(r"\d\d:\d\d:\d\d\.\d")


async def mailer(project: Project, server: FaultServer, *args: str,
                 **env: str) -> tuple[int, str, str]:
    return await helpers.mailer(project, *args, **{**smtp_env(server), **env})


# --- mailer send: 0 / 3 / 4 ---------------------------------------------------------------------


async def test_send_exits_0_when_every_row_is_sent(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(5)
    server = await fault_server()
    code, out, err = await mailer(project, server, "send", "crowd")
    assert code == 0, err
    assert out.splitlines() == ["started run 1 of crowd: 5 recipients",
                                "run 1 of crowd: 5 sent, 0 failed, 0 left"]
    assert len(server.messages) == 5


async def test_send_exits_3_when_some_failed_and_says_where_to_look(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(6, special={1: "gone@example.org", 4: "policy@example.org"})
    server = await fault_server(Faults(rcpt={"gone@example.org": NO_SUCH_USER,
                                             "policy@example.org": POLICY}))
    code, out, err = await mailer(project, server, "send", "crowd")
    assert code == 3, err
    assert "Traceback" not in err
    assert out.splitlines()[-1] == (
        "2 of 6 messages failed: see who and why with: mailer report crowd --failed")
    assert len(server.messages) == 4


async def test_send_exits_4_when_all_failed(
        project: Project, fault_server) -> None:  # noqa: F811
    addresses = project.crowd(3)
    server = await fault_server(Faults(rcpt={a: POLICY for a in addresses}))
    code, out, err = await mailer(project, server, "send", "crowd")
    assert code == 4, err
    assert out.splitlines()[-1] == (
        "all 3 messages failed: see who and why with: mailer report crowd --failed")
    assert server.messages == []
    # Sending it again does nothing (a one-off goes out once) and is no new failure.
    code, out, _ = await mailer(project, server, "send", "crowd")
    assert code == 0 and "already went out" in out


async def test_test_sends_use_the_same_exit_codes(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(2)
    server = await fault_server(Faults(rcpt={"gone@example.org": NO_SUCH_USER,
                                             "weg@example.org": NO_SUCH_USER}))
    code, out, _ = await mailer(project, server, "send", "crowd", "--to", "staff@example.org")
    assert code == 0 and "test mail to staff@example.org: sent" in out
    code, out, _ = await mailer(project, server, "send", "crowd", "--to", "staff@example.org",
                                "--to", "gone@example.org")
    assert code == 3
    assert "test mail to gone@example.org: failed (550 5.1.1 no such user)" in out
    assert out.splitlines()[-1] == "1 of 2 test mails failed"
    code, out, _ = await mailer(project, server, "send", "crowd", "--to", "gone@example.org",
                                "--to", "weg@example.org")
    assert code == 4 and out.splitlines()[-1] == "all 2 test mails failed"


@pytest.mark.parametrize("workers", ["1", "2"])  # progress of one process, or of the ledger
async def test_retries_never_push_the_progress_past_the_total(
        project: Project, fault_server, workers: str) -> None:  # noqa: F811
    addresses = project.crowd(4)
    # Greylisted on the first try: each row is claimed twice before it is sent.
    server = await fault_server(Faults(rcpt_first_attempt={a: (451, "4.7.1 greylisted")
                                                           for a in addresses}))
    code, out, err = await mailer(project, server, "send", "crowd", "--workers", workers,
                                  MAILER_SMTP_RETRY_BASE_S="1.5")
    assert code == 0, err
    shown = [(int(done), int(total), int(waiting or 0)) for done, total, waiting in
             re.findall(r"crowd: (\d+)/(\d+).*?(?:waiting for (\d+) retries.*)?$", err, re.M)]
    # A row waiting for its retry is not done; done never exceeds the total.
    assert shown and all(done + waiting <= total == 4 for done, total, waiting in shown), shown
    assert any(waiting for _, _, waiting in shown) and shown[-1][:2] == (4, 4)
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(addresses)


# --- mailer report -------------------------------------------------------------------------------


async def test_report_failed_without_failures_says_so(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    assert (await mailer(project, server, "send", "crowd"))[0] == 0
    code, out, _ = await mailer(project, server, "report", "crowd", "--failed")
    assert code == 0
    assert "  no failed deliveries in run 1" in out.splitlines()
    code, out, _ = await mailer(project, server, "report", "crowd")
    assert "no failed deliveries" not in out  # only asked for with --failed


async def test_runs_are_numbered_per_campaign_and_times_are_local(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(2)
    project.campaign("other.yaml", "template: newsletter\naudience: {lists: [crowd]}\n"
                     "content: {de: {subject: Andere, blocks: [{heading: Hallo}]}}\n")
    server = await fault_server()
    assert (await mailer(project, server, "send", "other"))[0] == 0  # database id 1
    code, out, _ = await mailer(project, server, "send", "crowd")
    assert code == 0 and "started run 1 of crowd: 2 recipients" in out
    code, out, _ = await mailer(project, server, "send", "crowd")
    went = re.search(r"already went out on (\d{4}-\d\d-\d\d \d\d:\d\d) to 2 recipients "
                     r"\(run 1\)", out)
    assert code == 0 and went, out
    now = datetime.now(BERLIN).replace(second=0, microsecond=0, tzinfo=None)
    assert now - timedelta(minutes=2) <= datetime.fromisoformat(went[1]) <= now  # local time
    code, out, _ = await mailer(project, server, "send", "crowd", "--again")
    assert code == 0 and "started run 2 of crowd" in out and "run 2 of crowd: 2 sent" in out
    code, text, _ = await mailer(project, server, "report", "crowd")
    runs = [line for line in text.splitlines() if line.startswith("run ")]
    assert runs[0].startswith("run 1 (one-off, finished): 2 sent")
    assert runs[1].startswith("run 2 (sent anew (--again), finished): 2 sent")
    [first_sent] = [line for line in text.splitlines() if line.startswith("  first sent")][:1]
    local = datetime.now(BERLIN).strftime("%Y-%m-%d %H:")  # the configured zone, not UTC
    assert first_sent.startswith(f"  first sent {local}")
    code, out, _ = await mailer(project, server, "report", "crowd", "--json")
    data = json.loads(out)
    assert [(r["number"], r["run"]) for r in data["runs"]] == [(1, 2), (2, 3)]  # number, db id
    for output in (text, out):
        assert not MICROSECONDS.search(output), output


# --- a scheduled one-off sent by hand ------------------------------------------------------------


async def test_sending_a_scheduled_one_off_by_hand_replaces_its_fire(
        project: Project, fault_server) -> None:  # noqa: F811
    at = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
    project.campaign("fest.yaml", at_text(at))
    server = await fault_server()
    code, out, err = await mailer(project, server, "send", "fest")
    assert code == 0, err
    local = f"{at.astimezone(BERLIN):%Y-%m-%d %H:%M}"
    assert (f"this replaces the scheduled send at {local}: mailer run will not send it again"
            in out.splitlines())
    [run] = runs_of(project.settings(), "fest")
    sent = len(server.messages)
    assert sent == run.total > 0
    # The scheduler's fire at that time finds the occurrence settled and sends nothing.
    runner = runner_for(project, at + timedelta(seconds=1))
    await runner.fire("fest", [at])
    assert runs_of(project.settings(), "fest") == [run]
    assert not (runner.settings.outbox_dir / "new").exists() and len(server.messages) == sent
    shown = run_mailer(project, "schedule")
    [line] = [x for x in shown.stdout.splitlines() if x.startswith("fest:")]
    assert re.search(r"; no next fire: already sent on \d{4}-\d\d-\d\d \d\d:\d\d \(run 1, by "
                     rf"mailer send, {run.total} recipients\); last run 1 finished \(one-off, ",
                     line), line
    # A one-off without a schedule, or scheduled in the past, says nothing of the kind.
    project.campaign("gestern.yaml", at_text(datetime.now(UTC) - timedelta(days=1)))
    code, out, _ = await mailer(project, server, "send", "gestern")
    assert code == 0 and "replaces" not in out


# --- mailer schedule: why there is no next fire --------------------------------------------------


def test_schedule_says_why_there_is_no_next_fire(project: Project) -> None:
    passed = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    project.campaign("vorbei.yaml", at_text(passed))
    project.campaign("nie.yaml", campaign_text('cron: "0 9 30 2 *"'))  # 30 February
    project.campaign("ohne.yaml", campaign_text("").replace("schedule: {}\n", ""))
    project.campaign("kaputt.yaml", campaign_text('cron: "0 9 * * *"').replace(
        "template:", "templat:"))
    shown = run_mailer(project, "schedule")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines()}
    assert lines["vorbei"] == (
        "vorbei: at 2026-01-05 09:00:00; no next fire: its time 2026-01-05 09:00 has passed "
        "(mailer run sends it within misfire_grace_s=3600 s of it, else records it as missed); "
        "never run")
    assert lines["nie"] == ("nie: cron 0 9 30 2 *; no next fire: cron 0 9 30 2 * matches no "
                            "future time; never run")
    assert lines["ohne"] == "ohne: no schedule: it goes out only with: mailer send ohne; never run"
    [broken] = [line for line in shown.stderr.splitlines() if "kaputt.yaml" in line]
    assert broken.startswith("error: ") and broken.endswith(
        "(no next fire: the file is invalid)")
    rows = {row["file"]: row for row in json.loads(run_mailer(project, "schedule",
                                                              "--json").stdout)}
    assert rows["kaputt.yaml"]["why"].startswith("the file is invalid: ")
    assert rows["nie.yaml"]["why"] == "cron 0 9 30 2 * matches no future time"
    assert rows["vorbei.yaml"]["next_utc"] is None and "has passed" in rows["vorbei.yaml"]["why"]


# --- mailer run --once with an invalid file ------------------------------------------------------


def test_run_once_exits_1_on_an_invalid_file_after_firing_the_others(project: Project) -> None:
    project.campaign("faellig.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5)))
    project.campaign("tippfehler.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5))
                     .replace("template:", "templat:"))
    done = run_mailer(project, "run", "--once")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "tippfehler.yaml" in last
    assert last.endswith("(this file was skipped; the other campaigns ran)")
    [run] = runs_of(project.settings(), "faellig")
    assert run.status == RunStatus.FINISHED and run.total > 0
    # Fixed, the next start is clean.
    project.campaign("tippfehler.yaml", at_text(datetime.now(UTC) + timedelta(days=1)))
    assert run_mailer(project, "run", "--once").returncode == 0


async def test_run_once_without_invalid_files_exits_0(project: Project) -> None:
    project.campaign("faellig.yaml", at_text(datetime.now(UTC) - timedelta(minutes=5)))
    settings = fast(project.settings())
    assert await serve(settings, str(project.config), once=True) == 0
    assert [r.status for r in runs_of(settings, "faellig")] == [RunStatus.FINISHED]


# --- mailer serve on a busy port -----------------------------------------------------------------


def test_serve_on_a_busy_port_is_one_sentence_and_no_banner(project: Project) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = run_mailer(project, "serve", "--host", "127.0.0.1", "--port", str(port),
                          timeout=30)
    assert done.returncode == 1
    assert "serving on" not in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use: stop the other program or set "
        "web.port / --port")
