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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import UserError

try:  # libyaml's parser: ~10x faster than the pure-Python one, same events
    from yaml import CSafeLoader as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Parser  # type: ignore[assignment]

log = logging.getLogger("mailer.yamlsrc")

Loc = tuple[str | int, ...]
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


def read_text(path: Path, *, error: type[UserError], max_bytes: int = MAX_FILE_BYTES) -> str:
    """Read a UTF-8 file, refusing absurd sizes and wrong encodings in one sentence."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error("file not found; check the path", path=path) from None
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path=path) from None
    if size > max_bytes:  # before reading: a 10 GB file is refused without touching it
        raise _too_big(size, max_bytes, path=path, error=error)
    try:
        with path.open("rb") as stream:
            raw = stream.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path=path) from None
    if len(raw) > max_bytes:
        raise _too_big(len(raw), max_bytes, path=path, error=error)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            "the file is not UTF-8 (save it as UTF-8 in your editor)", path=path, line=line
        ) from None


def _too_big(size: int, max_bytes: int, *, path: Path, error: type[UserError]) -> UserError:
    return error(f"file is {size // 1024} KiB, more than the {max_bytes // 1024} KiB allowed",
                 path=path)


def load_yaml(path: Path, *, error: type[UserError], text: str | None = None,
              budget: Budget = DOCUMENT) -> Located:
    """Parse one YAML document within `budget`; every problem is an `error` with file and line."""
    if text is None:
        text = read_text(path, error=error, max_bytes=budget.max_bytes)
    _check_text(text, path=path, error=error, budget=budget)
    builder = _Builder(path=path, error=error, budget=budget)
    try:
        for event in yaml.parse(text, Loader=_Parser):
            builder.feed(event)
    except UserError:
        raise
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, path=path, error=error, budget=budget) from None
    except Exception as exc:  # a trust boundary: one sentence even for what we did not foresee
        log.debug("unexpected error reading %s", path, exc_info=True)
        raise error(f"cannot read this file as YAML ({type(exc).__name__}: "
                    f"{_first_line(exc)})", path=path, line=builder.line) from None
    return Located(data=builder.root, path=path, lines=builder.lines)


def _check_text(text: str, *, path: Path, error: type[UserError], budget: Budget) -> None:
    if len(text) > budget.max_bytes:
        raise _too_big(len(text.encode("utf-8", "surrogatepass")), budget.max_bytes,
                       path=path, error=error)
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        raise error(f"the file contains the control character U+{ord(bad.group()):04X}, which "
                    "YAML does not allow (often invisible in editors): delete it", path=path,
                    line=text.count("\n", 0, bad.start()) + 1)


def _syntax_error(exc: yaml.YAMLError, *, path: Path, error: type[UserError],
                  budget: Budget) -> UserError:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return error(f"YAML syntax error: {_first_line(exc)}", path=path)
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    problem = (exc.problem or exc.context or "invalid YAML").strip()
    if "nesting depth" in problem:  # libyaml's own limit (1,000), met while looking ahead
        return error(f"values are nested more than {budget.max_depth} levels deep: flatten the "
                     "structure", path=path, line=line)
    return error(f"YAML syntax error: {problem} (check indentation, colons and quotes)",
                 path=path, line=line)


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
    """Turn the first pydantic error into one sentence naming file, line and field."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = err["type"]
    message = err["msg"]
    if kind == "extra_forbidden":
        unknown = str(loc[-1])
        known = _known_fields(model, loc[:-1], located.data)
        hint = closest(unknown, known)
        message = f"unknown field '{unknown}'" + (
            f"; did you mean '{hint}'?" if hint else f"; known fields: {', '.join(sorted(known))}"
        )
    elif kind == "missing":
        message = f"required field '{loc[-1]}' is missing"
        line = located.line(loc[:-1])
        raise error(message, path=located.path, line=line, field=dotted(loc[:-1]) or None)
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        message = f"{message.rstrip('.')} (got {_short(err.get('input'))})"
    raise error(message, path=located.path, line=located.line(loc), field=dotted(loc) or None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _known_fields(model: Any, loc: Loc, data: Any) -> list[str]:
    """The field names pydantic would accept at loc (best effort, for suggestions)."""
    try:
        current = model
        for part in loc:
            if isinstance(part, int) or current is None:
                continue
            info = current.model_fields.get(part)
            if info is None:
                current = None
                break
            current = _model_of(info.annotation)
        if current is not None and hasattr(current, "model_fields"):
            return [f.alias or n for n, f in current.model_fields.items()]
    except Exception:  # suggestions are a nicety; never fail the real error over them
        return []
    return []


def _model_of(annotation: Any) -> Any:
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None
