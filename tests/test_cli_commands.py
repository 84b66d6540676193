"""`mailer schedule` and `mailer db upgrade` as the real command, in a subprocess.

(`mailer serve` runs as a real process in tests/test_web_serve.py, `mailer run` in
tests/test_scheduler.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect

from mailer.store import RunStatus, open_store
from mailer.store import db as store_db
from tests.conftest import PG_ENV, Project, both_databases
from tests.helpers import MAILER, mailer_env, run_mailer
from tests.test_scheduler import at_text, campaign_text, runner_for, runs_of

LEDGER = {"runs", "deliveries", "suppressions", "subscribers", "memberships", "consent_events",
          "confirm_nonces"}


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr
    [line] = [x for x in stderr.splitlines() if x.strip()]
    return line


# --- mailer schedule ---------------------------------------------------------------------------


async def fill(project: Project) -> None:
    """Campaigns with a future fire, a missed one-off, a failed cron fire, none run yet."""
    project.campaign("monthly.yaml", campaign_text('cron: "0 9 1 * *"'))
    project.campaign("later.yaml", at_text(datetime.now(UTC) + timedelta(days=3)))
    t = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    project.campaign("late.yaml", at_text(t))
    await runner_for(project, t + timedelta(hours=2)).fire("late", [t])
    daily = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    project.campaign("daily.yaml", campaign_text('cron: "0 8 * * *"'))
    runner = runner_for(project, daily)
    lists = project.root / "lists" / "partners.yaml"
    good = lists.read_text()
    lists.write_text("- {email: [unclosed\n")  # broken after the campaign was loaded
    await runner.fire("daily", [daily])
    lists.write_text(good)
    [failed] = runs_of(project.settings(), "daily")
    assert failed.status == RunStatus.FAILED


@both_databases
async def test_schedule_lists_next_fires_last_runs_misses_and_failures(project: Project) -> None:
    await fill(project)
    shown = run_mailer(project, "schedule")
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines()
             if not line.startswith(" ")}
    assert set(lines) == {"monthly", "later", "late", "daily"}
    assert "cron 0 9 1 * *; next " in lines["monthly"] and "never run" in lines["monthly"]
    assert re.search(r"; next \d{4}-\d\d-01 09:00; ", lines["monthly"])  # local, no seconds
    # Why there is no next fire; runs numbered per campaign; times local (08:00 CET = 07:00Z).
    assert lines["late"] == (
        "late: at 2026-12-03 09:00:00; no next fire: missed at 2026-12-03 09:00 (run 1): send "
        "it with: mailer send late; last run 1 missed (one-off, missed, 0 recipients), 1 missed")
    assert lines["daily"].endswith(
        "; last run 1 failed (scheduled 2026-12-01 08:00, 0 recipients), 1 failed")
    [reason] = [line for line in shown.stdout.splitlines() if line.startswith("  run ")]
    assert reason.startswith("  run 1 (failed, scheduled 2026-12-01 08:00): failed: ")
    assert "YAML syntax error" in reason and "mailer send daily" in reason

    data = run_mailer(project, "schedule", "--json")
    assert data.returncode == 0, data.stderr
    rows = {row["campaign"]: row for row in json.loads(data.stdout)}
    monthly = rows["monthly"]
    local, utc = (datetime.fromisoformat(monthly[k]) for k in ("next_local", "next_utc"))
    assert local == utc and (local.day, local.hour, local.minute) == (1, 9, 0)
    assert local.utcoffset() == timedelta(hours=1) and utc.utcoffset() == timedelta(0)
    assert monthly["last_run"] is None and monthly["missed"] == monthly["failed"] == []
    assert rows["later"]["next_utc"] and rows["late"]["next_utc"] is None
    [missed] = rows["late"]["missed"]
    assert missed["occurrence"] == "once-missed" and "mailer send late" in missed["note"]
    [failed] = rows["daily"]["failed"]
    assert failed["status"] == "failed" and failed["occurrence"] == "2026-12-01T07:00:00+00:00"
    assert "YAML syntax error" in failed["note"]
    assert rows["daily"]["last_run"]["note"] == failed["note"]


def test_schedule_without_scheduled_campaigns_says_so(project: Project) -> None:
    project.campaign("unscheduled.yaml", campaign_text("").replace("schedule: {}\n", ""))
    shown = run_mailer(project, "schedule")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("no scheduled campaigns in ")
    assert shown.stdout.splitlines()[1] == (
        "unscheduled: no schedule: it goes out only with: mailer send unscheduled; never run")
    data = run_mailer(project, "schedule", "--json")
    assert data.returncode == 0
    [row] = json.loads(data.stdout)
    assert (row["campaign"], row["schedule"], row["next_utc"]) == ("unscheduled", None, None)
    assert row["why"].startswith("no schedule")


# --- mailer db upgrade -------------------------------------------------------------------------


@both_databases
def test_db_upgrade_creates_the_schema_and_is_idempotent(project: Project) -> None:
    url = project.settings().database_url
    done = run_mailer(project, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "database is up to date"
    store = open_store(url, upgrade=False)  # looks, changes nothing
    assert set(inspect(store.engine).get_table_names()) >= LEDGER
    assert store_db.at_head(store.engine)
    again = run_mailer(project, "db", "upgrade")
    assert again.returncode == 0 and again.stdout.strip() == "database is up to date"


def test_db_upgrade_of_an_unreachable_database_is_one_sentence(project: Project) -> None:
    done = run_mailer(project, "db", "upgrade",
                      MAILER_DATABASE_URL="postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert done.returncode == 1
    line = one_sentence(done.stderr)
    assert "cannot open the database" in line and "secret" not in line


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_db_upgrades_started_at_once_both_succeed(project: Project) -> None:
    """Two processes migrating one fresh PostgreSQL database take turns (advisory lock)."""
    assert project.env.get("MAILER_DATABASE_URL"), f"{PG_ENV} is not set"
    procs = [subprocess.Popen([*MAILER, "db", "upgrade"], env=mailer_env(project),
                              cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert out.strip() == "database is up to date"
    assert store_db.at_head(open_store(project.settings().database_url, upgrade=False).engine)
