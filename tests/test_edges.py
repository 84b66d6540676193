"""Edges of rendering, previewing, list files and the live preview: each bad input is one
sentence naming the file, line and field (and nothing is written); each staff-facing feature
of the text part, the calendar entry and the live page does what it says."""

from __future__ import annotations

import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from jinja2.sandbox import SandboxedEnvironment

from mailer.audience import Recipient, load_list, resolve
from mailer.campaign import load_campaign
from mailer.checks import check_campaign
from mailer.errors import CampaignError, ListError, UserError
from mailer.render import (
    SAMPLE_LINKS,
    Fields,
    Snippets,
    _stage2,
    check_merge_fields,
    ics,
    personalise,
    render_campaign,
)
from tests.conftest import Project
from tests.helpers import run_mailer
from tests.test_campaign import GOOD

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian chromium at /usr/bin/chromium")


def refusal(project: Project, text: str, name: str = "c.yaml") -> str:
    """The one sentence `mailer validate` would print for this campaign file."""
    path = project.campaign(name, text)
    with pytest.raises(UserError) as caught:
        check_campaign(path, project.settings())
    return caught.value.sentence()


def heading(snippet: str) -> str:
    """GOOD with its heading block (line 7) replaced by `snippet`."""
    return GOOD.replace('"Liebe Freundinnen und Freunde"', repr(snippet))


def text_of(project: Project, text: str, recipient: Recipient | None = None) -> str:
    path = project.campaign("c.yaml", text)
    checked = check_campaign(path, project.settings())
    person = recipient or Recipient("anna@example.org", "Anna", "de", list="partners")
    return personalise(checked.rendition.for_language("de"), person, SAMPLE_LINKS).text


# --- the staff sandbox ------------------------------------------------------------------------


def test_a_jinja_test_outside_the_allowed_ones_is_refused_at_its_line(project: Project) -> None:
    sentence = refusal(project, heading("{% if recipient.name is odd %}x{% endif %}"))
    assert sentence.endswith("c.yaml, line 7, field 'content.de.blocks[0].heading': the test "
                             "'odd' is not available in campaigns"), sentence


def test_subscripts_read_merge_fields_and_letters_but_nothing_else(project: Project) -> None:
    text = text_of(project, heading("{{ recipient['name'] }}/{{ recipient.name[0] }}"))
    assert "Anna/A" in text
    # A mapping subscripted by a number, and a string subscripted by a method's name, are not
    # merge fields: validation says so, not a bound method or a traceback.
    sentence = refusal(project, heading("{{ recipient[0] }}"))
    assert "c.yaml, line 4, field 'content.de': merge field problem: dict object has no " \
           "element 0; the lists of this campaign have the columns" in sentence, sentence
    sentence = refusal(project, heading("{{ recipient.name['upper'] }}"))
    assert "c.yaml, line 7, field 'content.de.blocks[0].heading': merge field problem: " \
           "'str object' has no attribute 'upper'" in sentence, sentence


def test_the_sandbox_holds_no_attribute_safe() -> None:
    """Every attribute read goes through getattr (mapping keys only); Jinja's own rule, which
    allows any public attribute of a string, must never be what decides."""
    env = _stage2(False)
    assert isinstance(env, SandboxedEnvironment)
    assert env.is_safe_attribute("x", "upper", "x".upper) is False
    assert env.is_safe_attribute({}, "items", {}.items) is False


def test_what_runs_is_checked_again_as_a_whole(project: Project) -> None:
    """Snippets.compile refuses a source that slipped past the per-field checks, naming the
    field, instead of compiling it (or failing with Jinja's own exception)."""
    path = project.campaign("c.yaml", GOOD)
    snippets = Snippets(load_campaign(path, project.settings()))
    loc = ("content", "de", "subject")
    with pytest.raises(CampaignError) as caught:
        snippets.compile("{% if recipient.name %}", loc, autoescape=False)
    assert "c.yaml, line 5, field 'content.de.subject': merge field syntax error: " in \
        caught.value.sentence()
    with pytest.raises(CampaignError) as caught:
        snippets.compile("{{ range(3) }}", loc, autoescape=False)
    assert ("line 5, field 'content.de.subject': calling a function is not allowed"
            in caught.value.sentence())


