"""Every shipped campaign in every language, and the confirmation mail, as SpamAssassin (an
independent content filter, Debian's, local rules only) judges them: no rule adds points."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailer.preview import write_preview
from mailer.web.mails import confirmation_message
from tests.conftest import REPO, Project

SPAMASSASSIN = shutil.which("spamassassin")
pytestmark = pytest.mark.skipif(SPAMASSASSIN is None, reason="spamassassin is not installed "
                                "(.ci/run installs Debian's)")
SHIPPED = sorted(p.name for p in (REPO / "campaigns").glob("*.yaml"))
RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s", re.M)


def judged(data: bytes) -> tuple[float, dict[str, float]]:
    """SpamAssassin's score and the rules that fired, with their points."""
    assert SPAMASSASSIN is not None
    result = subprocess.run([SPAMASSASSIN, "-L", "-t"], input=data, capture_output=True,
                            timeout=120, check=True)
    report = result.stdout.decode("utf-8", "replace")
    score = re.search(r"Content analysis details:\s+\((-?\d+(?:\.\d+)?) points", report)
    assert score, report[-2000:]
    details = report[score.end():]
    return float(score.group(1)), {name: float(points) for points, name in RULE.findall(details)}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_campaigns_add_no_spam_points(project: Project, tmp_path: Path,
                                              name: str) -> None:
    (project.root / "campaigns" / name).write_bytes((REPO / "campaigns" / name).read_bytes())
    files = write_preview(project.settings(), str(project.root / "campaigns" / name), tmp_path,
                          langs=[], recipient=None, png=False)
    mails = [f for f in files if f.suffix == ".eml"]
    assert mails
    for mail in mails:
        score, rules = judged(mail.read_bytes())
        positive = {rule: points for rule, points in rules.items() if points > 0}
        assert score <= 0 and not positive, (mail.name, positive)


@pytest.mark.parametrize("lang", ["de", "en", "tr", "ar"])
def test_the_confirmation_mail_adds_no_spam_points(project: Project, lang: str) -> None:
    data = confirmation_message(project.settings(), email="neu@example.org", name="Ayşe Yılmaz",
                                language=lang, lists=["newsletter"],
                                url="https://imag.example.org/confirm/" + "A1b2" * 40)
    score, rules = judged(data)
    assert score <= 0 and not {r: p for r, p in rules.items() if p > 0}, rules
