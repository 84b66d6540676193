"""Campaign → Rendition: Jinja2 → MJML → HTML once per language, plus a real text part.

Rendering happens in two stages. Stage 1 (once per campaign × language) renders the layout and
compiles MJML; every Jinja snippet staff wrote in a field ({{ recipient.name }}, {% if … %}) and
every per-recipient link is replaced by an opaque placeholder first, so Markdown, escaping and
MJML cannot mangle it. The compiled HTML and the text part then become small stage-2 templates
in which only the placeholders are live; per recipient only those are filled in.
"""

from __future__ import annotations

import functools
import re
import textwrap
import types
import unicodedata
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import jinja2
from babel.dates import format_date, format_time
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from mjml import mjml2html

from . import htmlcraft
from .audience import Recipient
from .campaign import RTL_LANGUAGES, Campaign, Event, read_attachments, resolve_local
from .config import Settings
from .errors import CampaignError, TemplateError
from .yamlsrc import load_yaml

PLACEHOLDER = "Mf7q{}q7fM"
PLACEHOLDER_RE = re.compile(r"Mf7q(\d+)q7fM")
SNIPPET_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
TIME_SUFFIX = {"de": " Uhr"}
TEXT_WIDTH = 76
LINK_NAMES = ("unsubscribe", "preferences", "view_online")


@dataclass(frozen=True, slots=True)
class Links:
    unsubscribe: str
    preferences: str
    view_online: str


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class LangRendition:
    lang: str
    dir: str
    subject: jinja2.Template
    html: jinja2.Template
    text: jinja2.Template
    static_subject: str | None  # the subject when it has no merge fields
    # Each part's transfer encoding, decided once per language: Arabic HTML is mostly ASCII
    # markup (quoted-printable), its text part is not (base64).
    html_mostly_ascii: bool = True
    text_mostly_ascii: bool = True
    calendar: tuple[Attachment, ...] = ()  # this language's .ics entries


@dataclass(frozen=True)
class Rendition:
    campaign: Campaign
    languages: dict[str, LangRendition]
    attachments: tuple[Attachment, ...]

    def for_language(self, language: str) -> LangRendition:
        """The recipient's language when the campaign has it, else the default (first)."""
        if language in self.languages:
            return self.languages[language]
        base = language.split("-")[0]
        return self.languages.get(base) or self.languages[self.campaign.default_language]


@dataclass(frozen=True, slots=True)
class Personalised:
    lang: str
    subject: str
    html: str
    text: str


@dataclass(frozen=True, slots=True)
class Pieces:
    """A personalised message as its templates yield it, piece by piece: the template's own
    text comes as the same string objects for every recipient, each merge value as its own
    piece (compose encodes the first once and only the second per recipient)."""

    lang: str
    subject: str
    html: list[str]
    text: list[str]


# --- stage 2: the per-recipient templates -------------------------------------------------


# What staff may write in a campaign field: merge fields, a few filters, {% if %}. Anything that
# could reach Python objects, loop, call or multiply output is refused at validation time, and
# the sandbox below refuses it again at render time.
STAFF_NAMES = frozenset({"recipient", "links"})
STAFF_FILTERS = frozenset({"capitalize", "d", "default", "e", "escape", "first", "last", "length",
                           "lower", "title", "trim", "truncate", "upper"})
STAFF_TESTS = frozenset({"defined", "undefined", "none", "string", "number", "eq", "ne",
                         "equalto", "in", "lower", "upper"})
_STAFF_NODES = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.Name,
                nodes.Getattr, nodes.Getitem, nodes.Const, nodes.Filter, nodes.Test,
                nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.CondExpr,
                nodes.Concat, nodes.Keyword)


_NODE_WORDS = {"Call": "calling a function", "For": "a loop ({% for %})",
               "Assign": "{% set %}", "AssignBlock": "{% set %}", "Macro": "a macro",
               "Include": "{% include %}", "Import": "{% import %}", "Extends": "{% extends %}",
               "Mul": "multiplying", "Pow": "'**'", "Mod": "'%' formatting"}


