"""Campaign files are data, not code: a sandbox for merge fields, attachments kept in place."""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.errors import CampaignError
from mailer.render import (
    SAMPLE_LINKS,
    LangRendition,
    personalise,
    personalise_pieces,
    static_text,
)
from tests.conftest import Project
from tests.test_campaign import GOOD, mailer_cli

PWNED = "pwned-by-template"
# Each reaches for Python objects or for output that grows without bound.
HOSTILE = [
    "{{ cycler.__init__.__globals__.os.popen('touch " + PWNED + "').read() }}",
    "{{ recipient.__class__.__mro__[1].__subclasses__() }}",
    "{{ recipient['__class__'] }}",
    "{{ recipient.name.__class__ }}",
    "{{ recipient.items() }}",
    "{{ lipsum() }}",
    "{{ range(10) }}",
    "{% for i in recipient.name %}{{ i }}{% endfor %}",
    "{% set x = 1 %}",
    "{{ recipient.name * 1000000000 }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ recipient.name | replace('', 'aaaaaaaaaa') | replace('', 'aaaaaaaaaa') }}",
    "{{ recipient.name | join('aaaa') }}",
    "{{ recipient.name | attr('upper') }}",
    "{{ self }}",
    "{% include 'base.mjml.j2' %}",
    "{% macro m() %}{% endmacro %}",
]


@pytest.mark.parametrize("snippet", HOSTILE)
@pytest.mark.parametrize("where", ["subject", "heading", "text"])
def test_hostile_merge_field_is_a_validation_error(project: Project, snippet: str,
                                                   where: str) -> None:
    text = GOOD
    if where == "subject":
        text = text.replace('"Hallo {{ recipient.name }}"', repr(snippet))
    elif where == "heading":
        text = text.replace('"Liebe Freundinnen und Freunde"', repr(snippet))
    else:
        text = text.replace('"Das **FORUM INTEGRATION** lädt ein."', repr(snippet))
    project.campaign("evil.yaml", text)
    result = mailer_cli(project, "validate", "campaigns/evil.yaml")
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    line = {"subject": 5, "heading": 7, "text": 8}[where]
    assert "evil.yaml" in first and f"line {line}" in first, first
    assert not (project.root / PWNED).exists()


def test_allowed_merge_fields_filters_and_conditions_still_work(project: Project) -> None:
    snippet = ("{% if recipient.name %}Liebe {{ recipient.name | title }}{% else %}Hallo"
               "{% endif %} ({{ recipient.email | lower | truncate(40) }}, "
               "{{ recipient.organisation | default('Dortmund') ~ '!' }})")
    project.campaign("ok.yaml", GOOD.replace('"Liebe Freundinnen und Freunde"', repr(snippet)))
    checked = check_campaign(project.root / "campaigns" / "ok.yaml", project.settings())
    lr = checked.rendition.for_language("de")
    out = personalise(lr, Recipient("Anna@Example.org", "anna yilmaz", "de", list="partners"),
                      SAMPLE_LINKS)
    assert "Liebe Anna Yilmaz (anna@example.org, Dortmund!)" in out.text


def test_sandbox_refuses_at_render_time_too(project: Project) -> None:
    """A template that slipped past validation still cannot reach Python objects."""
    import jinja2

    from mailer.render import _stage2

    env = _stage2(False)
    for source in ("{{ recipient.__class__ }}", "{{ recipient.items() }}", "{{ range(3) }}"):
        with pytest.raises(jinja2.TemplateError):
            env.from_string(source).render(recipient={"name": "x"})
    assert env.from_string("{{ recipient.items }}").render(recipient={"items": "ok"}) == "ok"


def test_archive_page_never_runs_a_campaign_template(project: Project) -> None:
    """The public archive re-renders campaigns; a hostile subject is refused there as well."""
    from mailer.campaign import load_campaign
    from mailer.render import render_campaign

    path = project.campaign("evil.yaml", GOOD.replace(
        '"Hallo {{ recipient.name }}"', repr(HOSTILE[0])))
    campaign = load_campaign(path, project.settings())
    with pytest.raises(CampaignError, match="calling a function is not allowed"):
        render_campaign(campaign, project.settings())
    assert not (project.root / PWNED).exists()


