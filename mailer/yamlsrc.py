"""YAML loading with budgets, remembering the line of every value, so errors can name it.

Campaign files, list files and config.yaml are written by people, sometimes carelessly, and are
read by `mailer run` unattended (DESIGN.md, "Trust boundaries"). PyYAML's own composer recurses
once per nesting level (100,000 `[` end in a RecursionError), and building values from its node
graph expands every alias afresh: a 400-byte "billion laughs" document makes 9^9 strings. So we
never let PyYAML compose or construct a document. We read its event stream (libyaml's parser when
PyYAML was built with it) and build the values ourselves, iteratively, under a `Budget`: an alias
adds the size of what it repeats to the count of values *before* anything is copied, so a bomb is
refused at the first alias that would pass the budget, in milliseconds, having built at most
`max_values` values. Every refusal is a `UserError` naming file and line; nothing else leaves
`load_yaml`.
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from .errors import UserError

try:  # libyaml's parser: ~10x faster than the pure-Python one, same events
    from yaml import CSafeLoader as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Parser  # type: ignore[assignment]

log = logging.getLogger("mailer.yamlsrc")

Loc = tuple[str | int, ...]
E = TypeVar("E", bound=UserError)
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_INT_DIGITS = 4300  # Python's own limit for int(str) (sys.get_int_max_str_digits)

# What PyYAML's reader refuses (yaml/reader.py NON_PRINTABLE): found first, with its line.
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_STD + t for t in ("null", "bool", "int", "float", "binary", "str"))
_STR, _INT, _MERGE, _TIMESTAMP = (_STD + t for t in ("str", "int", "merge", "timestamp"))
_PLAIN_TAGS = (None, "!")


@dataclass(frozen=True)
class Budget:
    """How much one YAML file may ask of the loader; beyond any limit it is refused.

    `max_values` counts every key and value *after* aliases are expanded, so it is what the
    models, the renderer and the line table downstream will have to walk.
    """

    max_bytes: int = MAX_FILE_BYTES
    max_depth: int = 50  # nested mappings/lists; campaigns need about 8
    max_values: int = 100_000  # a long campaign has a few thousand
    max_aliases: int = 1_000  # *name references


DOCUMENT = Budget()  # campaign files and config.yaml


@dataclass
class Located:
    """A parsed YAML document plus the line (1-based) of every key path in it."""

    data: Any
    path: Path
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Sequence[str | int]) -> int | None:
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)


def file_size(path: Path, *, error: type[UserError], max_bytes: int) -> int:
    """The size of a file that may be read, by stat() before reading: a 10 GB file is refused
    without touching it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error("file not found; check the path", path=path) from None
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path=path) from None
    if size > max_bytes:
        raise too_big(size, max_bytes, path=path, error=error)
    return size


def read_text(path: Path, *, error: type[UserError], max_bytes: int = MAX_FILE_BYTES) -> str:
    """Read a UTF-8 file, refusing absurd sizes and wrong encodings in one sentence."""
    file_size(path, error=error, max_bytes=max_bytes)
    try:
        with path.open("rb") as stream:
            raw = stream.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path=path) from None
    if len(raw) > max_bytes:
        raise too_big(len(raw), max_bytes, path=path, error=error)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            "the file is not UTF-8 (save it as UTF-8 in your editor)", path=path, line=line
        ) from None


def too_big(size: int, max_bytes: int, *, path: Path, error: type[UserError]) -> UserError:
    return error(f"file is {size // 1024} KiB, more than the {max_bytes // 1024} KiB allowed",
                 path=path)


def load_yaml(path: Path, *, error: type[UserError], text: str | None = None,
              budget: Budget = DOCUMENT) -> Located:
    """Parse one YAML document within `budget`; every problem is an `error` with file and line."""
    builder = _Builder(path=path, error=error, budget=budget)
    for _ in _feed(builder, text):
        pass
    return Located(data=builder.root, path=path, lines=builder.lines)