class _StaffSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox narrowed to mappings: `recipient.name` reads a key, never an attribute."""

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False

    def is_safe_callable(self, obj: Any) -> bool:
        return False

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `type(...) is dict` first: the ABC check costs more than the lookup, per merge field
        if (type(obj) is dict or isinstance(obj, Mapping)) and attribute in obj:
            return obj[attribute]
        return self.undefined(obj=obj, name=attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Mapping):
            return self.getattr(obj, argument) if isinstance(argument, str) else \
                self.undefined(obj=obj, name=argument)
        if isinstance(obj, str) and isinstance(argument, int | slice):
            # `recipient.name[0]` of an empty name is empty, not a crash in the middle of a run
            inside = isinstance(argument, slice) or -len(obj) <= argument < len(obj)
            return obj[argument] if inside else ""
        return self.undefined(obj=obj, name=argument)


# The short cut of a stage-2 template: its steps — its own text, the index of a merge field in
# `fields`, or an {% if field %} as (field, steps if true, steps if not) — and the distinct
# merge fields it reads, as (name, key).
_Step: TypeAlias = str | int | tuple[int, tuple["_Step", ...], tuple["_Step", ...]]
_Plan = tuple[tuple[_Step, ...], tuple[tuple[str, str], ...]]


class Stage2Template(jinja2.Template):
    """A stage-2 template with a short cut for the common case. When the template is literal
    text, plain merge fields (`{{ recipient.name }}`, `{{ links.unsubscribe }}`) and
    `{% if recipient.name %} … {% else %} … {% endif %}`, and every field it reads holds a
    string, it yields what jinja's own code yields — the same literal pieces, each value escaped
    where the template autoescapes — without a render context, a sandbox call per field or a
    generator, and reads (and escapes) a field used ten times once. Anything else (a filter, a
    comparison, a missing field, a value that is not a string, keyword arguments) goes through
    jinja, which also raises its errors."""

    _plan: _Plan | None = None

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        pieces = self._fill(args, kwargs)
        return iter(pieces) if pieces is not None else super().generate(*args, **kwargs)

    def render(self, *args: Any, **kwargs: Any) -> str:
        pieces = self._fill(args, kwargs)
        return "".join(pieces) if pieces is not None else super().render(*args, **kwargs)

    def _fill(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str] | None:
        if self._plan is None or kwargs or len(args) != 1 or type(args[0]) is not dict:
            return None
        steps, fields = self._plan
        values = args[0]
        html = self.environment.autoescape is True
        filled: list[str] = []
        for name, key in fields:
            scope = values.get(name)
            value = scope.get(key) if type(scope) is dict else None
            if type(value) is not str:
                return None
            filled.append(escape(value) if html else value)
        out: list[str] = []
        _expand(steps, filled, out)
        return out

    @property
    def literal_pieces(self) -> tuple[str, ...]:
        """The template's own text as the short cut yields it (empty without one)."""
        found: list[str] = []
        todo = list(self._plan[0]) if self._plan else []
        while todo:
            step = todo.pop()
            if type(step) is str:
                found.append(step)
            elif type(step) is tuple:
                todo += [*step[1], *step[2]]
        return tuple(found)


def _expand(steps: tuple[_Step, ...], filled: list[str], out: list[str]) -> None:
    for step in steps:
        if isinstance(step, str):
            out.append(step)
        elif isinstance(step, int):
            out.append(filled[step])
        else:
            test, then, otherwise = step
            _expand(then if filled[test] else otherwise, filled, out)  # escaping keeps truth


def _plan(ast: nodes.Template) -> _Plan | None:
    """The short cut of a template, or None when it uses more than it covers."""
    fields: dict[tuple[str, str], int] = {}
    steps = _steps(ast.body, fields, {})
    return None if steps is None else (steps, tuple(fields))


def _steps(body: list[nodes.Node], fields: dict[tuple[str, str], int], texts: dict[str, str]
           ) -> tuple[_Step, ...] | None:
    # Adjacent text is joined, as jinja's code generator joins it into one piece; text on
    # either side of an {% if %} stays apart, as jinja yields it. Equal texts become one
    # object (`texts`), which the compose memo then finds by identity.
    steps: list[_Step] = []
    for node in body:
        if type(node) is nodes.If and not node.elif_:
            test = _field(node.test, fields)
            then = _steps(node.body, fields, texts)
            otherwise = _steps(node.else_, fields, texts)
            if test is None or then is None or otherwise is None:
                return None
            steps.append((test, then, otherwise))
            continue
        if type(node) is not nodes.Output:
            return None
        for child in node.nodes:
            if type(child) is nodes.TemplateData:
                last = steps[-1] if steps else None
                if type(last) is str:
                    steps[-1] = last + child.data
                elif child.data:
                    steps.append(child.data)
                continue
            index = _field(child, fields)
            if index is None:
                return None
            steps.append(index)
    return tuple(texts.setdefault(step, step) if isinstance(step, str) else step
                 for step in steps)


def _field(node: nodes.Node, fields: dict[tuple[str, str], int]) -> int | None:
    """The index of `recipient.x` or `links.x` in `fields` (added if new), else None."""
    if (type(node) is nodes.Getattr and type(node.node) is nodes.Name
            and node.node.name in STAFF_NAMES and node.ctx == "load"):
        return fields.setdefault((node.node.name, node.attr), len(fields))
    return None


@functools.cache
def _stage2(autoescape: bool) -> jinja2.Environment:
    env = _StaffSandbox(
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # Comments are never ours; move their delimiters out of the way of CSS like `{#id`.
        comment_start_string="{#\x00",
        comment_end_string="\x00#}",
    )
    env.globals.clear()
    env.filters = {k: v for k, v in env.filters.items() if k in STAFF_FILTERS}
    env.tests = {k: v for k, v in env.tests.items() if k in STAFF_TESTS}
    env.template_class = Stage2Template
    return env


