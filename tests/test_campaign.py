"""Campaign loading: every mistake staff can make is one sentence with file and line."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.campaign import load_campaign
from mailer.checks import check_campaign
from mailer.errors import MailerError, UserError
from tests.conftest import Project
from tests.helpers import run_mailer as mailer_cli

GOOD = """\
template: newsletter
audience: {lists: [partners]}
content:
  de:
    subject: "Hallo {{ recipient.name }}"
    blocks:
      - heading: "Liebe Freundinnen und Freunde"
      - text: "Das **FORUM INTEGRATION** lädt ein."
"""


def test_good_campaign_validates(project: Project) -> None:
    project.campaign("good.yaml", GOOD)
    result = mailer_cli(project, "validate")
    assert result.returncode == 0, result.stderr
    assert "ok: " in result.stdout and "good" in result.stdout


BAD = [
    # (name, yaml, expected line, words the message must contain)
    ("syntax", GOOD.replace("[partners]}", "[partners]"), None, "YAML syntax error"),
    ("unknown-key", GOOD.replace("template:", "tempalte: newsletter\ntemplate:"), 1,
     "did you mean 'template'"),
    ("wrong-type", GOOD.replace("audience: {lists: [partners]}", "audience: {lists: partners}"),
     2, "audience.lists"),
    ("unknown-template", GOOD.replace("newsletter", "newsleter"), 1, "did you mean 'newsletter'"),
    ("unknown-list", GOOD.replace("[partners]", "[partnerz]"), 2, "did you mean 'partners'"),
    ("unknown-block", GOOD.replace("- heading:", "- headline:"), 7,
     "unknown block kind 'headline'"),
    ("undefined-var", GOOD.replace("Liebe Freundinnen", "Liebe {{ recipient.vorname }}"), 7,
     "vorname"),
    ("bad-cron", GOOD + 'schedule: {cron: "61 9 * * *"}\n', 9, "cron"),
    ("cron-weekday-8", GOOD + 'schedule: {cron: "0 9 * * 8"}\n', 9, "out of range"),
    ("cron-day-and-weekday", GOOD + 'schedule: {cron: "0 9 1 * 1"}\n', 9, "either the day"),
    ("dst-gap", GOOD + 'schedule: {at: "2027-03-28 02:30"}\n', 9, "does not exist"),
    ("dst-twice", GOOD + 'schedule: {at: "2026-10-25 02:30"}\n', 9, "happens twice"),
    ("crlf-subject",
     GOOD.replace('"Hallo {{ recipient.name }}"', '"Hallo\\r\\nBcc: x@example.org"'),
     5, "line break"),
    ("no-content", "template: newsletter\naudience: {lists: [partners]}\n", None, "content"),
    ("missing-attachment", GOOD + "attachments: [files/flyer.pdf]\n", 9, "does not exist"),
    ("bad-merge-syntax", GOOD.replace("{{ recipient.name }}", "{{ recipient.name }"), 5,
     "merge field"),
    ("bad-id", "id: Wir Alle\n" + GOOD, 1, "not a valid id"),
]


@pytest.mark.parametrize(("name", "text", "line", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_campaign_is_one_clear_sentence(project: Project, name: str, text: str,
                                            line: int | None, words: str) -> None:
    project.campaign(f"{name}.yaml", text)
    result = mailer_cli(project, "validate", f"campaigns/{name}.yaml")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[0]
    assert f"{name}.yaml" in message and words in message, message
    if line is not None:
        assert f"line {line}" in message, message


def test_past_one_off_is_a_warning(project: Project) -> None:
    project.campaign("past.yaml", GOOD + 'schedule: {at: "2020-01-01 09:00"}\n')
    result = mailer_cli(project, "validate")
    assert result.returncode == 0
    assert "warning" in result.stderr and "in the past" in result.stderr


@pytest.mark.parametrize(("content", "words"), [
    (b"email,name\nnot-an-address,X\n", "not a valid email address"),
    (b"mail,name\na@example.org,X\n", "no 'email' column"),
    (b"email,name\n\xff\xfe@example.org,X\n", "not UTF-8"),
    (b"email,name\na@example.org,X\nA@Example.org,Y\n", "listed twice"),
])
def test_bad_list_file(project: Project, content: bytes, words: str) -> None:
    project.list_file("extra.csv", content)
    project.campaign("c.yaml", GOOD.replace("[partners]", "[extra]"))
    result = mailer_cli(project, "validate")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "extra.csv, line" in result.stderr and words in result.stderr, result.stderr


def test_lists_dedupe_case_insensitively_across_lists(project: Project) -> None:
    project.list_file("one.csv", "email,name\nAnna@Example.org,Anna\nb@example.org,B\n")
    project.list_file("two.yaml", "- email: anna@example.org\n  name: Anna 2\n"
                                  "- email: c@example.org\n")
    project.campaign("c.yaml", GOOD.replace("[partners]", "[one, two]"))
    checked = check_campaign(project.root / "campaigns" / "c.yaml", project.settings())
    assert [r.email for r in checked.recipients] == ["Anna@example.org", "b@example.org",
                                                     "c@example.org"]


def test_schema_command_prints_json_schema(project: Project) -> None:
    result = mailer_cli(project, "schema")
    schema = json.loads(result.stdout)
    assert "content" in schema["properties"] and "template" in schema["required"]


def test_nothing_written_on_bad_preview(project: Project, tmp_path: Path) -> None:
    project.campaign("c.yaml", GOOD.replace("Liebe Freundinnen", "{{ recipient.nope }}"))
    out = tmp_path / "out"
    result = mailer_cli(project, "preview", "c", "--out", str(out))
    assert result.returncode == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", ["base", "blocks", "confirmation"])
def test_shared_parts_and_the_opt_in_layout_are_no_campaign_templates(
        project: Project, name: str) -> None:
    project.campaign("c.yaml", GOOD.replace("template: newsletter", f"template: {name}"))
    result = mailer_cli(project, "validate", "c")
    assert result.returncode == 1 and f"unknown template '{name}'" in result.stderr


def test_preview_for_an_address_not_on_the_lists_says_so(project: Project,
                                                           tmp_path: Path) -> None:
    project.campaign("c.yaml", GOOD)
    out = tmp_path / "out"
    result = mailer_cli(project, "preview", "c", "--out", str(out),
                        "--recipient", "stranger@example.org")
    assert result.returncode == 1
    assert "'stranger@example.org' is not on the lists of this campaign" in result.stderr
    assert not out.exists() or not any(out.iterdir())
    listed = mailer_cli(project, "preview", "c", "--out", str(out),
                        "--recipient", "Buero@St-Reinoldi.example.org")
    assert listed.returncode == 0, listed.stderr
    mail = email.message_from_bytes(next(out.glob("*.eml")).read_bytes(),
                                    policy=email.policy.default)
    assert mail["Subject"] == "Hallo Ulrike Hartmann"


yaml_text = st.one_of(
    st.text(max_size=300),
    st.builds(lambda a, b: GOOD[:a] + b + GOOD[a:], st.integers(0, len(GOOD)),
              st.text(alphabet=st.sampled_from(list(":-[]{}'\"\n #&*!|>%@`\t\r\\")), max_size=8)),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=yaml_text)
def test_fuzzed_campaign_never_tracebacks(project: Project, text: str) -> None:
    path = project.campaign("fuzz.yaml", text)
    try:
        load_campaign(path, project.settings())
    except UserError as exc:
        assert exc.sentence()
    except MailerError:
        pass


def test_absurdly_large_campaign_file_is_refused(project: Project) -> None:
    project.campaign("huge.yaml", GOOD + "# " + "x" * (3 * 1024 * 1024) + "\n")
    result = mailer_cli(project, "validate", "campaigns/huge.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "huge.yaml" in result.stderr and "KiB allowed" in result.stderr


def test_merge_columns_come_from_the_header_of_every_list(project: Project) -> None:
    from mailer.audience import columns

    project.list_file("one.csv", "email,name,stadtteil,verein\na@example.org,A,Hörde,x\n")
    project.list_file("two.yaml", "- {email: b@example.org, stadtteil: Eving}\n"
                                  "- {email: c@example.org, stadtteil: Mengede, verein: y}\n")
    settings = project.settings()
    assert columns(["one"], settings) == {"stadtteil", "verein"}
    assert columns(["one", "two"], settings) == {"stadtteil"}


def test_a_mail_too_long_for_gmail_gets_a_warning(project: Project) -> None:
    paragraph = "Das FORUM INTEGRATION lädt ein. " * 40
    blocks = "".join(f"      - text: \"{paragraph}\"\n" for _ in range(80))
    project.campaign("long.yaml", GOOD + blocks)
    result = mailer_cli(project, "validate", "campaigns/long.yaml")
    assert result.returncode == 0
    assert "warning" in result.stderr and "Gmail cuts it off" in result.stderr
    project.campaign("short.yaml", GOOD)
    assert "Gmail" not in mailer_cli(project, "validate", "campaigns/short.yaml").stderr
