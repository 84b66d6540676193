"""Resolve a campaign's lists into recipients: validate, de-duplicate, drop suppressed.

Lists are read as streams and never held whole: a CSV list a line at a time, a YAML list an
entry at a time. De-duplication keeps an 8-byte digest and the place of every row (seen.py); a
digest met again is confirmed by reading the earlier row's key back from its place, so a
duplicate is certain and the line of its first occurrence can be named.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH

from .config import Settings
from .errors import ListError
from .seen import Seen, digest
from .yamlsrc import Budget, file_size, iter_entries, too_big

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
    plain = _plain_address(raw)
    if plain is not None:
        return plain
    try:
        return validate_email(raw, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc).rstrip(".")) from None


# email_validator costs ~40 µs an address; most addresses are a plain ASCII local part at one
# of a few domains. Such an address is normalised here, by email_validator's own rules (its
# dot-atom pattern, the RFC 2142 mailbox names, the 254-octet limit), with the domain validated
# by email_validator once per domain. Anything else goes to email_validator whole;
# tests/test_audience_stream.py checks that both give the same result.
_DOT_ATOM = re.compile(r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+(?:\.[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+)*")
_DOMAINS: dict[str, str] = {}  # a domain as written -> its normalised form (ASCII only)
_DOMAINS_MAX = 10_000


def _plain_address(raw: str) -> str | None:
    local, at, domain = raw.partition("@")
    if not at or len(raw) > EMAIL_MAX_LENGTH or not raw.isascii() or not _DOT_ATOM.fullmatch(local):
        return None
    normalised = _DOMAINS.get(domain)
    if normalised is None:
        try:
            checked = validate_email("a@" + domain, check_deliverability=False)
        except EmailNotValidError:
            return None
        if checked.domain != checked.ascii_domain:  # an IDN: its Unicode form is normalised
            return None
        normalised = checked.domain
        if len(_DOMAINS) < _DOMAINS_MAX:
            _DOMAINS[domain] = normalised
    if local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        local = local.lower()
    return f"{local}@{normalised}"


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
    """The rows of a list file, validated one by one (so a big list is never held whole); an
    address listed twice is an error naming the line of its first occurrence."""
    for _, recipient in _unique([("", _open_file(path))]):
        yield recipient


# --- list files as streams --------------------------------------------------------------------

BOM = "\N{BYTE ORDER MARK}".encode().decode("latin-1")  # as _Lines sees the UTF-8 BOM
PLACE_BITS = 40  # where a row is in its list: a byte offset (CSV files < 1 TiB) or an index


class _Source(Protocol):
    """One list of an audience, read as a stream, that can read back the key of a row it
    handed out earlier from the row's place."""

    path: Path | None  # None: a managed list, where a second row for an address is skipped

    def rows(self) -> Iterator[tuple[int, int, Recipient]]:
        """(line, place, recipient) per row."""
        ...

    def key_at(self, place: int) -> str: ...

    def line_at(self, place: int) -> int: ...


def _open_file(path: Path) -> _Source:
    return _CsvList(path) if path.suffix == ".csv" else _YamlList(path)


def _unique(sources: Iterable[tuple[str, _Source]], *,
            key_digest: Callable[[str], int] = digest) -> Iterator[tuple[str, Recipient]]:
    """(list name, recipient) for the first occurrence of every address, lists in order.

    Only a digest per row is kept (seen.py); a digest seen before is confirmed by reading the
    earlier row's key back, so two addresses sharing a digest both go through (the tests
    pass a `key_digest` under which every address collides).
    """
    seen = Seen()
    opened: list[_Source] = []
    for name, source in sources:
        index = len(opened)
        opened.append(source)
        for line, place, recipient in source.rows():
            key = recipient.key
            earlier = seen.add(key_digest(key), index << PLACE_BITS | place)
            if earlier and _repeated(opened, earlier, key, index, line, recipient):
                continue
            yield name, recipient


def _repeated(opened: list[_Source], earlier: list[int], key: str, index: int, line: int,
              recipient: Recipient) -> bool:
    """Is this row's address one that an earlier row had? Raises when its own file had it."""
    mask = (1 << PLACE_BITS) - 1
    repeated = False
    for place in earlier:
        source = opened[place >> PLACE_BITS]
        if source.key_at(place & mask) != key:
            continue  # another address with the same digest
        here = opened[index]
        if source is here and here.path is not None:
            first = here.line_at(place & mask)
            raise ListError(
                f"{recipient.email} is listed twice (first on line {first}): delete one row",
                path=here.path, line=line)
        repeated = True
    return repeated