def staff_template_problem(ast: nodes.Template) -> str | None:
    """Why a parsed staff snippet reaches past merge fields, or None when it does not."""
    for node in ast.find_all(nodes.Node):
        if isinstance(node, nodes.Name) and node.name not in STAFF_NAMES:
            return f"'{node.name}' is not a merge field (use recipient.<column>)"
        if isinstance(node, nodes.Getattr | nodes.Getitem):
            attr = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", "")
            if isinstance(attr, str) and attr.startswith("_"):
                return f"'{attr}' is not a merge field"
        if isinstance(node, nodes.Filter) and node.name not in STAFF_FILTERS:
            return (f"the filter '{node.name}' is not available in campaigns (available: "
                    f"{', '.join(sorted(STAFF_FILTERS))})")
        if isinstance(node, nodes.Test) and node.name not in STAFF_TESTS:
            return f"the test '{node.name}' is not available in campaigns"
        if not isinstance(node, _STAFF_NODES):
            what = _NODE_WORDS.get(type(node).__name__, f"'{type(node).__name__.lower()}'")
            return (f"{what} is not allowed: campaign text may only use merge "
                    "fields such as {{ recipient.name }}, filters such as "
                    "{{ recipient.name | default('Freundinnen und Freunde') }} and {% if %}")
    return None


class Snippets:
    """Collects staff-written Jinja snippets and hands out placeholders for them."""

    def __init__(self, campaign: Campaign) -> None:
        self.campaign = campaign
        self.sources: list[str] = []
        self.locs: list[tuple[str | int, ...]] = []

    def protect(self, text: str, loc: tuple[str | int, ...]) -> str:
        self._check_syntax(text, loc)

        def swap(match: re.Match[str]) -> str:
            self.sources.append(match.group(0))
            self.locs.append(loc)
            return PLACEHOLDER.format(len(self.sources) - 1)

        return SNIPPET_RE.sub(swap, text)

    def link(self, name: str) -> str:
        self.sources.append(f"{{{{ links.{name} }}}}")
        self.locs.append(())
        return PLACEHOLDER.format(len(self.sources) - 1)

    def _check_syntax(self, text: str, loc: tuple[str | int, ...]) -> None:
        if "{" not in text:
            return
        try:
            ast = _stage2(False).parse(text)
        except jinja2.TemplateSyntaxError as exc:
            raise self.campaign.error(
                f"merge field syntax error: {exc.message} (write merge fields like "
                "{{ recipient.name }})",
                *loc,
            ) from None
        problem = staff_template_problem(ast)
        if problem:
            raise self.campaign.error(problem, *loc)

    def template(self, compiled: str, *, autoescape: bool) -> jinja2.Template:
        return self.compile(_stage2_source(compiled, self.sources), (), autoescape=autoescape)

    def compile(self, source: str, loc: tuple[str | int, ...], *,
                autoescape: bool) -> jinja2.Template:
        """Compile what will actually run, checking it once more as a whole."""
        env = _stage2(autoescape)
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            raise self.campaign.error(f"merge field syntax error: {exc.message}", *loc) from None
        problem = staff_template_problem(ast)
        if problem:
            raise self.campaign.error(problem, *loc)
        plan = _plan(ast)  # before compiling: jinja's optimiser may rewrite the tree
        template = env.from_string(ast)
        assert isinstance(template, Stage2Template)
        template._plan = plan
        return template


def _stage2_source(compiled: str, sources: list[str]) -> str:
    """Compiled HTML or text as a stage-2 template: literal everywhere, except that each
    placeholder becomes the Jinja source it stands for."""
    parts: list[str] = []
    last = 0
    for match in PLACEHOLDER_RE.finditer(compiled):
        parts.append(_raw(compiled[last : match.start()]))
        parts.append(sources[int(match.group(1))])
        last = match.end()
    parts.append(_raw(compiled[last:]))
    return "".join(parts)


def _raw(literal: str) -> str:
    if not literal:
        return ""
    escaped = literal.replace("{% endraw %}", "{% endraw %}{{ '{% endraw %}' }}{% raw %}")
    return "{% raw %}" + escaped + "{% endraw %}"


# --- stage 1 --------------------------------------------------------------------------------


@functools.cache
def _stage1(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _strings(templates_dir: Path) -> dict[str, dict[str, str]]:
    path = templates_dir / "strings.yaml"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return {"de": {}}
    return _read_strings(path, stamp)  # keyed by mtime: a running `mailer run` sees edits


@functools.lru_cache(maxsize=8)
def _read_strings(path: Path, stamp: int) -> dict[str, dict[str, str]]:
    located = load_yaml(path, error=TemplateError)
    data = located.data or {}
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
            for v in data.values()):
        raise TemplateError("strings.yaml must map each language to texts, e.g. "
                            "de: {unsubscribe: Abmelden}", path=path, line=1)
    return {str(k): {str(n): t for n, t in v.items()} for k, v in data.items()}


def ui_strings(settings: Settings, lang: str) -> dict[str, str]:
    strings = _strings(settings.templates_dir)
    return {**strings.get("de", {}), **strings.get(lang, {})}


_markdown = MarkdownIt("commonmark", {"html": False, "typographer": False}).enable("strikethrough")