# --- attachments ----------------------------------------------------------------------------


def attach(project: Project, name: str) -> Path:
    return project.campaign("att.yaml", GOOD + f"attachments: [{name!r}]\n")


@pytest.mark.parametrize("name", ["/etc/passwd", "../config.yaml", "../../../../etc/hostname",
                                  "/proc/self/environ", "files/../../config.yaml"])
def test_attachment_outside_the_campaign_folder_is_refused(project: Project, name: str) -> None:
    (project.root / "campaigns" / "files").mkdir()
    attach(project, name)
    result = mailer_cli(project, "validate", "campaigns/att.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "att.yaml, line 9" in result.stderr
    assert "outside the campaign's folder" in result.stderr or "does not exist" in result.stderr


def test_symlink_pointing_out_is_refused(project: Project) -> None:
    files = project.root / "campaigns" / "files"
    files.mkdir()
    (files / "flyer.pdf").symlink_to(project.config)
    attach(project, "files/flyer.pdf")
    with pytest.raises(CampaignError, match="outside the campaign's folder"):
        check_campaign(project.root / "campaigns" / "att.yaml", project.settings(),
                       with_audience=False)


def test_symlink_inside_the_folder_and_regular_file_are_attached(project: Project) -> None:
    files = project.root / "campaigns" / "files"
    files.mkdir()
    (files / "flyer-2026.pdf").write_bytes(b"%PDF-1.4 flyer")
    (files / "flyer.pdf").symlink_to("flyer-2026.pdf")
    attach(project, "files/flyer.pdf")
    checked = check_campaign(project.root / "campaigns" / "att.yaml", project.settings(),
                             with_audience=False)
    (att,) = [a for a in checked.rendition.attachments if a.filename == "flyer.pdf"]
    assert att.data == b"%PDF-1.4 flyer" and att.content_type == "application/pdf"


def test_fifo_and_directory_are_not_attachments(project: Project) -> None:
    files = project.root / "campaigns" / "files"
    files.mkdir()
    os.mkfifo(files / "pipe")
    for name in ("files/pipe", "files"):
        attach(project, name)
        with pytest.raises(CampaignError, match="not a regular file|outside"):
            check_campaign(project.root / "campaigns" / "att.yaml", project.settings(),
                           with_audience=False)


def test_size_cap_counts_what_is_read(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import campaign as campaign_module

    monkeypatch.setattr(campaign_module, "MAX_ATTACHMENTS_BYTES", 1000)
    files = project.root / "campaigns" / "files"
    files.mkdir()
    (files / "a.txt").write_bytes(b"x" * 600)
    (files / "b.txt").write_bytes(b"y" * 600)
    project.campaign("att.yaml", GOOD + "attachments: [files/a.txt, files/b.txt]\n")
    with pytest.raises(CampaignError, match="add up to more than"):
        check_campaign(project.root / "campaigns" / "att.yaml", project.settings(),
                       with_audience=False)


def test_attachment_name_cannot_break_its_header(project: Project) -> None:
    import email
    import email.policy

    from mailer.compose import Composer
    from mailer.tokens import Tokens

    files = project.root / "campaigns" / "files"
    files.mkdir()
    name = 'Über-Flyer "neu"; x=\\y.pdf'
    (files / name).write_bytes(b"%PDF-1.4")
    project.campaign("att.yaml", GOOD + "attachments: ['files/Über-Flyer \"neu\"; x=\\y.pdf']\n")
    settings = project.settings()
    checked = check_campaign(project.root / "campaigns" / "att.yaml", settings,
                             with_audience=False)
    data = Composer(checked.rendition, settings, tokens=Tokens(settings.secret())).compose(
        Recipient("a@example.org", "A", "de", list="partners"), message_id="<1@x.example.org>"
    ).data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    (att,) = [p for p in msg.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert att.get_filename() == name and att.get_content() == b"%PDF-1.4"


@pytest.mark.parametrize("content", [
    'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
    'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n',
    "de: [1, 2]\n", "de: {unsubscribe: [x]}\n", "de: {a: b\n"])
def test_a_bad_strings_file_is_one_sentence(project: Project, content: str) -> None:
    (project.root / "templates" / "strings.yaml").write_text(content, encoding="utf-8")
    project.campaign("good.yaml", GOOD)
    result = mailer_cli(project, "validate", "campaigns/good.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "strings.yaml" in result.stderr.strip().splitlines()[0], result.stderr


# --- stage 2's short cut ----------------------------------------------------------------------

PLAIN = ("Hallo {{ recipient.name }} <{{ recipient.email }}> aus {{ recipient.organisation }}, "
         "{{ recipient.name }}: {{ links.unsubscribe }} {% if recipient.organisation %}für "
         "{{ recipient.organisation }}{% if recipient.name %}, {{ recipient.name }}{% endif %}"
         "{% else %}privat ({{ recipient.language }}){% endif %}.")


def _plain(project: Project) -> LangRendition:
    """A campaign whose stage-2 templates are literal text and plain merge fields only."""
    text = GOOD.replace('"Liebe Freundinnen und Freunde"', repr(PLAIN)).replace(
        "{{ recipient.name }}", "{{ recipient.name }} {{ recipient.organisation }}", 1)
    project.campaign("plain.yaml", text)
    checked = check_campaign(project.root / "campaigns" / "plain.yaml", project.settings(),
                             with_audience=False)
    return checked.rendition.for_language("de")


def _by_jinja(lr: LangRendition, values: dict[str, object]) -> tuple[object, ...]:
    """What jinja's own code makes of `values` (the short cut switched off), or its error."""
    templates = (lr.html, lr.text, lr.subject)
    plans = [t._plan for t in templates]  # type: ignore[attr-defined]
    for t in templates:
        t._plan = None  # type: ignore[attr-defined]
    try:
        return _outcome(lr, values)
    finally:
        for t, plan in zip(templates, plans, strict=True):
            t._plan = plan  # type: ignore[attr-defined]


def _outcome(lr: LangRendition, values: dict[str, object]) -> tuple[object, ...]:
    try:
        p = personalise_pieces(lr, values, SAMPLE_LINKS)
    except jinja2.UndefinedError as exc:
        return ("error", exc.message)
    # the pieces one by one, with their types: a Markup piece is not a str piece to jinja
    return (p.subject, [(type(x), x) for x in p.html], [(type(x), x) for x in p.text])


MERGE_VALUES = st.one_of(st.text(max_size=30), st.sampled_from(["<b>&\"'", "a\r\nb", "{{ x }}"]),
                         st.integers(), st.none(), st.builds(Markup, st.text(max_size=5)))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=MERGE_VALUES, email=st.text(max_size=20), organisation=MERGE_VALUES,
       drop=st.sampled_from(["", "organisation", "name"]))
def test_the_short_cut_yields_what_jinja_yields(project: Project, name: object, email: str,
                                                organisation: object, drop: str) -> None:
    lr = getattr(project, "_plain_lr", None) or _plain(project)
    project._plain_lr = lr  # type: ignore[attr-defined]
    assert all(t._plan is not None for t in (lr.html, lr.text, lr.subject))  # type: ignore[attr-defined]
    values = {"name": name, "email": email, "language": "de", "organisation": organisation}
    values.pop(drop, None)
    assert _outcome(lr, values) == _by_jinja(lr, values)


def test_the_short_cut_is_taken_for_plain_fields_and_only_for_them(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    lr = _plain(project)
    person = Recipient("anna@example.org", "Anna <A&B>", "de", fields={"organisation": "Hörde"})
    expected = personalise(lr, person, SAMPLE_LINKS)
    assert "Hallo Anna &lt;A&amp;B&gt; &lt;anna@example.org&gt; aus Hörde" in expected.html
    assert "für Hörde, Anna &lt;A&amp;B&gt;." in expected.html
    assert "Hallo Anna <A&B> <anna@example.org> aus Hörde, Anna <A&B>: " in expected.text
    assert "für Hörde, Anna <A&B>." in expected.text
    assert expected.subject == "Hallo Anna <A&B> Hörde"

    def no_jinja(*args: object, **kwargs: object) -> None:
        raise AssertionError("jinja's own code ran")

    monkeypatch.setattr(jinja2.Template, "generate", no_jinja)
    monkeypatch.setattr(jinja2.Template, "render", no_jinja)
    assert personalise(lr, person, SAMPLE_LINKS) == expected
    nobody = Recipient("anna@example.org", "", "de", fields={"organisation": ""})
    assert "aus , : " in personalise(lr, nobody, SAMPLE_LINKS).text
    assert " privat (de)." in personalise(lr, nobody, SAMPLE_LINKS).text
    # Its own text comes as the objects the compose memo is keyed by.
    for template in (lr.html, lr.text):
        memo = static_text(template)
        assert all(any(piece is known for known in memo)
                   for piece in template.literal_pieces)  # type: ignore[attr-defined]
    # A value that is not a string is jinja's to convert.
    with pytest.raises(AssertionError, match="jinja's own code ran"):
        personalise(lr, {"name": 7, "email": "a@example.org", "language": "de",
                         "organisation": "x"}, SAMPLE_LINKS)


@pytest.mark.parametrize("source", [
    "{{ recipient.name | upper }}", "{{ 'a' }}", "{% if not recipient.name %}x{% endif %}",
    "{% if recipient.name %}x{% elif recipient.email %}y{% endif %}",
    "{% if recipient.name == 'x' %}x{% endif %}", "{% if recipient.name %}{{ 1 }}{% endif %}",
    "{% if recipient.name %}x{% else %}{{ recipient.name | e }}{% endif %}",
    "{{ recipient['name'] }}", "{{ recipient.name ~ 'x' }}", "{{ recipient }}",
    "{{ recipient.name.first }}", "{{ recipient.name if recipient.name else 'x' }}",
    "{% raw %}{% endraw %}{{ '{% endraw %}' }}", "{{ cycler.x }}",
])
def test_anything_beyond_plain_fields_goes_through_jinja(source: str) -> None:
    from mailer.render import _plan, _stage2

    assert _plan(_stage2(False).parse(source)) is None
    assert _plan(_stage2(False).parse("a{{ recipient.name }}b{{ links.x }}{{ recipient.name }}")
                 ) == (("a", 0, "b", 1, 0), (("recipient", "name"), ("links", "x")))
    joined = "{% raw %}a{% endraw %}{% raw %}b{% endraw %}{{ recipient.name }}"
    assert _plan(_stage2(False).parse(joined)) == (("ab", 0), (("recipient", "name"),))
    branch = ("a{% if recipient.name %}b{{ links.x }}{% else %}c{% endif %}d"
              "{% if links.x %}{% endif %}")
    assert _plan(_stage2(False).parse(branch)) == (
        ("a", (0, ("b", 1), ("c",)), "d", (1, (), ())),
        (("recipient", "name"), ("links", "x")))
    template = _stage2(False).from_string(branch)
    template._plan = _plan(_stage2(False).parse(branch))  # type: ignore[attr-defined]
    assert sorted(template.literal_pieces) == ["a", "b", "c", "d"]  # type: ignore[attr-defined]


def test_the_short_cut_keeps_jinjas_calling_conventions(project: Project) -> None:
    """Keyword arguments (as the preview passes them), keywords over a mapping, and values
    that are not mappings behave as jinja's own `render` and `generate` make them behave."""
    lr = _plain(project)
    template = lr.subject  # "Hallo {{ recipient.name }} {{ recipient.organisation }}"
    assert template._plan is not None  # type: ignore[attr-defined]
    anna = {"name": "Anna", "organisation": "IMAG"}
    assert template.render(recipient=anna, links={}) == "Hallo Anna IMAG"
    assert "".join(template.generate(recipient=anna)) == "Hallo Anna IMAG"
    bert = {"name": "Bert", "organisation": "DGB"}
    assert template.render({"recipient": anna}, recipient=bert) == "Hallo Bert DGB"
    assert "".join(template.generate({"recipient": anna}, recipient=bert)) == "Hallo Bert DGB"
    for odd in ("Anna", None, ["Anna"]):
        with pytest.raises(jinja2.UndefinedError):
            template.render({"recipient": odd})
    with pytest.raises(jinja2.UndefinedError):
        template.render()


# What staff may write, decided on the parsed snippet (in-process: `validate` runs it too, in a
# subprocess the mutation run cannot see into).
LIMITS = "campaign text may only use merge fields such as {{ recipient.name }}, filters such " \
         "as {{ recipient.name | default('Freundinnen und Freunde') }} and {% if %}"


@pytest.mark.parametrize(("snippet", "problem"), [
    ("{{ recipient['__class__'] }}", "'__class__' is not a merge field"),
    ("{{ recipient.name.__class__ }}", "'__class__' is not a merge field"),
    ("{{ recipient['_x'] }}", "'_x' is not a merge field"),
    ("{{ recipient[name] }}", "'name' is not a merge field (use recipient.<column>)"),
    ("{{ recipient.name | attr('upper') }}", "the filter 'attr' is not available in campaigns "
     "(available: capitalize, d, default, e, escape, first, last, length, lower, title, trim, "
     "truncate, upper)"),
    ("{% if recipient.name is callable %}x{% endif %}",
     "the test 'callable' is not available in campaigns"),
    ("{{ recipient.name * 3 }}", f"multiplying is not allowed: {LIMITS}"),
    ("{% filter upper %}x{% endfilter %}", f"'filterblock' is not allowed: {LIMITS}"),
    ("{% if recipient.name is string %}{{ recipient['name'][0] }}{% endif %}", None),
    ("{{ recipient['x_y'] | default('a') }}", None),
])
def test_staff_template_problem_names_what_is_refused(snippet: str, problem: str | None) -> None:
    from mailer.render import _stage2, staff_template_problem

    assert staff_template_problem(_stage2(False).parse(snippet)) == problem


def test_the_sandbox_reads_keys_and_characters_and_nothing_else() -> None:
    from types import MappingProxyType

    from mailer.render import _stage2

    env = _stage2(False)

    def render(source: str, recipient: object) -> str:
        return env.from_string(source).render(recipient=recipient)

    anna = {"name": "Anna", "items": "ok"}
    assert render("{{ recipient['name'] }}|{{ recipient.items }}", anna) == "Anna|ok"
    assert render("{{ recipient.name }}", MappingProxyType(anna)) == "Anna"
    assert render("{{ recipient['name'] }}", MappingProxyType(anna)) == "Anna"
    chars = "{{ recipient.name[0] }}|{{ recipient.name[-1] }}|{{ recipient.name[1:3] }}|" \
            "{{ recipient.name[4] }}|{{ recipient.name[-5] }}|{{ recipient.name[-4] }}"
    assert render(chars, anna) == "A|a|nn|||A"
    assert render("{{ recipient.name[0] }}", {"name": ""}) == ""
    vorname = "'dict object' has no attribute 'vorname'"
    for source, missing in [("{{ recipient.vorname }}", vorname),
                            ("{{ recipient['vorname'] }}", vorname),
                            ("{{ recipient[0] }}", "dict object has no element 0"),
                            ("{{ recipient.name['x'] }}", "'str object' has no attribute 'x'"),
                            ("{{ recipient.name[0][0].x }}", "'str object' has no attribute 'x'")]:
        with pytest.raises(jinja2.UndefinedError) as caught:
            render(source, anna)
        assert caught.value.message == missing, source
