"""`mailer validate` for staff: every problem of a file in one run, in line order; a misspelt
key is one "did you mean" at any depth; YAML syntax errors in plain words at the line to fix;
a JSON Schema that explains every field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from mailer.campaign import CampaignProblems, load_campaign
from mailer.errors import CampaignError
from tests.conftest import Project
from tests.helpers import run_mailer
from tests.test_campaign import GOOD
from tests.test_yaml_budget import parser  # noqa: F401 - both PyYAML parsers, as a fixture

# Three mistakes, and the audience (validated before content) written last: line order is not
# the order pydantic checks the fields in.
THREE_MISTAKES = """\
template: newsletter
content:
  de:
    subject: "FORUM INTEGRATION im Dezember"
    blocks:
      - event:
          title: "FORUM INTEGRATION"
          start: "2026-12-10 18:00"
          place: "Auslandsgesellschaft.de"
          adress: "Steinstraße 48, 44147 Dortmund"
      - button:
          label: "Jetzt anmelden"
          link: "https://imag.example.org/anmeldung"
audience:
  lists: [partners]
  sprachen: [de]
"""


def errors_of(project: Project, stderr: str) -> list[str]:
    """The error lines, with paths relative to the project."""
    return [line.replace(f"{project.root}/", "") for line in stderr.splitlines()
            if line.startswith("error: ")]


def problems(project: Project, name: str, text: str) -> list[CampaignError]:
    """Every problem load_campaign finds in one go."""
    path = project.campaign(name, text)
    with pytest.raises(CampaignError) as caught:
        load_campaign(path, project.settings())
    found = caught.value
    return found.problems if isinstance(found, CampaignProblems) else [found]


# --- every problem in one run ------------------------------------------------------------------


def test_a_three_mistake_file_is_reported_in_one_run(project: Project) -> None:
    project.campaign("good.yaml", GOOD)
    project.campaign("forum.yaml", THREE_MISTAKES)
    result = run_mailer(project, "validate")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = errors_of(project, result.stderr)
    assert lines == [
        "error: campaigns/forum.yaml, line 10, field 'content.de.blocks[0].event.adress': "
        "unknown field 'adress'; did you mean 'address'?",
        "error: campaigns/forum.yaml, line 13, field 'content.de.blocks[1].button.link': "
        "unknown field 'link'; did you mean 'url'?",
        "error: campaigns/forum.yaml, line 16, field 'audience.sprachen': "
        "unknown field 'sprachen'; known fields: languages, lists",
    ], result.stderr
    assert "1 of 2 campaign files have problems" in result.stderr
    assert "good.yaml" in result.stdout


def test_problems_found_after_the_model_come_together_too(project: Project) -> None:
    text = GOOD.replace("newsletter", "newsleter").replace("[partners]", "[partnerz]")
    found = problems(project, "refs.yaml", text + "attachments: [files/flyer.pdf]\n")
    assert [(p.line, p.message.split(";")[0].split(" (")[0]) for p in found] == [
        (1, "unknown template 'newsleter'"),
        (2, "unknown list 'partnerz'"),
        (9, "attachment 'files/flyer.pdf' does not exist"),
    ]


def test_other_commands_name_the_first_problem_and_count_the_rest(project: Project) -> None:
    path = project.campaign("forum.yaml", THREE_MISTAKES)
    with pytest.raises(CampaignProblems) as caught:
        load_campaign(path, project.settings())
    sentence = caught.value.sentence()
    assert sentence.startswith(f"{path}, line 10, field 'content.de.blocks[0].event.adress'")
    assert sentence.endswith("(and 2 more problems in this file: 'mailer validate' lists "
                             "them all)") and "\n" not in sentence


# --- a misspelt key: one problem, with a suggestion, at every depth ---------------------------


def test_a_misspelt_required_field_is_one_problem_at_the_misspelt_key(project: Project) -> None:
    found = problems(project, "typo.yaml", GOOD.replace("subject:", "subjekt:"))
    assert [(p.line, p.message) for p in found] == [
        (5, "unknown field 'subjekt'; did you mean 'subject'?")]


def test_link_for_url_is_one_problem_though_the_words_differ(project: Project) -> None:
    text = GOOD + '      - button: {label: "Anmelden", link: "https://imag.example.org/a"}\n'
    found = problems(project, "link.yaml", text)
    assert [(p.line, p.message) for p in found] == [
        (9, "unknown field 'link'; did you mean 'url'?")]


def test_a_missing_field_without_a_lookalike_is_still_reported(project: Project) -> None:
    text = GOOD + '      - button: {label: "Anmelden", link: "https://imag.example.org/a", x: 1}\n'
    messages = [p.message for p in problems(project, "two.yaml", text)]
    assert "unknown field 'link'; known fields: label, url" in messages
    assert any(m.startswith("required field 'url' is missing: add 'url:'") for m in messages)


BLOCK = "      - {kind}: {{{fields}}}\n"
DEPTHS = [
    # (where, text, line, unknown key, suggestion)
    ("top", GOOD.replace("template:", "tempalte:"), 1, "tempalte", "template"),
    ("audience", GOOD.replace("{lists:", "{list:"), 2, "list", "lists"),
    ("schedule", GOOD + 'schedule: {att: "2030-01-02 09:00"}\n', 9, "att", "at"),
    ("language", GOOD.replace("    blocks:", '    preheadr: "x"\n    blocks:'), 6, "preheadr",
     "preheader"),
    ("event", GOOD + BLOCK.format(kind="event", fields='title: F, start: "2026-12-10 18:00", '
                                  'place: Reinoldinum, adress: "Schwanenwall 34"'), 9, "adress",
     "address"),
    ("image", GOOD + BLOCK.format(kind="image", fields='src: "https://imag.example.org/a.jpg", '
                                  'alt: Plakat, widht: 300'), 9, "widht", "width"),
    ("quote", GOOD + BLOCK.format(kind="quote", fields="text: Zitat, autor: IMAG"), 9, "autor",
     "author"),
    ("button", GOOD + BLOCK.format(kind="button", fields='lable: Los, '
                                   'url: "https://imag.example.org"'), 9, "lable", "label"),
]


@pytest.mark.parametrize(("where", "text", "line", "unknown", "hint"), DEPTHS,
                         ids=[d[0] for d in DEPTHS])
def test_did_you_mean_works_at_every_depth(project: Project, where: str, text: str, line: int,
                                           unknown: str, hint: str) -> None:
    [found] = problems(project, f"{where}.yaml", text)
    assert (found.line, found.message) == (
        line, f"unknown field '{unknown}'; did you mean '{hint}'?"), found.sentence()


def test_block_kinds_are_suggested_too(project: Project) -> None:
    [found] = problems(project, "kind.yaml", GOOD.replace("- text:", "- texte:"))
    assert found.line == 8 and "unknown block kind 'texte'; did you mean 'text'?" in found.message


def test_an_unknown_nested_field_lists_the_known_ones(project: Project) -> None:
    text = GOOD + BLOCK.format(kind="event", fields='title: F, start: "2026-12-10 18:00", '
                               'place: Reinoldinum, ort: Dortmund')
    [found] = problems(project, "ort.yaml", text)
    known = found.message.removeprefix("unknown field 'ort'; known fields: ").split(", ")
    assert {"address", "calendar", "description", "end", "place", "start", "title"} <= set(known)
    assert known == sorted(known) and found.line == 9


@pytest.mark.parametrize(("text", "line", "message"), [
    (GOOD.replace("[partners]", "partners"), 2,
     "this must be a list, like [partners] (got 'partners')"),
    (GOOD.replace("audience: {lists: [partners]}", "audience: partners"), 2,
     "this must hold fields ('name: value', indented below it), not a single value "
     "(got 'partners')"),
    (GOOD.replace("template: newsletter", "template: Newsletter 2"), 1,
     "'Newsletter 2' is not allowed here: use only lower-case letters, digits and dashes"),
], ids=["list", "fields", "pattern"])
def test_wrong_kinds_of_value_are_said_without_pydantic_words(project: Project, text: str,
                                                             line: int, message: str) -> None:
    [found] = problems(project, "kind.yaml", text)
    assert (found.line, found.message) == (line, message)


def test_language_fields_written_without_a_language(project: Project) -> None:
    text = GOOD.replace("  de:\n", "  subject: Hallo\n  de:\n")
    [found] = problems(project, "flat.yaml", text)
    assert found.line == 4 and found.field == "content.subject"
    assert "not a language code: the fields of a language go one level deeper" in found.message


# --- YAML syntax errors: the line to fix, in plain words ---------------------------------------


SYNTAX = [
    # (name, text, the line to fix, words of the advice)
    ("indent-less", GOOD.replace("    blocks:", "   blocks:"), 6,
     "indented by 3 spaces, which lines up with nothing above it: indent it by 4 like line 5 "
     "or 2 like line 4"),
    ("indent-more", GOOD.replace("audience:", "  audience:"), 2,
     "indented further than line 1 above it, so it reads as part of that value: remove the "
     "spaces at its start, like line 1"),
    ("indent-more-after-quote", GOOD.replace("    blocks:", "     blocks:"), 6,
     "indented by 5 spaces, which lines up with nothing above it: indent it by 4 like line 5"),
    ("indent-item", GOOD.replace("      - text:", "     - text:"), 8, "indent it by 6 like line 7"),
    ("missing-colon", GOOD.replace("template: newsletter", "template newsletter"), 1,
     "a ':' is missing after the field name: write 'template: newsletter'"),
    ("missing-colon-nested", GOOD.replace('subject: "Hallo', 'subject "Hallo'), 5,
     "a ':' is missing after the field name: write 'subject: \"Hallo {{ recipient.name }}\"'"),
    ("unclosed-quote", GOOD.replace('recipient.name }}"\n', "recipient.name }}\n"), 5,
     'the quote " that starts a value on this line is never closed'),
    ("unclosed-quote-at-end", GOOD.replace('lädt ein."', "lädt ein."), 8,
     'the quote " that starts a value on this line is never closed'),
    ("tab", GOOD.replace("    subject:", "\tsubject:"), 5,
     "indented with a tab; YAML allows only spaces for indentation: replace the tab with spaces"),
    ("second-colon", GOOD.replace('"Hallo {{ recipient.name }}"', "Einladung: FORUM"), 5,
     "the value of 'subject' contains ': ', which YAML reads as another field: put the value in "
     "quotes, like subject: \"Einladung: FORUM\""),
    ("unclosed-bracket", GOOD.replace("[partners]}", "[partners}"), 2,
     "the '[' on this line is not closed properly: end it with ']'"),
    ("unclosed-brace", GOOD.replace("[partners]}", "[partners]"), 2,
     "the '{' on this line is not closed properly: end it with '}'"),
    ("text-after-quote", GOOD.replace('"Hallo {{ recipient.name }}"', '"Hallo" Welt'), 5,
     "there is text after the closing quote"),
    ("dash-without-space", GOOD.replace("- heading:", "-heading:"), 7,
     "a list item needs a space after '-': write '- heading:"),
]
JARGON = re.compile(r"<|scalar|block end|block mapping|token|expected|simple key|flow")


@pytest.mark.usefixtures("parser")  # libyaml's and the pure-Python one: they word it differently
@pytest.mark.parametrize(("name", "text", "line", "words"), SYNTAX, ids=[s[0] for s in SYNTAX])
def test_yaml_syntax_errors_name_the_line_to_fix_in_plain_words(
        project: Project, name: str, text: str, line: int, words: str) -> None:
    [found] = problems(project, f"{name}.yaml", text)
    assert found.line == line and words in found.message, found.sentence()
    assert found.message.startswith("YAML syntax error: ")
    assert not JARGON.search(found.message), found.message


def test_a_syntax_error_through_the_cli(project: Project) -> None:
    project.campaign("tab.yaml", GOOD.replace("    subject:", "\tsubject:"))
    result = run_mailer(project, "validate")
    assert result.returncode == 1
    assert errors_of(project, result.stderr) == [
        "error: campaigns/tab.yaml, line 5: YAML syntax error: this line is indented with a "
        "tab; YAML allows only spaces for indentation: replace the tab with spaces"]


# --- the schema explains every field ----------------------------------------------------------


def properties(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of every object in the schema, with a dotted path for messages."""
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            yield f"{path}.{name}", sub
        for key, sub in node.items():
            yield from properties(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for sub in node:
            yield from properties(sub, path)


def test_schema_explains_every_field_at_every_depth(project: Project) -> None:
    result = run_mailer(project, "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    found = dict(properties(schema))
    names = {path.rsplit(".", 1)[1] for path in found}
    assert {"subject", "blocks", "address", "alt", "url", "cron", "lists", "author"} <= names
    for path, prop in found.items():
        assert prop.get("description"), f"{path} has no description"
        assert prop.get("examples"), f"{path} has no example"
    assert "id" not in schema["required"] and "optional" in schema["properties"]["id"][
        "description"]
    assert schema["properties"]["template"]["enum"] == ["campaign", "invitation", "newsletter"]
    pattern = schema["properties"]["content"]["propertyNames"]["pattern"]
    assert all(re.match(pattern, code) for code in ("de", "tr", "ar", "pt-BR"))
    assert not re.match(pattern, "subject")