def iter_entries(path: Path, *, error: type[UserError], budget: Budget,
                 not_a_list: str) -> Iterator[tuple[int, Any]]:
    """The entries of a document that is one list, each with the line it starts on, built as
    `load_yaml` builds them (same budget, same sentences) but handed out one at a time and not
    kept: memory holds the text and one entry, not every entry. An empty document has none;
    any other document is an `error` saying `not_a_list`."""
    builder = _Builder(path=path, error=error, budget=budget)
    done = 0
    for _ in _feed(builder, None):
        root = builder.root
        if len(builder.stack) == 1 and isinstance(root, list) and len(root) > done:
            # entry `done` is complete; its slot stays (as None) so that later entries keep
            # their index, which the line table is keyed by
            entry, root[done] = root[done], None
            line = builder.lines.get((done,), 0)
            builder.lines.clear()
            done += 1
            yield line, entry
    if builder.root and not isinstance(builder.root, list):
        raise error(not_a_list, path=path, line=1)


def _feed(builder: _Builder, text: str | None) -> Iterator[None]:
    """Feed the events of the builder's file (or `text`) to it, pausing after each: every
    problem becomes one sentence naming file and line."""
    path, error, budget = builder.path, builder.error, builder.budget
    if text is None:
        text = read_text(path, error=error, max_bytes=budget.max_bytes)
    _check_text(text, path=path, error=error, budget=budget)
    try:
        for event in yaml.parse(text, Loader=_Parser):
            builder.feed(event)
            yield
    except UserError:
        raise
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, path=path, error=error, budget=budget) from None
    except Exception as exc:  # a trust boundary: one sentence even for what we did not foresee
        log.debug("unexpected error reading %s", path, exc_info=True)
        raise error(f"cannot read this file as YAML ({type(exc).__name__}: "
                    f"{_first_line(exc)})", path=path, line=builder.line) from None


def _check_text(text: str, *, path: Path, error: type[UserError], budget: Budget) -> None:
    if len(text) > budget.max_bytes:
        raise too_big(len(text.encode("utf-8", "surrogatepass")), budget.max_bytes,
                       path=path, error=error)
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        raise error(f"the file contains the control character U+{ord(bad.group()):04X}, which "
                    "YAML does not allow (often invisible in editors): delete it", path=path,
                    line=text.count("\n", 0, bad.start()) + 1)


def _syntax_error(exc: yaml.YAMLError, text: str, *, path: Path, error: type[UserError],
                  budget: Budget) -> UserError:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return error(f"YAML syntax error: {_first_line(exc)}", path=path)
    problem = (exc.problem or exc.context or "invalid YAML").strip()
    if "nesting depth" in problem:  # libyaml's own limit (1,000), met while looking ahead
        mark = exc.problem_mark or exc.context_mark
        return error(f"values are nested more than {budget.max_depth} levels deep: flatten the "
                     "structure", path=path, line=mark.line + 1 if mark else None)
    line, advice = _SyntaxProblem(exc, text).explain()
    return error(f"YAML syntax error: {advice}", path=path, line=line)


_KEY_LINE = re.compile(r"^(\s*(?:-\s+)?)([^\s#'\"{\[][^#]*?):(?:\s+|$)")  # indent, key
_DASH_NO_SPACE = re.compile(r"^\s*-[^\s\-]")