def render_campaign(campaign: Campaign, settings: Settings) -> Rendition:
    languages = {lang: _render_language(campaign, settings, lang) for lang in campaign.languages}
    return Rendition(
        campaign=campaign,
        languages=languages,
        attachments=tuple(_attachments(campaign, settings)),
    )


def _render_language(campaign: Campaign, settings: Settings, lang: str) -> LangRendition:
    snippets = Snippets(campaign)
    content = campaign.content[lang]
    loc: tuple[str | int, ...] = ("content", lang)
    t = ui_strings(settings, lang)
    blocks = [
        _block_context(campaign, settings, lang, i, b.kind, b.value, snippets, (*loc, "blocks", i))
        for i, b in enumerate(content.blocks)
    ]
    links = {name: snippets.link(name) for name in LINK_NAMES}
    org = settings.organisation.model_dump()
    context: dict[str, Any] = {
        "lang": lang,
        "dir": "rtl" if lang.split("-")[0] in RTL_LANGUAGES else "ltr",
        "subject": snippets.protect(content.subject, (*loc, "subject")),
        "preheader": snippets.protect(content.preheader, (*loc, "preheader")),
        "title": campaign.display_title,
        "blocks": blocks,
        "event": next((b for b in blocks if b["kind"] == "event"), None),
        "org": org,
        "links": links,
        "t": t,
        "campaign": {"id": campaign.id, "template": campaign.template},
        "sender": {"name": settings.sender.name, "address": settings.sender.address},
    }
    html = _compile(settings, campaign.template, context)
    text = text_part(context, org=org, t=t)
    subject_src = content.subject
    return LangRendition(
        lang=lang,
        dir=context["dir"],
        subject=snippets.compile(subject_src, (*loc, "subject"), autoescape=False),
        html=snippets.template(html, autoescape=True),
        text=snippets.template(text, autoescape=False),
        static_subject=None if "{" in subject_src else subject_src,
        html_mostly_ascii=mostly_ascii(html),
        text_mostly_ascii=mostly_ascii(text),
        calendar=tuple(_calendar(campaign, settings, lang)),
    )


def mostly_ascii(text: str) -> bool:
    """Quoted-printable triples every non-ASCII byte, base64 costs 4/3 of everything: QP wins
    while fewer than ~18 % of the UTF-8 bytes are non-ASCII (Latin scripts, not Arabic)."""
    data = text.encode("utf-8")
    return (len(data) - len(text.encode("ascii", "ignore"))) * 2 < 0.33 * len(data)


def _mrml_safe(source: str) -> str:
    """MRML (mjml-python 1.4) writes attribute values Rust-escaped: a backslash doubles and
    combining marks (Arabic shadda), no-break spaces and format characters become `\\u{…}`.
    Character references pass through unchanged, so write those characters as references."""
    return _MRML_UNSAFE.sub(lambda m: f"&#x{ord(m.group(0)):x};", source)


_MRML_UNSAFE = re.compile(
    "[\\\\\u00a0\u00ad\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061c"
    "\u064b-\u065f\u0670\u06d6-\u06ed\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\ufe00-\ufe0f\ufeff]"
)


def _compile(settings: Settings, template: str, context: dict[str, Any]) -> str:
    """Layout → MJML → HTML with landmarks, <body lang dir> and inlined text styles."""
    mjml_source = _mrml_safe(_render_layout(template, settings, context))
    try:
        html = mjml2html(mjml_source, disable_comments=True)
    except ValueError as exc:
        raise TemplateError(
            f"MJML did not compile for language '{context['lang']}': {exc} (check the layout "
            "and any HTML in the text blocks)",
            path=settings.templates_dir / f"{template}.mjml.j2",
        ) from None
    return htmlcraft.finish(html)


def _render_layout(template: str, settings: Settings, context: dict[str, Any]) -> str:
    name = f"{template}.mjml.j2"
    try:
        return _stage1(settings.templates_dir).get_template(name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}",
                            path=exc.filename or name, line=exc.lineno) from None
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"template '{exc.name}' not found", path=settings.templates_dir) \
            from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(
            f"the template uses an undefined variable: {exc.message}",
            path=settings.templates_dir / name,
            line=_template_line(exc),
        ) from None


def _template_line(exc: BaseException) -> int | None:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _block_context(
    campaign: Campaign,
    settings: Settings,
    lang: str,
    index: int,
    kind: str,
    value: Any,
    snippets: Snippets,
    loc: tuple[str | int, ...],
) -> dict[str, Any]:
    def p(text: str | None, *sub: str) -> str | None:
        return None if text is None else snippets.protect(text, (*loc, kind, *sub))

    if kind == "heading":
        return {"kind": kind, "index": index, "text": snippets.protect(value, (*loc, kind))}
    if kind == "text":
        source = snippets.protect(value, (*loc, kind))
        return {"kind": kind, "index": index, "html": Markup(_markdown.render(source)),
                "source": source}
    if kind == "image":
        return {"kind": kind, "index": index, "src": p(value.src, "src"),
                "alt": p(value.alt, "alt"),
                "href": p(value.href, "href"), "width": value.width}
    if kind == "button":
        return {"kind": kind, "index": index, "label": p(value.label, "label"),
                "url": p(value.url, "url")}
    if kind == "quote":
        return {"kind": kind, "index": index, "text": p(value.text, "text"),
                "author": p(value.author, "author")}
    if kind == "event":
        return _event_context(campaign, settings, lang, index, value, snippets, loc)
    return {"kind": kind, "index": index}