def test_a_render_time_sandbox_refusal_is_one_sentence_naming_the_file(project: Project) -> None:
    path = project.campaign("c.yaml", GOOD)
    rendition = check_campaign(path, project.settings()).rendition
    slipped = replace(rendition.languages["de"],
                      text=_stage2(False).from_string("{{ recipient.name.upper() }}"))
    bad = replace(rendition, languages={"de": slipped})
    with pytest.raises(CampaignError) as caught:
        check_merge_fields(bad, Recipient("a@example.org", "A", "de"))
    sentence = caught.value.sentence()
    assert sentence.startswith(f"{path}: merge field problem in language 'de': ")
    assert "unsafe" in sentence or "not safely callable" in sentence, sentence


@pytest.mark.parametrize(("where", "text", "line", "field"), [
    ("subject", GOOD.replace("{{ recipient.name }}", "{{ recipient.vorname }}"), 5,
     "content.de.subject"),
    ("preheader", GOOD.replace("    blocks:", "    preheader: 'Hi {{ recipient.vorname }}'\n"
                                              "    blocks:"), 6, "content.de.preheader"),
])
def test_an_unknown_merge_field_is_reported_at_the_field_using_it(
        project: Project, where: str, text: str, line: int, field: str) -> None:
    sentence = refusal(project, text)
    assert f"c.yaml, line {line}, field '{field}': merge field problem: " in sentence, sentence
    assert "'vorname'" in sentence


def test_system_mail_field_names_must_be_identifiers() -> None:
    """A field name becomes `{{ name }}` in the stage-2 source: anything else would be code."""
    assert Fields("url", "name")["name"] == "Mf7q1q7fM"
    with pytest.raises(ValueError, match="field names must be identifiers"):
        Fields("url", "x }}{{ range(9)")


# --- the layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "words", "line"), [
    ("{% if %}\n", "template syntax error: ", 1),
    ('<mjml><mj-body>\n{% include "nope.mjml.j2" %}\n</mj-body></mjml>\n',
     "template 'nope.mjml.j2' not found", None),
    ("<mjml><mj-body>\n\n<mj-text>{{ nothing.here }}</mj-text>\n</mj-body></mjml>\n",
     "the template uses an undefined variable: 'nothing' is undefined", 3),
    ("<mjml><mj-body><mj-section></mjml>\n",
     "MJML did not compile for language 'de': ", None),
])
def test_a_broken_layout_is_one_sentence_naming_the_template(
        project: Project, layout: str, words: str, line: int | None) -> None:
    (project.root / "templates" / "broken.mjml.j2").write_text(layout, encoding="utf-8")
    sentence = refusal(project, GOOD.replace("template: newsletter", "template: broken"))
    assert words in sentence, sentence
    assert "templates" in sentence
    if line is not None:
        assert f"broken.mjml.j2, line {line}: " in sentence, sentence
    assert "Traceback" not in sentence