class _SyntaxProblem:
    """What the parser could not read, in the words of someone editing the file: the line to
    fix (often not the one where the parser gave up) and what to do there."""

    def __init__(self, exc: yaml.MarkedYAMLError, text: str) -> None:
        self.exc, self.text = exc, text
        self.lines = text.splitlines()
        self.problem = exc.problem or ""
        self.context = exc.context or ""
        mark = exc.problem_mark or exc.context_mark
        self.at = mark.line + 1 if mark else 1
        self.col = mark.column if mark else 0
        self.since = exc.context_mark.line + 1 if exc.context_mark else self.at
        self.since_col = exc.context_mark.column if exc.context_mark else 0

    def src(self, n: int) -> str:
        return self.lines[n - 1] if 0 < n <= len(self.lines) else ""

    def before(self, n: int) -> int | None:
        """The nearest line above n with content (not blank, not only a comment)."""
        for m in range(n - 1, 0, -1):
            stripped = self.src(m).strip()
            if stripped and not stripped.startswith("#"):
                return m
        return None

    @staticmethod
    def indent(line: str) -> str:
        return line[: len(line) - len(line.lstrip())]

    def explain(self) -> tuple[int, str]:
        for rule in (self.tab, self.escape, self.open_quote, self.open_bracket,
                     self.second_colon, self.no_colon, self.misaligned, self.dash,
                     self.reserved):
            found = rule()
            if found is not None:
                return found
        return self.at, ("this line does not fit the lines around it: check that it is "
                         "indented with spaces like its neighbours, that each field name ends "
                         "with ':' and a space, and that every quote is closed")

    # -- the rules, most specific first --------------------------------------------------------

    def tab(self) -> tuple[int, str] | None:
        line = self.src(self.at)
        if "tab" not in self.problem and "\\t" not in self.problem \
                and line[self.col:self.col + 1] != "\t":
            return None
        if "\t" in self.indent(line):
            return self.at, ("this line is indented with a tab; YAML allows only spaces for "
                             "indentation: replace the tab with spaces")
        return self.at, "this line has a tab where a value should start: replace it with a space"

    def escape(self) -> tuple[int, str] | None:
        if "escape" not in self.problem:
            return None
        return self.at, ("a backslash inside double quotes starts an escape sequence: write \\\\ "
                         "for a backslash, or put the value in single quotes instead")

    def open_quote(self) -> tuple[int, str] | None:
        if "quoted scalar" in self.context and "end of stream" in self.problem:
            start, col = self.since, self.since_col
        else:  # closed by the next quote further down: the value ran over several lines
            found = self._multiline_quote()
            if found is None:
                return None
            start, col = found
        quote = self.src(start)[col:col + 1] or '"'
        return start, (f"the quote {quote} that starts a value on this line is never closed: "
                       f"end the value with {quote} on the same line"
                       + (" (write \\\" for a quote inside it)" if quote == '"' else
                          " (write '' for an apostrophe inside it)"))

    def _multiline_quote(self) -> tuple[int, int] | None:
        """The start of a quoted value that ends on the failing line, if it began further up."""
        found = None
        try:
            for token in yaml.scan(self.text, Loader=_Parser):
                if token.start_mark.line + 1 > self.at:
                    break
                if (isinstance(token, yaml.ScalarToken) and token.style in ('"', "'")
                        and token.start_mark.line + 1 < token.end_mark.line + 1 == self.at):
                    found = (token.start_mark.line + 1, token.start_mark.column)
        except yaml.YAMLError:
            pass
        return found

    def open_bracket(self) -> tuple[int, str] | None:
        for kind, opener, closer, items in (("flow sequence", "[", "]", "items"),
                                            ("flow mapping", "{", "}", "fields")):
            if kind in self.context:
                return self.since, (f"the '{opener}' on this line is not closed properly: end "
                                    f"it with '{closer}' and put a comma between its {items}")
        return None

    def second_colon(self) -> tuple[int, str] | None:
        if "mapping values are not allowed" not in self.problem:
            return None
        line = self.src(self.at)
        key = _KEY_LINE.match(line[: self.col + 1])
        if key is not None and key.end() <= self.col:
            value = line[key.end():].strip().replace('"', '\\"')
            return self.at, (f"the value of '{key.group(2).strip()}' contains ': ', which YAML "
                             f"reads as another field: put the value in quotes, like "
                             f"{key.group(2).strip()}: \"{value}\"")
        above = self.before(self.at)
        if above is not None and _KEY_LINE.match(self.src(above)):
            # the line reads as more text of the value above it: it is indented too far
            width = len(self.indent(self.src(above)))
            fix = (f"indent it by {width} spaces like line {above} (or fewer, if it belongs to "
                   "a section further up)" if width else
                   f"remove the spaces at its start, like line {above}")
            return self.at, (f"this line is indented further than line {above} above it, so it "
                             f"reads as part of that value: {fix}")
        if above is not None:
            return self._add_colon(above)
        return None

    def no_colon(self) -> tuple[int, str] | None:
        if "expected ':'" not in self.problem:
            return None
        return self._add_colon(self.since)

    def _add_colon(self, n: int) -> tuple[int, str]:
        line = self.src(n).strip()
        dash = "- " if line.startswith("- ") else ""
        name, _, rest = line[len(dash):].partition(" ")
        example = f"{dash}{name}: {rest.strip()}".rstrip()
        return n, f"a ':' is missing after the field name: write '{example}'"

    def misaligned(self) -> tuple[int, str] | None:
        if "expected key" not in self.problem and "<block end>" not in self.problem:
            return None
        line = self.src(self.at)
        stripped = line[: self.col].rstrip()
        if stripped[-1:] in ('"', "'") and stripped.count(stripped[-1]) >= 2:
            return self.at, ("there is text after the closing quote: put the whole value "
                             "inside the quotes")
        width = len(self.indent(line))
        above = self.before(self.at)
        levels = {self.since_col: self.since}
        if above is not None:
            levels.setdefault(len(self.indent(self.src(above))), above)
        if width in levels or not line.strip():
            return None
        choices = " or ".join(f"{w} like line {n}" for w, n in sorted(levels.items(),
                                                                       reverse=True))
        return self.at, (f"this line is indented by {width} spaces, which lines up with "
                         f"nothing above it: indent it by {choices}")

    def dash(self) -> tuple[int, str] | None:
        for n in range(self.since, self.at + 1):
            if _DASH_NO_SPACE.match(self.src(n)):
                item = self.src(n).strip()
                return n, f"a list item needs a space after '-': write '- {item[1:]}'"
        if "sequence entries are not allowed" in self.problem:
            return self.at, ("a list item ('- ') cannot start on the same line as its field: "
                             "put it on the next line, indented further")
        if ("expected key" in self.problem or "<block end>" in self.problem) \
                and self.src(self.at).lstrip().startswith("- "):
            return self.at, ("a list item ('- ') where a field was expected: indent it under "
                             "the field it belongs to, or remove the '- '")
        return None

    def reserved(self) -> tuple[int, str] | None:
        char = self.src(self.at)[self.col:self.col + 1]
        if "cannot start any token" in self.problem and char:
            return self.at, f"a value cannot start with '{char}': put the value in quotes"
        if "alias" in self.context or "anchor" in self.context:
            return self.at, ("a value that starts with '*' or '&' means something special in "
                             "YAML: put the value in quotes")
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_STD):] if tag.startswith(_STD) else tag