def _event_times(
    campaign: Campaign, settings: Settings, event: Event, loc: tuple[str | int, ...]
) -> tuple[datetime, datetime | None]:
    try:
        start = resolve_local(event.start, settings)
    except ValueError as exc:
        raise campaign.error(str(exc), *loc, "event", "start") from None
    try:
        end = resolve_local(event.end, settings) if event.end else None
    except ValueError as exc:
        raise campaign.error(str(exc), *loc, "event", "end") from None
    return start, end


def _event_context(
    campaign: Campaign,
    settings: Settings,
    lang: str,
    index: int,
    event: Event,
    snippets: Snippets,
    loc: tuple[str | int, ...],
) -> dict[str, Any]:
    start, end = _event_times(campaign, settings, event, loc)
    locale = lang.replace("-", "_")
    date = format_date(start.date(), format="full", locale=locale)
    suffix = TIME_SUFFIX.get(lang, "")
    time = format_time(start.time(), format="short", locale=locale)
    if end is not None and end.date() == start.date():
        time += " – " + format_time(end.time(), format="short", locale=locale)
    time += suffix
    if end is not None and end.date() != start.date():
        time += " – " + format_date(end.date(), format="long", locale=locale)
    where = ", ".join(x for x in (event.place, event.address) if x)
    description = source = None
    if event.description:
        source = snippets.protect(event.description, (*loc, "event", "description"))
        description = Markup(_markdown.render(source))
    return {
        "kind": "event",
        "index": index,
        "title": snippets.protect(event.title, (*loc, "event", "title")),
        "date": date,
        "time": time,
        "when": f"{date}{ui_strings(settings, lang).get('comma', ', ')}{time}",
        "place": snippets.protect(event.place, (*loc, "event", "place")),
        "address": event.address,
        "map_url": "https://www.openstreetmap.org/search?query=" + urllib.parse.quote(where),
        "ics_name": ics_name(event, _ordinal(campaign, lang, index), lang, settings)
        if event.calendar else None,
        "description": description,
        "description_source": source,
    }


def _ordinal(campaign: Campaign, lang: str, index: int) -> int:
    """The block at `index` is the n-th event of its language (the same event everywhere)."""
    return 1 + sum(b.kind == "event" for b in campaign.content[lang].blocks[:index])


def ics_name(event: Event, ordinal: int, lang: str, settings: Settings) -> str:
    """A safe ASCII file name from the event's title in that language: Turkish, Polish and
    Cyrillic letters transliterated; a script without Latin letters takes the language's word."""
    title = event.title.lower().translate(_TRANSLIT)
    title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", title).strip("-")
    if len(slug) > 50:  # whole words only
        slug = slug[:51].rsplit("-", 1)[0]
    if not re.search(r"[a-z]", slug):
        slug = ui_strings(settings, lang).get("calendar_file", "termin")
    return f"{slug}-{ordinal}.ics"


_TRANSLIT = str.maketrans({
    "ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "ı": "i", "ł": "l", "ø": "o", "æ": "ae",
    "đ": "d", "а": "a", "б": "b", "в": "v", "г": "g", "ґ": "g", "д": "d", "е": "e", "є": "ye",
    "ё": "yo", "ж": "zh", "з": "z", "и": "i", "і": "i", "ї": "yi", "й": "y", "к": "k",
    "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t", "у": "u",
    "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "shch", "ъ": "", "ы": "y",
    "ь": "", "э": "e", "ю": "yu", "я": "ya"})


# --- the text part --------------------------------------------------------------------------


def text_part(context: dict[str, Any], *, org: dict[str, Any], t: dict[str, str]) -> str:
    """A plain-text version that says what the HTML says: readable, not tag soup."""
    out: list[str] = []
    if context["preheader"]:
        out += [_wrap(context["preheader"]), ""]
    for block in context["blocks"]:
        out += list(_text_block(block, t)) + [""]
    out += ["-" * 40]
    if not context.get("transactional"):  # a system mail: the reader is not subscribed
        out += [f"{t.get('view_online', 'Online')}: {context['links']['view_online']}"]
        out += [f"{t.get('preferences', 'Preferences')}: {context['links']['preferences']}"]
        out += [f"{t.get('unsubscribe', 'Unsubscribe')}: {context['links']['unsubscribe']}", ""]
        if t.get("why"):
            out += [_wrap(t["why"]), ""]
    out += [t.get("impressum", "Impressum"), org["name"], org["department"], org["body"],
            org["street"], f"{org['postcode']} {org['city']}", org["email"]]
    out += [x for x in (org.get("website"), org.get("responsible") and
                        f"{t.get('responsible', 'V.i.S.d.P.')}: {org['responsible']}") if x]
    return "\n".join(out).rstrip() + "\n"


