"""`mailer report`: text, --failed and --json after a real run with every kind of failure."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from datetime import datetime, timedelta

from click.testing import CliRunner
from sqlalchemy import update

from mailer.checks import check_campaign
from mailer.cli import main
from mailer.dispatch import deliver_run, start_run
from mailer.sending import audience
from mailer.store import open_store
from mailer.store import queries as q
from mailer.store.tables import deliveries
from mailer.transport import SmtpPool
from tests.conftest import Project
from tests.helpers import smtp_env
from tests.smtpd import Faults, fault_server  # noqa: F401  (fixture)

SPECIAL = {1: "gone@example.org", 2: "policy@example.org", 3: "busy@example.org",
           4: "unsub@example.org", 5: "crashed@example.org"}


def report(project: Project, *args: str) -> str:
    result = CliRunner().invoke(main, ["--config", str(project.config), "report", *args],
                                env=project.env)
    assert result.exit_code == 0, result.output
    return result.output


async def test_report_after_a_run_with_failures(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(7, special=SPECIAL)
    assert report(project, "crowd") == "crowd: no runs yet\n"
    server = await fault_server(Faults(rcpt={
        "gone@example.org": (550, "5.1.1 no such user"),
        "policy@example.org": (554, "5.7.1 policy"),
        "busy@example.org": (451, "4.3.0 busy")}))
    settings = project.settings(**smtp_env(server, MAILER_SMTP_MAX_ATTEMPTS="2"))
    checked = check_campaign(settings.campaigns_dir / "crowd.yaml", settings)
    store = open_store(settings.database_url)
    run, _ = start_run(store, campaign_id="crowd", occurrence="20261203T0900", trigger="scheduler",
                       recipients=audience(checked, settings, store),
                       scheduled_at=q.utcnow() - timedelta(seconds=42), late_s=42.4)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    with store.engine.begin() as conn:
        q.suppress(conn, "unsub@example.org", reason="unsubscribed", list_name="crowd")
        # A row a killed process left `sending`: recovered and sent again.
        conn.execute(update(deliveries).where(deliveries.c.email_key == "crashed@example.org")
                     .values(status="sending", attempts=1, claimed_at=q.utcnow(),
                             claimed_by=f"{socket.gethostname()}:{ended.pid}:abcdef"))
    async with SmtpPool(settings.smtp) as pool:
        result = await deliver_run(settings, store, checked.rendition, run, transport=pool)
    assert result.counts == {"pending": 0, "sending": 0, "sent": 3, "failed": 4,
                             "bounced": 0}

    text = report(project, "crowd").splitlines()
    # The run's number within the campaign (1), not the database id; local times to the second.
    assert text[0] == ("run 1 (20261203T0900, finished, started 42 s late): "
                       "3 sent, 4 failed, 0 pending, 0 sending")
    first, _, last = text[1].removeprefix("  first sent ").partition(", last sent ")
    assert first <= last and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", first)
    now = datetime.now(settings.tz).replace(tzinfo=None)
    assert abs(datetime.fromisoformat(first) - now) < timedelta(minutes=5)  # local, not UTC
    assert text[2].startswith("  1 caught in flight by a crash and sent again")
    assert sorted(text[3:7]) == sorted([
        "  1 × 550: 5.1.1 no such user",
        "  1 × 554: 5.7.1 policy",
        "  1 × 451: gave up after 2 attempts: 4.3.0 busy",
        "  1 × no reply: not sent: the address is suppressed"])
    assert text[7:] == [
        "  returned: 1 bounced, 0 soft bounces, 0 complained, 0 unsubscribed by mail",
        "totals: pending 0, sending 0, sent 3, failed 4, bounced 0",
        "returned: bounced 1, soft bounced 0, complained 0, unsubscribed 0"]

    failed = report(project, "crowd", "--failed").splitlines()
    assert sorted(line for line in failed if line.startswith("  failed ")) == sorted([
        "  failed busy@example.org: 451 gave up after 2 attempts: 4.3.0 busy",
        "  failed gone@example.org: 550 5.1.1 no such user",
        "  failed policy@example.org: 554 5.7.1 policy",
        "  failed unsub@example.org: not sent: the address is suppressed"])
    assert [line for line in failed if not line.startswith("  failed ")] == text

    data = json.loads(report(project, "crowd", "--json", "--failed"))
    assert data["campaign"] == "crowd"
    assert data["totals"] == {"pending": 0, "sending": 0, "sent": 3, "failed": 4,
                              "bounced": 0}
    (entry,) = data["runs"]
    assert (entry["run"], entry["occurrence"], entry["status"], entry["trigger"]) == (
        run.id, "20261203T0900", "finished", "scheduler")
    assert entry["number"] == 1
    for key in ("started", "scheduled_at", "first_sent", "last_sent"):  # local, to the second
        stamp = datetime.fromisoformat(entry[key])
        assert stamp.microsecond == 0 and "." not in entry[key]
        assert stamp.utcoffset() == datetime.now(settings.tz).utcoffset()
    assert entry["late_s"] == 42.4 and entry["in_flight_recovered"] == 1
    assert entry["counts"] == data["totals"]
    assert {f["code"]: f["count"] for f in entry["failures"]} == {
        550: 1, 554: 1, 451: 1, None: 1}
    assert {(f["email"], f["code"]) for f in entry["failed"]} == {
        ("gone@example.org", 550), ("policy@example.org", 554), ("busy@example.org", 451),
        ("unsub@example.org", None)}
    assert "failed" not in json.loads(report(project, "crowd", "--json"))["runs"][0]