_NO_KEY = object()


@dataclass
class _Open:
    """A mapping or list being built."""

    value: dict[Any, Any] | list[Any]
    loc: Loc
    anchor: str | None
    first: int  # the value count before it opened; at its end, the count minus this is its size
    height: int = 1  # levels of nesting it holds, itself included
    key: Any = _NO_KEY


@dataclass
class _Anchor:
    value: Any
    size: int  # values it stands for, keys included
    height: int
    line: int


class _Builder:
    """Turns parser events into Python values and a line table, counting against a Budget."""

    def __init__(self, *, path: Path, error: type[UserError], budget: Budget) -> None:
        self.path, self.error, self.budget = path, error, budget
        self.root: Any = None
        self.lines: dict[Loc, int] = {}
        self.line: int | None = None  # of the event being handled
        self.stack: list[_Open] = []
        self.anchors: dict[str, _Anchor | None] = {}  # None while its collection is still open
        self.values = 0
        self.aliases = 0
        self.documents = 0
        self.scalars = yaml.SafeLoader("")  # the standard resolvers and scalar constructors

    def fail(self, message: str) -> UserError:
        return self.error(message, path=self.path, line=self.line)

    def feed(self, event: yaml.Event) -> None:
        mark = getattr(event, "start_mark", None)
        self.line = mark.line + 1 if mark is not None else self.line
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise self.fail("a second YAML document starts here ('---'); a file holds one")
        elif isinstance(event, yaml.CollectionEndEvent):
            self.close()
        elif isinstance(event, yaml.NodeEvent):
            top = self.stack[-1] if self.stack else None
            if top is not None and isinstance(top.value, dict) and top.key is _NO_KEY:
                self.key(top, event)
            else:
                self.value(top, event)

    # -- keys and values -------------------------------------------------------------------

    def key(self, top: _Open, event: yaml.NodeEvent) -> None:
        if isinstance(event, yaml.AliasEvent):
            anchor = self.alias(event, depth=len(self.stack))
            if anchor.height:
                raise self.fail("a key must be plain text")
            key = anchor.value
        elif isinstance(event, yaml.ScalarEvent):
            tag = self.tag(event)
            if tag == _MERGE:
                raise self.fail("YAML merge keys (<<) are not supported")
            key = self.scalar(event, tag)
        else:
            raise self.fail("a key must be plain text")
        assert isinstance(top.value, dict)
        if key in top.value:
            raise self.fail(f"key '{key}' appears twice")
        top.key = key
        self.lines[(*top.loc, key)] = self.line or 0

    def value(self, top: _Open | None, event: yaml.NodeEvent) -> None:
        loc: Loc = ()
        if top is not None:
            loc = (*top.loc, top.key if isinstance(top.value, dict) else len(top.value))
        self.lines.setdefault(loc, self.line or 0)
        if isinstance(event, yaml.ScalarEvent):
            self.attach(top, self.scalar(event, self.tag(event)), height=0)
        elif isinstance(event, yaml.AliasEvent):
            anchor = self.alias(event, depth=len(self.stack))
            # a copy: the models may change what they get, and must not change it twice
            value = copy.deepcopy(anchor.value) if anchor.height else anchor.value
            self.attach(top, value, height=anchor.height)
        elif isinstance(event, yaml.CollectionStartEvent):
            self.open(top, event, loc)

    def attach(self, top: _Open | None, value: Any, *, height: int) -> None:
        if top is None:
            self.root = value
            return
        if isinstance(top.value, dict):
            top.value[top.key] = value
            top.key = _NO_KEY
        else:
            top.value.append(value)
        top.height = max(top.height, height + 1)

    # -- collections -----------------------------------------------------------------------

    def open(self, top: _Open | None, event: yaml.CollectionStartEvent, loc: Loc) -> None:
        mapping = isinstance(event, yaml.MappingStartEvent)
        if event.tag not in (*_PLAIN_TAGS, _STD + ("map" if mapping else "seq")):
            raise self.fail(f"the tag {_show_tag(str(event.tag))} is not supported: "
                            "remove it")
        if len(self.stack) >= self.budget.max_depth:
            raise self.fail(f"values are nested more than {self.budget.max_depth} levels deep: "
                            "flatten the structure")
        first = self.values
        self.count(1)
        value: dict[Any, Any] | list[Any] = {} if mapping else []
        self.attach(top, value, height=1)
        if event.anchor is not None:
            self.define(event.anchor, None)
        self.stack.append(_Open(value, loc, event.anchor, first))

    def close(self) -> None:
        done = self.stack.pop()
        if done.anchor is not None:
            self.anchors[done.anchor] = _Anchor(done.value, self.values - done.first,
                                                done.height, self.line or 0)
        if self.stack:
            parent = self.stack[-1]
            parent.height = max(parent.height, done.height + 1)

    # -- anchors and aliases ---------------------------------------------------------------

    def define(self, name: str, anchor: _Anchor | None) -> None:
        earlier = self.anchors.get(name, False)
        if earlier is not False:
            raise self.fail(f"the anchor &{name} is defined twice: give this one another name")
        self.anchors[name] = anchor

    def alias(self, event: yaml.AliasEvent, *, depth: int) -> _Anchor:
        """The anchor an alias names, once its size and depth fit the budget (nothing copied)."""
        name = str(event.anchor)
        if name not in self.anchors:
            raise self.fail(f"*{name} refers to no anchor: define &{name} before using it")
        anchor = self.anchors[name]
        if anchor is None:
            raise self.fail(f"*{name} is used inside the value it names; that would never end")
        self.aliases += 1
        if self.aliases > self.budget.max_aliases:
            raise self.fail(f"uses too many aliases/anchors (more than "
                            f"{self.budget.max_aliases:,} *references); write the values out")
        if depth + anchor.height > self.budget.max_depth:
            raise self.fail(f"*{name} nests values more than {self.budget.max_depth} levels "
                            "deep: flatten the structure")
        self.count(anchor.size, alias=name)
        return anchor

    def count(self, n: int, *, alias: str | None = None) -> None:
        self.values += n
        if self.values <= self.budget.max_values:
            return
        if alias is not None:
            raise self.fail(f"uses too many aliases/anchors (*{alias} would make more than "
                            f"{self.budget.max_values:,} values); write the values out")
        raise self.fail(f"has more than {self.budget.max_values:,} values: split it up")

    # -- scalars ---------------------------------------------------------------------------

    def tag(self, event: yaml.ScalarEvent) -> str:
        if event.tag in _PLAIN_TAGS:
            return str(self.scalars.resolve(yaml.ScalarNode, event.value, event.implicit))
        return str(event.tag)

    def scalar(self, event: yaml.ScalarEvent, tag: str) -> Any:
        self.count(1)
        value = self._construct(event, tag)
        if event.anchor is not None:
            self.define(event.anchor, _Anchor(value, 1, 0, self.line or 0))
        return value

    def _construct(self, event: yaml.ScalarEvent, tag: str) -> Any:
        if tag == _STR:  # most values: nothing to convert
            return event.value
        if tag == _TIMESTAMP:  # dates and times stay text: our models read them in our zone
            return event.value
        if tag not in _SCALAR_TAGS:
            raise self.fail(f"the tag {_show_tag(tag)} is not supported: remove it")
        if tag == _INT and len(event.value) > MAX_INT_DIGITS:
            raise self.fail(f"this number has more than {MAX_INT_DIGITS:,} digits: put it in "
                            "quotes if it is text")
        node = yaml.ScalarNode(tag, event.value, style=event.style)
        try:
            return self.scalars.yaml_constructors[tag](self.scalars, node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None
            raise self.fail(f"cannot read this value: {problem or _first_line(exc)}") from None


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def closest(word: str, choices: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def raise_validation(
    exc: ValidationError, located: Located, *, error: type[UserError], model: Any = None
) -> None:
    """Raise the first problem (in line order) of `validation_problems` as one sentence."""
    raise validation_problems(exc, located, error=error, model=model)[0]


def validation_problems(
    exc: ValidationError, located: Located, *, error: type[E], model: Any = None
) -> list[E]:
    """Every problem pydantic found, as one sentence each naming file, line and field, in line
    order. An unknown key and the required field it was meant to be are one problem, at the
    unknown key: a close spelling ('subjekt' for 'subject'), or the only unknown key next to
    the only missing field of the same mapping ('link' for 'url')."""
    errors = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"]
                    if not (isinstance(p, str) and (p.startswith("function-") or p == "[key]")))
        errors.append((err, loc, err["loc"][-1:] == ("[key]",)))
    bad_keys = {loc for _, loc, key in errors if key}  # a bad key: what it holds is not looked at
    errors = [e for e in errors if e[2] or not any(e[1][:len(k)] == k for k in bad_keys)]
    unknown: dict[Loc, list[str]] = {}
    missing: dict[Loc, list[str]] = {}
    for err, loc, _ in errors:
        if err["type"] in ("extra_forbidden", "missing"):
            bucket = unknown if err["type"] == "extra_forbidden" else missing
            bucket.setdefault(loc[:-1], []).append(str(loc[-1]))
    meant: dict[Loc, str] = {}  # the loc of an unknown key -> the missing field it stands for
    for parent, keys in unknown.items():
        left = missing.get(parent, [])
        for key in keys:
            hint = closest(key, left) or (left[0] if len(keys) == len(left) == 1 else None)
            if hint is not None:
                meant[(*parent, key)] = hint
                left.remove(hint)
    out: list[tuple[int, int, E]] = []
    for n, (err, loc, _) in enumerate(errors):
        if err["type"] == "missing" and str(loc[-1]) not in missing.get(loc[:-1], []):
            continue  # reported as the unknown key that stands for it
        message, at = _message(err, loc, model, meant.get(loc))
        line = located.line(at)
        out.append((line or 0, n, error(message, path=located.path, line=line,
                                        field=dotted(at) or None)))
    return [problem for _, _, problem in sorted(out, key=lambda t: t[:2])]


def _message(err: Any, loc: Loc, model: Any, meant: str | None) -> tuple[str, Loc]:
    """One pydantic error in plain words, and the loc whose line it names."""
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        unknown = str(loc[-1])
        known = field_names(model, loc[:-1])
        hint = meant or closest(unknown, known)
        return f"unknown field '{unknown}'" + (
            f"; did you mean '{hint}'?" if hint else
            f"; known fields: {', '.join(sorted(known))}" if known else
            "; remove it"), loc
    if kind == "missing":
        about = field_description(model, loc)
        return (f"required field '{loc[-1]}' is missing: add '{loc[-1]}:'"
                + (f" ({about})" if about else "")), loc[:-1]
    if message.startswith("Value error, "):
        return message[len("Value error, "):], loc
    got = _short(err.get("input"))
    if kind == "string_pattern_mismatch":
        return f"{got} is not allowed here: use only lower-case letters, digits and dashes", loc
    if kind == "list_type":
        value = err.get("input")
        like = f"[{value}]" if isinstance(value, str | int) and value != "" else "[…, …]"
        return f"this must be a list, like {like} (got {got})", loc
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return (f"this must hold fields ('name: value', indented below it), not a single "
                f"value (got {got})"), loc
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message.rstrip('.')} (got {_short(err.get('input'))})", loc
    return message, loc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field_names(model: Any, loc: Loc) -> list[str]:
    """The field names pydantic accepts in the mapping at loc (for suggestions)."""
    found = _model_at(model, loc)
    return [f.alias or n for n, f in found.model_fields.items()] if found is not None else []


def field_description(model: Any, loc: Loc) -> str | None:
    """The description of the field at loc, if the model gives one."""
    found = _model_at(model, loc[:-1])
    info = found.model_fields.get(loc[-1]) if found is not None and loc else None
    return info.description if info is not None else None


def _model_at(model: Any, loc: Loc) -> Any:
    """The pydantic model that validates the mapping at loc: through fields, optional values,
    lists (an index) and dicts (a key), at any depth; None where there is no model."""
    current = _model_of(model)
    for part in loc:
        if current is None:
            return None
        if hasattr(current, "model_fields"):
            info = current.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None
            current = info.annotation
        else:  # a list (part is an index) or a dict (part is a key): what it holds
            args = [a for a in getattr(current, "__args__", ()) or () if a is not type(None)]
            current = args[-1] if args else None
        current = _unwrap(current)
    return current if hasattr(current, "model_fields") else None


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; anything else as it is."""
    args = [a for a in getattr(annotation, "__args__", ()) or () if a is not type(None)]
    if type(None) in (getattr(annotation, "__args__", ()) or ()) and len(args) == 1:
        return args[0]
    return annotation


def _model_of(annotation: Any) -> Any:
    return annotation if hasattr(annotation, "model_fields") else None