def _text_block(block: dict[str, Any], t: dict[str, str]) -> Iterator[str]:
    kind = block["kind"]
    if kind == "heading":
        yield block["text"]
        yield "=" * min(len(block["text"]), TEXT_WIDTH)
    elif kind == "text":
        yield markdown_to_text(block["source"]).rstrip()
    elif kind == "image":
        yield _labelled(f"[{block['alt']}]", block["href"])
    elif kind == "button":
        yield _labelled(block["label"], block["url"])
    elif kind == "quote":
        quoted = t.get("quote_open", "„") + block["text"] + t.get("quote_close", "“")
        yield _wrap(quoted, indent="  ")
        if block["author"]:
            yield f"  — {block['author']}"
    elif kind == "event":
        yield block["title"]
        yield f"{t.get('when', 'Wann')}: {block['when']}"
        yield f"{t.get('where', 'Wo')}: " + t.get("comma", ", ").join(
            x for x in (block["place"], block["address"]) if x)
        yield _labelled(t.get("map", "Karte"), block["map_url"])
        if block["ics_name"] and t.get("calendar_attached"):
            yield _wrap(t["calendar_attached"])
        if block["description_source"]:
            yield markdown_to_text(block["description_source"]).rstrip()
    elif kind == "divider":
        yield "* * *"


def _labelled(label: str, url: str | None) -> str:
    """'Label: URL' on one line when it fits, else the wrapped label and the URL below it."""
    if not url:
        return _wrap(label)
    if len(label) + 2 + len(url) <= TEXT_WIDTH:
        return f"{label}: {url}"
    return f"{_wrap(label)}\n{url}"


def _wrap(text: str, indent: str = "") -> str:
    return "\n".join(
        textwrap.fill(para, TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent,
                      break_long_words=False, break_on_hyphens=False)
        for para in text.split("\n")
    )


def markdown_to_text(source: str) -> str:
    """Markdown → plain text: paragraphs, '- ' lists, links as 'label: url'."""
    tokens = _markdown.parse(source)
    lines: list[str] = []
    prefix: list[str] = []
    counters: list[int | None] = []
    pending_item = ""
    for tok in tokens:
        if tok.type in ("bullet_list_open", "ordered_list_open"):
            ordered = tok.type == "ordered_list_open"
            counters.append(int(tok.attrGet("start") or 1) if ordered else None)
        elif tok.type in ("bullet_list_close", "ordered_list_close"):
            counters.pop()
            if not counters:
                lines.append("")
        elif tok.type == "list_item_open":
            n = counters[-1]
            pending_item = "- " if n is None else f"{n}. "
            if n is not None:
                counters[-1] = n + 1
        elif tok.type == "blockquote_open":
            prefix.append("> ")
        elif tok.type == "blockquote_close":
            prefix.pop()
        elif tok.type == "inline":
            text = _inline_text(tok.children or [])
            indent = "  " * max(len(counters) - 1, 0)
            lead = "".join(prefix) + indent
            first = lead + pending_item
            rest = lead + " " * len(pending_item)
            for i, para in enumerate(text.split("\n")):
                lines.append(textwrap.fill(
                    para, TEXT_WIDTH, initial_indent=first if i == 0 else rest,
                    subsequent_indent=rest, break_long_words=False, break_on_hyphens=False))
            pending_item = ""
        elif tok.type in ("paragraph_close", "heading_close") and not counters:
            lines.append("")
        elif tok.type in ("code_block", "fence"):
            lines += [("    " + line) for line in tok.content.rstrip("\n").split("\n")] + [""]
        elif tok.type == "hr":
            lines += ["* * *", ""]
    return "\n".join(lines).strip("\n") + "\n"


def _inline_text(children: list[Any]) -> str:
    out: list[str] = []
    href_stack: list[tuple[str, int]] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            out.append(child.content)
        elif child.type == "softbreak":
            out.append(" ")
        elif child.type == "hardbreak":
            out.append("\n")
        elif child.type == "link_open":
            href_stack.append((str(child.attrGet("href") or ""), len(out)))
        elif child.type == "link_close" and href_stack:
            href, start = href_stack.pop()
            label = "".join(out[start:])
            if href and href != label and href.removeprefix("mailto:") != label:
                out.append(f": {href}{_URL_END}")
        elif child.type == "image":
            out.append(f"[{child.content}]")
    return _delimit_urls("".join(out))


_URL_END = "\x00"


def _delimit_urls(text: str) -> str:
    """A URL directly followed by punctuation goes in angle brackets (RFC 3986 Appendix C):
    mail programs would take a trailing '.' or ')' into the link."""
    text = re.sub(r"(\S+)\x00(?=[^\s\x00])", r"<\1>", text)
    return text.replace(_URL_END, "")


# --- attachments ----------------------------------------------------------------------------


def _attachments(campaign: Campaign, settings: Settings) -> Iterator[Attachment]:
    import mimetypes

    for name, data in read_attachments(campaign):
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        yield Attachment(filename=name, content_type=ctype, data=data)