def test_a_broken_layout_exits_1_and_writes_no_preview(project: Project, tmp_path: Path) -> None:
    (project.root / "templates" / "broken.mjml.j2").write_text(
        "<mjml><mj-body><mj-section></mjml>\n", encoding="utf-8")
    project.campaign("c.yaml", GOOD.replace("template: newsletter", "template: broken"))
    out = tmp_path / "out"
    result = run_mailer(project, "preview", "c", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert "broken.mjml.j2: MJML did not compile for language 'de'" in first, first
    assert "check the layout and any HTML in the text blocks" in first
    assert not out.exists() or not any(out.iterdir())


def test_without_strings_yaml_the_layout_names_the_missing_text(project: Project) -> None:
    (project.root / "templates" / "strings.yaml").unlink()
    sentence = refusal(project, GOOD)
    assert "newsletter.mjml.j2, line " in sentence, sentence
    assert "the template uses an undefined variable: 'dict object' has no attribute" in sentence


# --- events -----------------------------------------------------------------------------------



def event(start: str, end: str) -> str:
    """GOOD with an event (line 9) after its text block."""
    return GOOD + f"      - event: {{title: Fest, start: '{start}', end: '{end}', place: Halle}}\n"


@pytest.mark.parametrize(("start", "end", "field"), [
    ("2027-03-28 02:30", "2027-03-28 05:00", "start"),
    ("2027-03-20 10:00", "2027-03-28 02:30", "end"),
])
def test_an_event_time_the_clocks_skip_is_refused_at_its_field(
        project: Project, start: str, end: str, field: str) -> None:
    sentence = refusal(project, event(start, end))
    assert f"c.yaml, line 9, field 'content.de.blocks[2].event.{field}': 2027-03-28 02:30 " \
           "does not exist in Europe/Berlin" in sentence, sentence


def test_an_event_over_several_days_says_when_it_ends(project: Project) -> None:
    text = text_of(project, event("2027-03-20 10:00", "2027-03-21 12:00"))
    assert "Samstag, 20. März 2027, 10:00 Uhr – 21. März 2027" in text, text


def test_a_calendar_entry_of_a_campaign_without_a_file_is_sequence_0(project: Project) -> None:
    path = project.campaign("c.yaml", event("2027-03-20 10:00", "2027-03-20 12:00"))
    settings = project.settings()
    campaign = load_campaign(path, settings)
    fest = campaign.content["de"].blocks[2].value

    def sequence() -> str:
        from mailer.campaign import resolve_local

        data = ics(campaign, settings, fest, ordinal=1, lang="de",
                   start=resolve_local(fest.start, settings), end=None).decode()
        return next(line for line in data.split("\r\n") if line.startswith("SEQUENCE:"))

    path.touch()
    assert sequence() != "SEQUENCE:0"  # edited after 2026: a later edit is a higher number
    path.unlink()  # moved away while the archive renders it
    assert sequence() == "SEQUENCE:0"
    campaign._source = None  # built in memory (no file at all)
    assert sequence() == "SEQUENCE:0"


# --- the text part ----------------------------------------------------------------------------


def test_the_text_part_keeps_quotes_code_rules_and_images_readable(project: Project) -> None:
    markdown = ("> Wer nicht kämpft, hat schon verloren.\n\nDanach:\n\n"
                "    mailer preview forum\n\n---\n\n![Plakat des Forums](https://x.org/p.png)")
    text = text_of(project, GOOD.replace('"Das **FORUM INTEGRATION** lädt ein."',
                                         _yaml_block(markdown)))
    assert "> Wer nicht kämpft, hat schon verloren." in text
    assert "\n    mailer preview forum\n" in text
    assert "\n* * *\n" in text
    assert "[Plakat des Forums]" in text and "![" not in text


def _yaml_block(markdown: str) -> str:
    return "|\n" + "".join(f"          {line}\n" if line else "\n"
                            for line in markdown.split("\n")).rstrip("\n")


def test_a_long_button_label_goes_above_its_link(project: Project) -> None:
    label = "Jetzt verbindlich für das Forum Integration und das anschließende Fest anmelden"
    text = text_of(project, GOOD + f'      - button: {{label: "{label}", '
                                   'url: "https://imag.example.org/anmeldung"}\n')
    assert "anmelden\nhttps://imag.example.org/anmeldung" in text, text
    assert f"{label}: https" not in text


def test_an_image_without_a_link_is_its_alt_text(project: Project) -> None:
    text = text_of(project, GOOD + '      - image: {src: "https://imag.example.org/p.png", '
                                   'alt: "Plakat des Forums"}\n')
    assert "\n[Plakat des Forums]\n" in text, text


# --- preview options --------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (["--recipient", "not-an-address"],
     "--recipient 'not-an-address' is not a valid address (An email address must have an @"),
    (["--lang", "fr"], "the campaign has no language 'fr' (it has de)"),
])
def test_a_bad_preview_option_is_one_sentence_and_nothing_is_written(
        project: Project, tmp_path: Path, args: list[str], words: str) -> None:
    project.campaign("c.yaml", GOOD)
    out = tmp_path / "out"
    result = run_mailer(project, "preview", "c", "--out", str(out), *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr, result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_png_without_chromium_says_how_to_get_it(project: Project, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import preview

    monkeypatch.setattr(preview, "CHROMIUM", str(tmp_path / "no-chromium"))
    project.campaign("c.yaml", GOOD)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--png needs Debian's chromium: run 'apt-get install "
                                        r"chromium' \(or leave out --png\)"):
        preview.write_preview(project.settings(), "c", out, langs=[], recipient=None, png=True)
    assert not out.exists()


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int(struct.unpack(">I", data[16:20])[0])


@needs_chromium
@pytest.mark.parametrize("via", ["playwright", "command line"])
def test_png_screenshots_at_desktop_and_phone_width(project: Project, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    via: str) -> None:
    from mailer import preview

    if via == "command line":  # no playwright installed: chromium --headless --screenshot
        monkeypatch.setitem(sys.modules, "playwright.sync_api", None)
    elif pytest.importorskip("playwright.sync_api") is None:
        pytest.skip("playwright is not installed")
    project.campaign("c.yaml", GOOD)
    written = preview.write_preview(project.settings(), "c", tmp_path, langs=[], recipient=None,
                                    png=True)
    shots = sorted(p for p in written if p.suffix == ".png")
    assert [p.name for p in shots] == ["c.de.375.png", "c.de.600.png"]
    assert png_width(shots[1]) >= 600 and 375 <= png_width(shots[0]) < 600


def test_a_failed_screenshot_is_one_sentence(project: Project, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import preview

    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)
    monkeypatch.setattr(preview, "CHROMIUM", "/bin/false")
    project.campaign("c.yaml", GOOD)
    with pytest.raises(UserError, match=r"chromium could not take the screenshot of .*c\.de\.html"
                                        r" \(exit 1\)"):
        preview.write_preview(project.settings(), "c", tmp_path, langs=[], recipient=None,
                              png=True)


# --- list files -------------------------------------------------------------------------------

LONG = "x" * 1001


@pytest.mark.parametrize(("name", "content", "line", "words"), [
    ("extra.csv", "email,name\na@example.org,A,B\n", 2,
     "this row has more values than the header has columns (a comma too many?)"),
    ("huge.csv", "email,name\na@example.org," + "x" * 200_000 + "\n", 2,
     "CSV error: field larger than field limit (131072)"),
    ("empty.csv", "email,name\n,Anna\n", 2, "the email is empty: fill it in or delete the row"),
    ("break.csv", 'email,name\na@example.org,"An\nna"\n', None,
     "column 'name' contains a line break: remove it"),
    ("cr.csv", 'email,stadtteil\na@example.org,"No\rrd"\n', None,
     "column 'stadtteil' contains a line break: remove it"),
    ("nul.csv", 'email,stadtteil\na@example.org,No\x00rd\n', None,
     "column 'stadtteil' contains a line break: remove it"),
    ("long.csv", f"email,stadtteil\na@example.org,{LONG}\n", 2,
     "column 'stadtteil' is longer than 1000 characters"),
    ("column.csv", "email,Stadt-Teil\na@example.org,Nord\n", 2,
     "column name 'stadt-teil' must be lower-case letters, digits or _"),
    ("name.csv", f"email,name\na@example.org,{'n' * 201}\n", 2,
     "the name is longer than 200 characters"),
    ("lang.csv", "email,language\na@example.org,Deutsch\n", 2,
     "'deutsch' is not a language code (use e.g. de, tr, ar)"),
    ("scalar.yaml", "- email: a@example.org\n- b@example.org\n", 2,
     "each entry must be a mapping with at least 'email'"),
    ("noemail.yaml", "- email: a@example.org\n- name: Berta\n", 2, "this entry has no 'email'"),
    ("twice.yaml", "- email: a@example.org\n- email: A@example.org\n", 2,
     "A@example.org is listed twice (first on line 1): delete one row"),
    ("notalist.yaml", "email: a@example.org\n", 1,
     "a YAML list file must be a list of entries ('- email: …')"),
])
def test_a_bad_list_file_is_one_sentence_at_its_line(project: Project, name: str, content: str,
                                                     line: int | None, words: str) -> None:
    path = project.list_file(name, content)
    with pytest.raises(ListError) as caught:
        load_list(path)
    sentence = caught.value.sentence()
    where = f"{path}, line {line}: " if line else f"{path}, line "
    assert sentence.startswith(where) and sentence.endswith(words), sentence


def test_a_row_of_empty_cells_is_skipped(project: Project) -> None:
    path = project.list_file("gaps.csv", "email,name\n,\n  ,  \nb@example.org,B\n")
    assert [r.email for r in load_list(path)] == ["b@example.org"]


def test_a_bad_list_through_the_cli(project: Project) -> None:
    project.list_file("extra.csv", "email,name,language\na@example.org,A,Deutsch\n")
    project.campaign("c.yaml", GOOD.replace("[partners]", "[extra]"))
    result = run_mailer(project, "validate", "c")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "extra.csv, line 2: 'deutsch' is not a language code (use e.g. de, tr, ar)" \
        in result.stderr, result.stderr


def test_an_audience_can_be_narrowed_to_languages(project: Project) -> None:
    project.list_file("mixed.csv", "email,name,language\na@example.org,A,de\n"
                                   "b@example.org,B,tr\nc@example.org,C,ar\n")
    people = resolve(["mixed"], project.settings(), languages=["tr", "ar"])
    assert [(r.email, r.list) for r in people] == [("b@example.org", "mixed"),
                                                   ("c@example.org", "mixed")]


def test_an_audience_over_max_recipients_is_refused(project: Project) -> None:
    project.crowd(3)
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(text + "max_recipients: 2\n", encoding="utf-8")
    with pytest.raises(ListError) as caught:
        resolve(["crowd"], project.settings())
    assert caught.value.sentence() == (
        "the audience has more than max_recipients (2) recipients: raise max_recipients in the "
        "config if that is right")
    assert len(resolve(["crowd"], project.settings(), languages=["tr"])) == 0  # counted after


# --- the live preview -------------------------------------------------------------------------


def watch_client(watcher: object) -> object:
    from starlette.testclient import TestClient

    from mailer.watch import create_watch_app

    return TestClient(create_watch_app(watcher), base_url="http://127.0.0.1")  # type: ignore[arg-type]


def test_a_deleted_campaign_file_keeps_the_last_rendering_below_the_error(
        project: Project) -> None:
    from mailer.watch import Watcher

    path = project.campaign("c.yaml", GOOD)
    watcher = Watcher(project.settings(), path)
    assert watcher.refresh() is True and watcher.snapshot.errors == ()
    assert watcher.refresh() is False  # nothing changed
    path.unlink()
    assert watcher.refresh() is True
    snap = watcher.snapshot
    assert snap.version == 2 and [m.lang for m in snap.mails] == ["de"]
    assert snap.errors == (f"error: {path}: the file is gone (renamed or deleted?)",)
    client = watch_client(watcher)
    panel = client.get("/panel?lang=de")  # type: ignore[attr-defined]
    assert panel.headers["X-Preview-Version"] == "2"
    assert "The last save does not render; below is the last version that did." in panel.text
    assert "the file is gone" in panel.text and "Hallo Ulrike Hartmann" in panel.text
    assert client.get("/version").json() == {"version": 2}  # type: ignore[attr-defined]


def test_a_campaign_that_never_rendered_says_so(project: Project) -> None:
    from mailer.watch import Watcher, panel_html

    path = project.campaign("c.yaml", GOOD.replace("[partners]", "[partnerz]"))
    watcher = Watcher(project.settings(), path)
    watcher.refresh()
    html = panel_html(watcher, "de")
    assert "Nothing renders yet: fix the error and save again." in html
    assert "did you mean &#x27;partners&#x27;" in html


def test_warnings_are_shown_with_the_rendering(project: Project) -> None:
    from mailer.watch import Watcher, panel_html

    path = project.campaign("c.yaml", GOOD + 'schedule: {at: "2020-01-01 09:00"}\n')
    watcher = Watcher(project.settings(), path)
    watcher.refresh()
    html = panel_html(watcher, "de")
    assert '<section class="warnings"><pre>warning: ' in html and "in the past" in html
    assert "errors" not in html


def test_a_crash_while_rendering_is_shown_not_fatal(project: Project,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import watch

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something\n  broke")

    path = project.campaign("c.yaml", GOOD)
    watcher = watch.Watcher(project.settings(), path)
    monkeypatch.setattr(watch, "check_campaign", crash)
    assert watcher.refresh() is True
    assert watcher.snapshot.errors == (
        f"error: {path}: could not be rendered (RuntimeError: something broke); "
        "please report this",)


def test_watching_a_campaign_file_that_does_not_exist_exits_1(project: Project) -> None:
    result = run_mailer(project, "preview", "campaigns/nope.yaml", "--watch", "--port", "0",
                        timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: campaigns/nope.yaml: no such campaign file", \
        result.stderr


def test_render_campaign_refuses_a_hostile_test_too(project: Project) -> None:
    """The archive renders without validating first: the same refusal, at the same line."""
    path = project.campaign("c.yaml", heading("{% if recipient.name is odd %}x{% endif %}"))
    with pytest.raises(CampaignError, match="line 7.*the test 'odd' is not available"):
        render_campaign(load_campaign(path, project.settings()), project.settings())



def test_a_filter_refusing_its_arguments_is_one_sentence(project: Project) -> None:
    project.campaign("t.yaml", "template: newsletter\naudience: {lists: [partners]}\n"
                     "content:\n  de:\n    subject: \"Hallo {{ recipient.name | truncate(1) }}\"\n"
                     "    blocks: [{heading: Hallo}]\n")
    result = run_mailer(project, "validate", "t")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "a filter cannot work with these values" in result.stderr
    assert "please report this" not in result.stderr


def test_an_index_past_the_end_of_a_merge_field_reads_as_empty(project: Project) -> None:
    from mailer.audience import Recipient
    from mailer.checks import check_campaign
    from mailer.render import SAMPLE_LINKS, personalise

    path = project.campaign("i.yaml", "template: newsletter\naudience: {lists: [partners]}\n"
                            "content:\n  de:\n    subject: \"Hallo {{ recipient.name[0] }}.\"\n"
                            "    blocks: [{heading: Hallo}]\n")
    settings = project.settings()
    lr = check_campaign(path, settings, with_audience=False).rendition.languages["de"]
    assert personalise(lr, Recipient("a@example.org", "Anna", "de"), SAMPLE_LINKS).subject \
        == "Hallo A."
    assert personalise(lr, Recipient("b@example.org", "", "de"), SAMPLE_LINKS).subject \
        == "Hallo ."  # an empty name: no IndexError halfway through a run
