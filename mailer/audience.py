"""Resolve a campaign's lists into recipients: validate, de-duplicate, drop suppressed."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email

from .config import Settings
from .errors import ListError
from .yamlsrc import Budget, Located, load_yaml, read_text

NAME_MAX = 200
FIELD_MAX = 1000
COLUMN_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
RESERVED = frozenset({"email", "name", "language"})
LIST_MAX_BYTES = 256 * 1024 * 1024  # CSV: a million rows fit; anything larger is a mistake
# YAML lists are kept by hand (partners.yaml); parsing YAML costs ~0.4 s and ~20 MB per MB of
# file, so big lists belong in CSV. About 100,000 entries fit.
YAML_LIST_BUDGET = Budget(max_bytes=8 * 1024 * 1024, max_values=1_000_000, max_aliases=100_000)


@dataclass(frozen=True, slots=True)
class Recipient:
    email: str
    name: str = ""
    language: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    list: str = ""  # the list this recipient was taken from (unsubscribe applies to it)

    @property
    def key(self) -> str:
        return email_key(self.email)

    def merge(self) -> dict[str, str]:
        """What `{{ recipient.* }}` sees in templates."""
        return {**self.fields, "email": self.email, "name": self.name, "language": self.language}


def email_key(address: str) -> str:
    """The case-insensitive identity of an address (RFC 5321 leaves case to the host; in
    practice every provider ignores it)."""
    return address.strip().lower()


def normalise_address(raw: str) -> str:
    """Validate syntax (no DNS) and return the normalised address; raises ValueError."""
    raw = raw.strip()
    if any(c in raw for c in "\r\n\0"):
        raise ValueError("the address contains a line break")
    try:
        return validate_email(raw, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc).rstrip(".")) from None


def list_files(settings: Settings) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if settings.lists_dir.is_dir():
        for path in sorted(settings.lists_dir.iterdir()):
            if path.suffix in (".csv", ".yaml", ".yml"):
                out.setdefault(path.stem, path)
    return out


def known_lists(settings: Settings) -> set[str]:
    """File lists under lists/ plus the managed lists kept in the store."""
    return set(list_files(settings)) | set(settings.web.subscribe_lists)


def load_list(path: Path) -> list[Recipient]:
    return list(iter_list(path))


def iter_list(path: Path) -> Iterator[Recipient]:
    """The rows of a list file, validated one by one (so a big list is never held whole)."""
    rows = _csv_rows(path) if path.suffix == ".csv" else _yaml_rows(path)
    seen: dict[str, int] = {}
    for line, row in rows:
        recipient = _recipient(row, path=path, line=line)
        first = seen.setdefault(recipient.key, line)
        if first != line:
            raise ListError(
                f"{recipient.email} is listed twice (first on line {first}): delete one row",
                path=path,
                line=line,
            )
        yield recipient


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = read_text(path, error=ListError, max_bytes=LIST_MAX_BYTES)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "email" not in [h.strip().lower() for h in header]:
        raise ListError(
            "the header row has no 'email' column: the first line must name the columns, "
            "e.g. email,name,language",
            path=path,
            line=1,
        )
    try:
        for row in reader:
            if None in row:
                raise ListError(
                    "this row has more values than the header has columns (a comma too many?)",
                    path=path, line=reader.line_num,
                )
            if not any((v or "").strip() for v in row.values()):
                continue
            yield reader.line_num, {k.strip().lower(): v for k, v in row.items()}
    except csv.Error as exc:
        raise ListError(f"CSV error: {exc}", path=path, line=reader.reader.line_num) from None


def _load_yaml_list(path: Path) -> Located:
    with contextlib.suppress(OSError):  # read_text says why it cannot read the file
        size = path.stat().st_size
        if size > YAML_LIST_BUDGET.max_bytes:
            raise ListError(f"file is {size // 1024} KiB, more than the "
                            f"{YAML_LIST_BUDGET.max_bytes // 1024} KiB allowed for a YAML list: "
                            "save big lists as CSV", path=path)
    return load_yaml(path, error=ListError, budget=YAML_LIST_BUDGET)


def _yaml_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    located = _load_yaml_list(path)
    data = located.data or []
    if not isinstance(data, list):
        raise ListError("a YAML list file must be a list of entries ('- email: …')", path=path,
                        line=1)
    for i, row in enumerate(data):
        line = located.line((i,)) or 0
        if not isinstance(row, dict):
            raise ListError("each entry must be a mapping with at least 'email'", path=path,
                            line=line)
        if "email" not in row:
            raise ListError("this entry has no 'email'", path=path, line=line)
        yield line, row


def _recipient(row: dict[str, Any], *, path: Path, line: int) -> Recipient:
    def fail(message: str) -> ListError:
        return ListError(message, path=path, line=line)

    raw = str(row.get("email") or "").strip()
    if not raw:
        raise fail("the email is empty: fill it in or delete the row")
    try:
        address = normalise_address(raw)
    except ValueError as exc:
        raise fail(f"'{raw}' is not a valid email address ({exc})") from None
    fields: dict[str, str] = {}
    for key, value in row.items():
        key = str(key).strip().lower()
        text = "" if value is None else str(value).strip()
        if any(c in text for c in "\r\n\0"):
            raise fail(f"column '{key}' contains a line break: remove it")
        if len(text) > FIELD_MAX:
            raise fail(f"column '{key}' is longer than {FIELD_MAX} characters")
        if key not in RESERVED:
            if not COLUMN_RE.match(key):
                raise fail(f"column name '{key}' must be lower-case letters, digits or _")
            fields[key] = text
    name = str(row.get("name") or "").strip()
    if len(name) > NAME_MAX:
        raise fail(f"the name is longer than {NAME_MAX} characters")
    language = str(row.get("language") or "").strip().lower()
    if language and not LANG_RE.match(language):
        raise fail(f"'{language}' is not a language code (use e.g. de, tr, ar)")
    return Recipient(email=address, name=name, language=language, fields=fields)


def resolve(
    lists: Iterable[str],
    settings: Settings,
    *,
    is_suppressed: Callable[[str, str], bool] = lambda key, list_name: False,
    managed: Callable[[str], list[Recipient]] | None = None,
    languages: list[str] | None = None,
) -> list[Recipient]:
    """Recipients of the lists in order, first occurrence wins, suppressed ones dropped."""
    return list(iter_audience(lists, settings, is_suppressed=is_suppressed, managed=managed,
                              languages=languages))


def iter_audience(
    lists: Iterable[str],
    settings: Settings,
    *,
    is_suppressed: Callable[[str, str], bool] = lambda key, list_name: False,
    managed: Callable[[str], list[Recipient]] | None = None,
    languages: list[str] | None = None,
) -> Iterator[Recipient]:
    """`resolve` as a stream: memory stays flat however long the lists are."""
    files = list_files(settings)
    seen: set[str] = set()
    count = 0
    for name in lists:
        members: Iterable[Recipient]
        if name in files:
            members = iter_list(files[name])
        elif managed is not None:
            members = managed(name)
        else:
            members = []
        for recipient in members:
            key = recipient.key
            if key in seen:
                continue
            seen.add(key)
            if languages and recipient.language not in languages:
                continue
            if is_suppressed(key, name):
                continue
            count += 1
            if count > settings.max_recipients:
                raise ListError(
                    f"the audience has more than max_recipients ({settings.max_recipients}) "
                    "recipients: raise max_recipients in the config if that is right")
            yield replace(recipient, list=name)


def columns(lists: Iterable[str], settings: Settings) -> set[str]:
    """Merge fields every recipient of these lists has (the intersection of file columns)."""
    files = list_files(settings)
    common: set[str] | None = None
    for name in lists:
        cols = _file_columns(files[name]) if name in files else set()
        common = cols if common is None else common & cols
    return common or set()


def _file_columns(path: Path) -> set[str]:
    """The extra columns of a list file, read without validating every row."""
    if path.suffix == ".csv":
        first = read_text(path, error=ListError, max_bytes=LIST_MAX_BYTES).split("\n", 1)[0]
        header = next(csv.reader([first]), [])
        cols = {h.strip().lower() for h in header}
    else:
        rows = _load_yaml_list(path).data or []
        keys = [set(map(str, r)) for r in rows if isinstance(r, dict)] if isinstance(rows, list) \
            else []
        cols = set.intersection(*keys) if keys else set()
    return {c for c in cols if c not in RESERVED}