def _calendar(campaign: Campaign, settings: Settings, lang: str) -> Iterator[Attachment]:
    """One .ics per event of this language, in this language (SUMMARY, LOCATION, DESCRIPTION)."""
    for i, block in enumerate(campaign.content[lang].blocks):
        if block.kind != "event" or not block.value.calendar:
            continue
        ordinal = _ordinal(campaign, lang, i)
        start, end = _event_times(campaign, settings, block.value, ("content", lang, "blocks", i))
        data = ics(campaign, settings, block.value, ordinal=ordinal, lang=lang, start=start,
                   end=end)
        yield Attachment(filename=ics_name(block.value, ordinal, lang, settings),
                         content_type="text/calendar; charset=utf-8; method=PUBLISH", data=data)


def ics(
    campaign: Campaign, settings: Settings, event: Event, *, ordinal: int, lang: str,
    start: datetime, end: datetime | None,
) -> bytes:
    """An RFC 5545 VEVENT; times in UTC so no VTIMEZONE is needed. The UID is the same in every
    language (and, for an event with an `id`, in every campaign); SEQUENCE grows with each
    edit of the campaign file, so a calendar updates the entry instead of adding a second."""
    def utc(dt: datetime) -> str:
        return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")

    location = ", ".join(x for x in (event.place, event.address) if x)
    uid = f"event-{event.id}" if event.id else f"{campaign.id}-event-{ordinal}"
    link = event.url or f"{settings.base_url}/archive/{campaign.id}?lang={lang}"
    about = markdown_to_text(SNIPPET_RE.sub("", event.description)).strip() \
        if event.description else ""
    description = f"{about}\n\n{link}" if about else link
    organiser = settings.sender.name.replace('"', "'")
    lines = [
        "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//IMAG Dortmund//imag-mailer//DE",
        "CALSCALE:GREGORIAN", "METHOD:PUBLISH", "BEGIN:VEVENT",
        f"UID:{uid}@{settings.msgid_domain}",
        f"SEQUENCE:{_sequence(campaign)}",
        f"DTSTAMP:{utc(datetime.now(UTC))}",
        f"DTSTART:{utc(start)}",
    ]
    if end is not None:
        lines.append(f"DTEND:{utc(end)}")
    lines += [f"SUMMARY;LANGUAGE={lang}:{_ics_escape(event.title)}",
              f"LOCATION;LANGUAGE={lang}:{_ics_escape(location)}",
              f"DESCRIPTION;LANGUAGE={lang}:{_ics_escape(description)}",
              f"URL:{link}",
              f'ORGANIZER;CN="{organiser}":mailto:{settings.sender.address}',
              "END:VEVENT", "END:VCALENDAR"]
    return ("\r\n".join(_ics_fold(line) for line in lines) + "\r\n").encode("utf-8")


