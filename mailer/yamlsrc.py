"""YAML loading that remembers the line of every value, so errors can name it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import UserError

Loc = tuple[str | int, ...]
MAX_FILE_BYTES = 2 * 1024 * 1024


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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error("file not found; check the path", path=path) from None
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path=path) from None
    if len(raw) > max_bytes:
        raise error(
            f"file is {len(raw) // 1024} KiB, more than the {max_bytes // 1024} KiB allowed",
            path=path,
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            "the file is not UTF-8 (save it as UTF-8 in your editor)", path=path, line=line
        ) from None


def load_yaml(path: Path, *, error: type[UserError], text: str | None = None,
              max_bytes: int = MAX_FILE_BYTES) -> Located:
    if text is None:
        text = read_text(path, error=error, max_bytes=max_bytes)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise error(
            f"YAML syntax error: {problem} (check indentation, colons and quotes)",
            path=path,
            line=mark.line + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise error(f"YAML syntax error: {exc}", path=path) from None
    located = Located(data=None, path=path)
    if node is None:
        return located
    located.data = _construct(node, (), located.lines, path=path, error=error)
    return located


def _construct(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], *, path: Path, error: type[UserError]
) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise error("a key must be plain text", path=path,
                            line=key_node.start_mark.line + 1)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise error("YAML merge keys (<<) are not supported", path=path,
                            line=key_node.start_mark.line + 1)
            key = _scalar(key_node, path=path, error=error)
            if key in out:
                raise error(f"key '{key}' appears twice", path=path,
                            line=key_node.start_mark.line + 1)
            sub = (*loc, key)
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, sub, lines, path=path, error=error)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, (*loc, i), lines, path=path, error=error)
            for i, item in enumerate(node.value)
        ]
    return _scalar(node, path=path, error=error)


def _scalar(node: yaml.Node, *, path: Path, error: type[UserError]) -> Any:
    try:
        value = yaml.SafeLoader(  # construct one scalar with the standard resolvers
            ""
        ).construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise error(f"cannot read this value: {exc}", path=path,
                    line=node.start_mark.line + 1) from None
    # Dates and times stay text: our models parse them in the configured time zone.
    if node.tag in ("tag:yaml.org,2002:timestamp",):
        return str(node.value)
    return value


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