class _CsvList:
    """A CSV list read a line at a time (the csv module's line numbers, CRLF and lone CR line
    ends as `open(newline="")` reads them); a row's place is the byte offset it starts at."""

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self._path = path
        self._header: list[str] = []

    def rows(self) -> Iterator[tuple[int, int, Recipient]]:
        for line, place, row in self._records():
            yield line, place, _recipient(row, path=self._path, line=line)

    def _records(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        file_size(self._path, error=ListError, max_bytes=LIST_MAX_BYTES)
        with _open_binary(self._path) as stream:
            lines = _Lines(stream, self._path)
            reader = csv.DictReader(lines)
            try:
                header = reader.fieldnames or []
                if "email" not in [h.strip().lower() for h in header]:
                    raise ListError(
                        "the header row has no 'email' column: the first line must name the "
                        "columns, e.g. email,name,language", path=self._path, line=1)
                self._header = list(header)
                while True:
                    place = lines.offset
                    row = next(reader, None)
                    if row is None:
                        return
                    if None in row:
                        raise ListError("this row has more values than the header has columns "
                                        "(a comma too many?)", path=self._path,
                                        line=reader.line_num)
                    if not any((v or "").strip() for v in row.values()):
                        continue
                    yield reader.line_num, place, _lower_keys(row)
            except csv.Error as exc:
                raise ListError(f"CSV error: {exc}", path=self._path,
                                line=reader.reader.line_num) from None

    def key_at(self, place: int) -> str:
        with _open_binary(self._path) as stream:
            stream.seek(place)
            row = next(csv.DictReader(_Lines(stream, self._path, start=place),
                                      fieldnames=self._header), None)
        try:
            return email_key(normalise_address(str((row and _lower_keys(row).get("email"))
                                                   or "")))
        except ValueError:
            return ""  # the file changed under us: that row is no longer this address

    def line_at(self, place: int) -> int:
        """Rare (a duplicate to name): read the file again up to that row."""
        return next((line for line, at, _ in self._records() if at == place), 0)


def _open_binary(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ListError(f"cannot read the file ({exc.strerror})", path=path) from None


def _lower_keys(row: dict[str, Any]) -> dict[str, Any]:
    return {k.strip().lower(): v for k, v in row.items()}


class _Lines:
    """The lines of a UTF-8 file from byte `start`, split where `open(newline="")` splits them
    (LF, CRLF, a lone CR), ends kept, each decoded on its own. `offset` is the byte where the
    next line starts: the csv reader takes lines only as it needs them, so before it reads a
    row, `offset` is where that row starts."""

    def __init__(self, stream: BinaryIO, path: Path, *, start: int = 0) -> None:
        self.path, self.offset = path, start
        # latin-1 maps every byte to one character: lines are split in C and measured in bytes
        self._text = io.TextIOWrapper(stream, encoding="latin-1", newline="")

    def __iter__(self) -> Iterator[str]:
        for line, raw in enumerate(self._text, start=1):
            if self.offset == 0 and raw.startswith(BOM):
                self.offset, raw = len(BOM), raw[len(BOM):]
            if self.offset + len(raw) > LIST_MAX_BYTES:  # it grew since stat()
                raise too_big(self.offset + len(raw), LIST_MAX_BYTES, path=self.path,
                              error=ListError)
            try:
                text = raw.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise ListError("the file is not UTF-8 (save it as UTF-8 in your editor)",
                                path=self.path, line=line) from None
            self.offset += len(raw)
            yield text


class _YamlList:
    """A YAML list read an entry at a time (yamlsrc.iter_entries). YAML lists are small (see
    YAML_LIST_BUDGET), so the keys are kept to compare with: a row's place is its index."""

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self._path = path
        self._keys: list[str] = []
        self._lines = array("L")

    def rows(self) -> Iterator[tuple[int, int, Recipient]]:
        for line, row in _yaml_rows(self._path):
            recipient = _recipient(row, path=self._path, line=line)
            self._keys.append(recipient.key)
            self._lines.append(line)
            yield line, len(self._keys) - 1, recipient

    def key_at(self, place: int) -> str:
        return self._keys[place]

    def line_at(self, place: int) -> int:
        return self._lines[place]


class ManagedList(Protocol):
    """A list kept in the store (subscribers.StoredList): its members in order, each with an
    id, read as a stream; and the key of one member, asked for again by its id."""

    def members(self) -> Iterator[tuple[int, Recipient]]: ...
    def key_of(self, member_id: int) -> str: ...


class _Members:
    """A managed list's confirmed members; a row's place is the member's id."""

    path: Path | None = None

    def __init__(self, source: ManagedList) -> None:
        self._source = source

    def rows(self) -> Iterator[tuple[int, int, Recipient]]:
        for member_id, recipient in self._source.members():
            yield 0, member_id, recipient

    def key_at(self, place: int) -> str:
        return self._source.key_of(place)

    def line_at(self, place: int) -> int:
        return 0


def _yaml_entries(path: Path) -> Iterator[tuple[int, Any]]:
    with contextlib.suppress(OSError):  # read_text says why it cannot read the file
        size = path.stat().st_size
        if size > YAML_LIST_BUDGET.max_bytes:
            raise ListError(f"file is {size // 1024} KiB, more than the "
                            f"{YAML_LIST_BUDGET.max_bytes // 1024} KiB allowed for a YAML list: "
                            "save big lists as CSV", path=path)
    return iter_entries(path, error=ListError, budget=YAML_LIST_BUDGET,
                        not_a_list="a YAML list file must be a list of entries ('- email: …')")


def _yaml_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, row in _yaml_entries(path):
        if not isinstance(row, dict):
            raise ListError("each entry must be a mapping with at least 'email'", path=path,
                            line=line)
        if "email" not in row:
            raise ListError("this entry has no 'email'", path=path, line=line)
        yield line, row


_BREAK = re.compile(r"[\r\n\0]")
_COLUMNS_SEEN: set[str] = set()  # column names COLUMN_RE has accepted


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
        if _BREAK.search(text):
            raise fail(f"column '{key}' contains a line break: remove it")
        if len(text) > FIELD_MAX:
            raise fail(f"column '{key}' is longer than {FIELD_MAX} characters")
        if key not in RESERVED:
            if key not in _COLUMNS_SEEN:  # the same few column names on every row
                if not COLUMN_RE.match(key):
                    raise fail(f"column name '{key}' must be lower-case letters, digits or _")
                if len(_COLUMNS_SEEN) < 1024:
                    _COLUMNS_SEEN.add(key)
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
    managed: Callable[[str], ManagedList] | None = None,
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
    managed: Callable[[str], ManagedList] | None = None,
    languages: list[str] | None = None,
) -> Iterator[Recipient]:
    """`resolve` as a stream: memory stays flat however long the lists are."""
    files = list_files(settings)

    def sources() -> Iterator[tuple[str, _Source]]:
        for name in lists:
            if name in files:
                yield name, _open_file(files[name])
            elif managed is not None:
                yield name, _Members(managed(name))

    count = 0
    for name, recipient in _unique(sources()):
        if languages and recipient.language not in languages:
            continue
        if is_suppressed(recipient.key, name):
            continue
        count += 1
        if count > settings.max_recipients:
            raise ListError(
                f"the audience has more than max_recipients ({settings.max_recipients}) "
                "recipients: raise max_recipients in the config if that is right")
        # (not dataclasses.replace: per row, its field lookups cost more than the row's checks)
        yield Recipient(recipient.email, recipient.name, recipient.language, recipient.fields,
                        name)


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
        file_size(path, error=ListError, max_bytes=LIST_MAX_BYTES)
        with _open_binary(path) as stream:
            try:
                header = next(csv.reader(_Lines(stream, path)), [])
            except csv.Error as exc:
                raise ListError(f"CSV error: {exc}", path=path, line=1) from None
        cols = {h.strip().lower() for h in header}
    else:
        common: set[str] | None = None
        for _, row in _yaml_entries(path):
            if isinstance(row, dict):
                keys = set(map(str, row))
                common = keys if common is None else common & keys
        cols = common or set()
    return {c for c in cols if c not in RESERVED}
