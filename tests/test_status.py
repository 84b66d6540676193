"""`mailer status` as the real command against a real SQLite ledger: every campaign at a glance,
an invalid file among the others, a sent campaign's counts, a missed one-off."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests import helpers
from tests.conftest import Project
from tests.helpers import run_mailer, smtp_env
from tests.smtpd import Faults, fault_server  # noqa: F401  (fixture)
from tests.test_scheduler import at_text, campaign_text

BERLIN = ZoneInfo("Europe/Berlin")  # config.yaml's zone
MINUTE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d[+-]\d\d:\d\d$")  # no seconds, no microseconds
NEWS = """\
id: news
title: "Neues aus dem Trägerkreis"
template: newsletter
audience: {lists: [newsletter, crowd]}
content:
  de: {subject: "Neuigkeiten", blocks: [{heading: "Hallo"}]}
  tr: {subject: "Haberler", blocks: [{heading: "Merhaba"}]}
"""


def status(project: Project) -> tuple[int, str, str, dict[str, Any]]:
    """`mailer status` and `mailer status --json`: exit code, text, stderr, rows by file."""
    text = run_mailer(project, "status")
    as_json = run_mailer(project, "status", "--json")
    assert "Traceback" not in text.stderr + as_json.stderr
    assert text.returncode == as_json.returncode
    data = json.loads(as_json.stdout)
    return text.returncode, text.stdout, text.stderr, {
        row["file"]: row for row in data["campaigns"]}


def block(text: str, campaign: str) -> str:
    """The lines `mailer status` prints for one campaign."""
    return next(b for b in text.split("\n\n") if b.startswith(campaign))


def test_lists_every_campaign_and_an_invalid_file_does_not_stop_the_others(
        project: Project) -> None:
    project.crowd(5)
    project.campaign("news.yaml", NEWS)
    people = project.root / "people.csv"
    people.write_text("email,name,language\nperson0@example.org,Person 0,de\n"
                      "leyla.demir@example.org,Leyla Demir,tr\n", encoding="utf-8")
    imported = run_mailer(project, "subscribers", "import", str(people), "--list", "newsletter",
                          "--consent-source", "Anmeldeliste Straßenfest 2026-06-13")
    assert imported.returncode == 0, imported.stderr
    project.campaign("monthly.yaml", campaign_text('cron: "0 9 1 * *"'))
    later = datetime.now(UTC).replace(second=42, microsecond=123456) + timedelta(days=3)
    project.campaign("later.yaml", at_text(later))
    project.campaign("broken.yaml", "template: newsletter\ncontent:\n  de: [unclosed\n")

    code, text, err, rows = status(project)
    assert code == 1  # one campaign has a problem
    assert set(rows) == {"crowd.yaml", "news.yaml", "monthly.yaml", "later.yaml", "broken.yaml"}
    assert err.strip() == "1 of 5 campaigns have problems"

    validate = run_mailer(project, "validate", "broken")
    (sentence,) = [x.removeprefix("error: ") for x in validate.stderr.splitlines()
                   if x.startswith("error: ")]
    assert rows["broken.yaml"]["problems"] == [sentence]  # as `mailer validate` says it
    assert re.search(r"broken\.yaml, line \d+", sentence)
    assert f"  PROBLEM:   {sentence}" in block(text, "broken.yaml – invalid")

    news = rows["news.yaml"]
    assert news["campaign"] == "news" and news["title"] == "Neues aus dem Trägerkreis"
    assert news["languages"] == ["de", "tr"]
    # 5 from the list file, 2 subscribers of the managed list, one of them on both: 6.
    assert news["audience"] == {"recipients": 6, "from_list_files": 5, "subscribers": 2}
    assert news["problems"] == [] and news["last_run"] is None
    assert "  audience:  6 recipients (5 in list files, 2 subscribers;" in block(text, "news")
    assert "  last run:  never" in block(text, "news")
    assert rows["crowd.yaml"]["audience"]["recipients"] == 5
    assert "  schedule:  none (goes out only with mailer send)" in block(text, "crowd")

    # Next fires in the configured zone, to the minute.
    expected = later.astimezone(BERLIN)
    assert rows["later.yaml"]["next_fire"] == expected.isoformat(timespec="minutes")
    assert MINUTE.match(rows["monthly.yaml"]["next_fire"])
    monthly = datetime.fromisoformat(rows["monthly.yaml"]["next_fire"])
    assert (monthly.day, monthly.hour, monthly.minute) == (1, 9, 0)  # 09:00 local, not UTC
    assert monthly.utcoffset() == monthly.astimezone(BERLIN).utcoffset()
    assert (f"next fire {expected:%Y-%m-%d %H:%M} (Europe/Berlin)"
            in block(text, "later"))
    assert not re.search(r"next fire \S+ \d\d:\d\d:|\.\d{6}", text)  # no seconds, no µs


async def test_a_sent_campaign_shows_sent_failed_and_bounced(project: Project,
                                                             fault_server) -> None:  # noqa: F811
    project.crowd(6)
    server = await fault_server(Faults(rcpt={
        "person2@example.org": (550, "5.1.1 no such user"),  # a bounce: suppressed
        "person4@example.org": (554, "5.7.1 rejected by policy")}))  # failed, not a bounce
    code, _, err = await helpers.mailer(project, "send", "crowd", **smtp_env(server))
    assert code in (0, 3), err  # 3: some messages failed

    code, text, _, rows = status(project)
    assert code == 0  # failed deliveries are the report's business, not a problem
    run = rows["crowd.yaml"]["last_run"]
    assert (run["number"], run["status"], run["recipients"]) == (1, "finished", 6)
    assert (run["sent"], run["failed"], run["bounced"], run["waiting"]) == (4, 2, 1, 0)
    assert MINUTE.match(run["started"]) and MINUTE.match(run["finished"])
    assert re.search(r"  last run:  run 1 \(finished, started \d{4}-\d\d-\d\d \d\d:\d\d\): "
                     r"4 sent, 2 failed, 1 bounced of 6$", block(text, "crowd"), re.M)
    assert rows["crowd.yaml"]["audience"]["recipients"] == 5  # the bounced one is suppressed


async def test_a_missed_one_off_is_a_problem_until_it_is_sent(project: Project) -> None:
    project.crowd(3)
    project.campaign("crowd.yaml", at_text(datetime(2026, 11, 2, 8, 0, tzinfo=UTC)).replace(
        "[partners]", "[crowd]"))
    code, text, _, rows = status(project)
    assert code == 1
    [problem] = rows["crowd.yaml"]["problems"]
    assert problem == ("missed: it was due at 2026-11-02 09:00:00 (Europe/Berlin) and has not "
                       "gone out; send it with: mailer send crowd")
    assert rows["crowd.yaml"]["next_fire"] is None
    assert "no next fire" in block(text, "crowd")

    code, _, err = await helpers.mailer(project, "send", "crowd")
    assert code == 0, err
    code, text, _, rows = status(project)
    assert code == 0 and rows["crowd.yaml"]["problems"] == []
    assert rows["crowd.yaml"]["last_run"]["sent"] == 3