_EPOCH = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def _sequence(campaign: Campaign) -> int:
    """Minutes from 2026 to the campaign file's last edit: a later edit (or a later campaign
    announcing the same event) is a higher SEQUENCE, as RFC 5545 §3.8.7.4 asks of an update."""
    if campaign.source is None:
        return 0
    try:
        mtime = campaign.source.stat().st_mtime
    except OSError:
        return 0
    return max(0, int((mtime - _EPOCH) // 60))


def _ics_escape(value: str) -> str:
    value = SNIPPET_RE.sub("", value)
    return (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\n", "\\n"))


def _ics_fold(line: str) -> str:
    """RFC 5545 §3.1: lines longer than 75 octets are folded with CRLF + space."""
    data = line.encode("utf-8")
    if len(data) <= 75:
        return line
    parts: list[str] = []
    current = b""
    for ch in line:
        enc = ch.encode("utf-8")
        if len(current) + len(enc) > (75 if not parts else 74):
            parts.append(current.decode("utf-8"))
            current = b""
        current += enc
    parts.append(current.decode("utf-8"))
    return "\r\n ".join(parts)


# --- per recipient --------------------------------------------------------------------------


class Neutral(jinja2.Undefined):
    """A merge field where no one is addressed (the public archive): reads as `text`, and as
    missing to `default(…)` and `if`, so a campaign can say how its prose reads then."""

    __slots__ = ("_text",)

    def __init__(self, text: str = "") -> None:
        super().__init__(name="recipient")
        self._text = text

    def __str__(self) -> str:
        return self._text


def personalise_pieces(lr: LangRendition, recipient: Recipient | Mapping[str, object],
                      links: Links) -> Pieces:
    """Fill the stage-2 templates for one recipient (or a mapping of merge values)."""
    merged = recipient.merge() if isinstance(recipient, Recipient) else recipient
    values = {"recipient": merged, "links": {
        "unsubscribe": links.unsubscribe, "preferences": links.preferences,
        "view_online": links.view_online}}
    subject = lr.static_subject if lr.static_subject is not None else lr.subject.render(values)
    return Pieces(
        lang=lr.lang,
        subject=" ".join(subject.split()),
        html=list(lr.html.generate(values)),
        text=list(lr.text.generate(values)),
    )


def static_text(template: jinja2.Template) -> set[str]:
    """The text a stage-2 template yields as it is: the string constants of its compiled code,
    which `generate` hands out as the same objects every time. (Names and keys the code uses
    come along; they are short and cost nothing but a memo entry.)"""
    # The short cut's pieces first: they are the objects it yields, so a memo keyed by them
    # finds them by identity (a set keeps the first of two equal strings).
    found: set[str] = set(getattr(template, "literal_pieces", ()))
    codes = [template.root_render_func.__code__,
             *(f.__code__ for f in template.blocks.values())]
    while codes:
        for const in codes.pop().co_consts:
            if isinstance(const, str):
                found.add(const)
            elif isinstance(const, types.CodeType):
                codes.append(const)
    return found


def personalise(lr: LangRendition, recipient: Recipient | Mapping[str, object],
                links: Links) -> Personalised:
    """The personalised message as whole texts."""
    p = personalise_pieces(lr, recipient, links)
    return Personalised(lang=p.lang, subject=p.subject, html="".join(p.html),
                        text="".join(p.text))


SAMPLE_LINKS = Links("https://x.example.org/u", "https://x.example.org/p",
                     "https://x.example.org/v")  # for checks, never sent


def check_merge_fields(rendition: Rendition, sample: Recipient) -> None:
    """Render every language once for a sample recipient; name the field of a bad merge field."""
    links = SAMPLE_LINKS
    campaign = rendition.campaign
    for lang in rendition.languages.values():
        try:
            personalise(lang, sample, links)
        except jinja2.UndefinedError as exc:
            missing = re.findall(r"'([^']+)'$", exc.message or "")
            loc = _field_using(campaign, lang.lang, missing[0] if missing else "")
            raise campaign.error(
                f"merge field problem: {exc.message}; the lists of this campaign have the "
                f"columns {', '.join(sorted(sample.merge())) or 'email, name, language'}",
                *loc,
            ) from None
        except jinja2.TemplateError as exc:
            raise CampaignError(f"merge field problem in language '{lang.lang}': {exc}",
                                path=campaign.source) from None
        except (AssertionError, ValueError, TypeError, ArithmeticError) as exc:
            # A filter refusing its arguments, e.g. truncate(1) (shorter than its "..."):
            # say so, with the filter's own words, instead of "could not be checked".
            detail = str(exc) or type(exc).__name__
            raise CampaignError(f"merge field problem in language '{lang.lang}': a filter "
                                f"cannot work with these values ({detail}); check the filters' "
                                "arguments in the subject, preheader and text",
                                path=campaign.source) from None


def _field_using(campaign: Campaign, lang: str, name: str) -> tuple[str | int, ...]:
    content = campaign.content[lang]
    if name and name in content.subject:
        return ("content", lang, "subject")
    if name and name in content.preheader:
        return ("content", lang, "preheader")
    for i, block in enumerate(content.blocks):
        if name and name in block.model_dump_json():
            return ("content", lang, "blocks", i, block.kind)
    return ("content", lang)


# --- system mails (the double opt-in confirmation) ------------------------------------------


class Fields:
    """The per-mail values of a system mail, by name: `fields["url"]` is what stage 1 renders
    (an opaque placeholder); the value itself is given to `SystemMail.fill`, as data."""

    def __init__(self, *names: str) -> None:
        if not all(n.isidentifier() for n in names):
            raise ValueError(f"field names must be identifiers: {names}")
        self.names = names

    def __getitem__(self, name: str) -> str:
        return PLACEHOLDER.format(self.names.index(name))


@dataclass(frozen=True)
class SystemMail:
    """A system mail of one language, compiled once: stage-2 templates whose only live parts
    are its fields, so a mail costs a template fill, not an MJML compile."""

    lang: str
    dir: str
    html: jinja2.Template
    text: jinja2.Template

    def fill(self, values: Mapping[str, str]) -> tuple[str, str]:
        """(html, text) for one mail. A value is data, never template source: escaped in the
        HTML, as it is in the text."""
        return self.html.render(values), self.text.render(values)


def render_system_mail(settings: Settings, template: str, context: dict[str, Any],
                       fields: Fields) -> SystemMail:
    """`templates/<template>.mjml.j2` through the campaign pipeline (MJML, htmlcraft.finish,
    text_part, Impressum) with `transactional: true`: the header and footer leave out the
    view-online, preferences and unsubscribe links and the why-line, and so does the text part.
    `context` needs lang, dir, subject, preheader and blocks (for the text part)."""
    lang = context["lang"]
    t = ui_strings(settings, lang)
    org = settings.organisation.model_dump()
    context = {**context, "t": t, "org": org, "transactional": True}
    html = _compile(settings, template, context)
    text = text_part(context, org=org, t=t)
    sources = [f"{{{{ {name} }}}}" for name in fields.names]
    return SystemMail(
        lang=lang,
        dir=context["dir"],
        html=_stage2(True).from_string(_stage2_source(html, sources)),
        text=_stage2(False).from_string(_stage2_source(text, sources)),
    )


def templates_stamp(templates_dir: Path) -> int:
    """The newest modification time under templates/: a cache keyed by it sees every edit."""
    try:
        return max((p.stat().st_mtime_ns for p in templates_dir.rglob("*") if p.is_file()),
                   default=0)
    except OSError:
        return 0
