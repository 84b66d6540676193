"""Lists are read as streams (issue 13): memory does not grow with a list, duplicates are
still found exactly and named by the line of their first occurrence, limits are kept."""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.audience import (
    LIST_MAX_BYTES,
    _open_file,
    _unique,
    columns,
    iter_audience,
    iter_list,
    load_list,
    normalise_address,
)
from mailer.checks import check_campaign
from mailer.errors import ListError
from mailer.seen import Seen, digest
from mailer.sending import test_send as send_test_mails
from mailer.yamlsrc import Budget, iter_entries, load_yaml
from tests.conftest import CROWD_CAMPAIGN, Project, both_databases
from tests.helpers import run_mailer

NOTE = "Nachbarschaft in der Nordstadt. " * 28  # ~900 characters, twice a row


def write_rows(path: Path, rows: int, *, start: int = 0) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("email,name,language,note,more\n")
        for i in range(start, start + rows):
            fh.write(f"person{i}@example.org,Person {i},{('de', 'tr', 'ar')[i % 3]},{NOTE},"
                     f"{NOTE}\n")
    return path


def peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """fn() and the most Python memory it held at once (after a warm-up call elsewhere)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def warm_up(project: Project) -> None:
    """email_validator, csv and yamlsrc load their tables on first use: not the list's cost."""
    path = write_rows(project.root / "lists" / "warm.csv", 3)
    assert len(load_list(path)) == 3
    path.unlink()


# --- memory (tracemalloc slows every allocation: few rows, wide ones) -----------------------


def test_a_list_is_validated_holding_a_row_and_a_few_bytes_per_row(project: Project) -> None:
    rows = 3000
    path = write_rows(project.root / "lists" / "crowd.csv", rows)
    warm_up(project)
    count, peak = peak_bytes(lambda: sum(1 for _ in iter_list(path)))
    assert count == rows and path.stat().st_size > 5 * 2**20
    # Measured: ~130 KB. Reading the text whole costs twice the file's 5 MB (bytes, then
    # str); a dict of every key, as before, ~150 bytes a row (+450 KB).
    assert peak < 320 * 1024, f"{peak / 1024:.0f} KB peak for {rows} rows"


def test_an_audience_streams_and_its_check_keeps_only_a_count(project: Project) -> None:
    write_rows(project.root / "lists" / "crowd.csv", 600)
    write_rows(project.root / "lists" / "more.csv", 600, start=300)  # half of it repeats
    project.campaign("crowd.yaml", CROWD_CAMPAIGN.replace("[crowd]", "[crowd, more]"))
    project.campaign("warm.yaml", CROWD_CAMPAIGN.replace("[crowd]", "[partners]"))
    settings = project.settings()
    warm_up(project)
    audience = iter_audience(["crowd", "more"], settings)
    count, peak = peak_bytes(lambda: sum(1 for _ in audience))
    assert count == 900
    assert peak < 256 * 1024, f"{peak / 1024:.0f} KB peak for 2 MB of lists"

    check_campaign(project.root / "campaigns" / "warm.yaml", settings)  # templates compiled
    tracemalloc.start()
    try:
        checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(checked.recipients) == 900
    assert kept < 256 * 1024, f"{kept / 1024:.0f} KB kept after the check"  # a list: 1.6 MB
    first = next(iter(checked.recipients))  # read again from the files on demand
    assert (first.email, first.list, first.fields["more"]) == (
        "person0@example.org", "crowd", NOTE.strip())


def test_the_digest_table_takes_about_25_bytes_a_row() -> None:
    rows = 50_000
    digests = [digest(f"person{i}@example.org") for i in range(rows)]
    seen, peak = peak_bytes(lambda: _fill(digests))
    assert isinstance(seen, Seen) and len(seen) == rows
    assert peak < 32 * rows, f"{peak / rows:.0f} bytes a row"  # a set of the ints: ~70


def _fill(digests: list[int]) -> Seen:
    seen = Seen()
    for place, d in enumerate(digests):
        assert seen.add(d, place) == []
    return seen


def test_the_digest_table_returns_every_earlier_place_of_a_digest() -> None:
    rng = random.Random(13)
    choices = [rng.getrandbits(64) for _ in range(400)]
    choices += [choices[0] ^ 1 << 63, choices[0] ^ 1 << 40]  # same slot, another digest
    seen, places = Seen(), defaultdict(list)
    for place in range(5000):  # the table grows several times on the way
        d = rng.choice(choices)
        assert seen.add(d, place) == places[d]
        places[d].append(place)
        assert seen.places(d) == places[d]  # a lookup adds nothing
    assert len(seen) == 5000
    assert all(seen.places(d) == places[d] for d in choices)
    assert seen.places(choices[0] ^ 1 << 62) == []


def test_columns_read_the_header_alone(project: Project) -> None:
    path = write_rows(project.root / "lists" / "crowd.csv", 6000)
    warm_up(project)
    settings = project.settings()
    cols, peak = peak_bytes(lambda: columns(["crowd"], settings))
    assert cols == {"note", "more"}
    assert peak < 256 * 1024, f"{peak / 2**20:.1f} MB to read a header"
    assert path.stat().st_size > 10 * 1024 * 1024


# --- duplicates -----------------------------------------------------------------------------


def crlf_with_gaps() -> bytes:
    lines = ["email,name,language"] + [f"person{i}@example.org,P {i},de" for i in range(3000)]
    lines[1500:1500] = ["", ",,", "  , , "]  # a blank line and empty rows still count
    lines.append("Person1400@EXAMPLE.org,again,tr")
    return ("\r\n".join(lines) + "\r\n").encode()


TWICE = "".join(f"- email: person{i}@example.org\n  name: P {i}\n" for i in range(500))


@pytest.mark.parametrize(("name", "content", "line", "address", "first"), [
    ("crowd.csv", crlf_with_gaps(), 3005, "Person1400@example.org", 1402),
    ("crowd.yaml", TWICE + "- {email: PERSON77@example.org}\n", 1001, "PERSON77@example.org",
     155),
])
def test_a_duplicate_names_the_line_of_its_first_occurrence(
        project: Project, name: str, content: str | bytes, line: int, address: str,
        first: int) -> None:
    path = project.list_file(name, content)
    with pytest.raises(ListError) as caught:
        load_list(path)
    assert caught.value.sentence() == (
        f"{path}, line {line}: {address} is listed twice (first on line {first}): "
        "delete one row")


def test_a_duplicate_through_the_cli_is_one_sentence(project: Project) -> None:
    project.crowd(2000, special={1999: "Person123@example.org"})
    result = run_mailer(project, "validate", "crowd")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    path = project.root / "lists" / "crowd.csv"
    assert result.stderr.splitlines() == [
        f"error: {path}, line 2001: Person123@example.org is listed twice (first on line 125): "
        "delete one row", "1 of 1 campaign files have problems"]


def collide(key: str) -> int:
    """Every address has the same digest: only the exact comparison tells them apart."""
    return 42


def sources(project: Project, *names: str) -> Iterator[tuple[str, object]]:
    for name in names:
        yield name, _open_file(next((project.root / "lists").glob(f"{name}.*")))


def test_addresses_sharing_a_digest_are_never_dropped(project: Project) -> None:
    project.list_file("one.csv", "email,name\na@example.org,A\nb@example.org,B\n"
                                 "c@example.org,C\n")
    project.list_file("two.yaml", "- {email: C@example.org}\n- {email: d@example.org}\n")
    project.list_file("three.csv", "email\r\nb@example.org\r\ne@example.org\r\n")
    got = [(name, r.email) for name, r in _unique(
        sources(project, "one", "two", "three"), key_digest=collide)]  # type: ignore[arg-type]
    assert got == [("one", "a@example.org"), ("one", "b@example.org"), ("one", "c@example.org"),
                   ("two", "d@example.org"), ("three", "e@example.org")]


def test_a_file_listing_an_address_twice_is_refused_whatever_the_digests(
        project: Project) -> None:
    project.list_file("one.csv", "email\nx@example.org\n")
    path = project.list_file("two.csv", "email\nw@example.org\nX@example.org\ny@example.org\n"
                                        "x@EXAMPLE.org\n")
    with pytest.raises(ListError) as caught:  # x is in one.csv too: still two.csv's mistake
        list(_unique(sources(project, "one", "two"), key_digest=collide))  # type: ignore[arg-type]
    assert caught.value.sentence() == (
        f"{path}, line 5: x@example.org is listed twice (first on line 3): delete one row")


def test_the_first_list_wins_across_lists(project: Project) -> None:
    project.list_file("one.csv", "email,name\nAnna@Example.org,Anna\n")
    project.list_file("two.csv", "email,name\nb@example.org,B\nanna@example.org,Anna 2\n")
    got = [(r.email, r.name, r.list) for r in iter_audience(["two", "one"],
                                                            project.settings())]
    assert got == [("b@example.org", "B", "two"), ("anna@example.org", "Anna 2", "two")]


# --- limits, line ends, encodings -----------------------------------------------------------


def test_a_list_over_the_size_limit_is_refused_before_reading(project: Project) -> None:
    path = project.list_file("huge.csv", "email,name\na@example.org,A\n")
    with path.open("r+b") as fh:
        fh.truncate(LIST_MAX_BYTES + 1)  # sparse: NUL bytes nobody may read
    project.campaign("c.yaml", CROWD_CAMPAIGN.replace("[crowd]", "[huge]"))
    words = f"file is {LIST_MAX_BYTES // 1024} KiB, more than the {LIST_MAX_BYTES // 1024} KiB " \
            "allowed"
    settings = project.settings()
    for read in (lambda: load_list(path), lambda: columns(["huge"], settings)):
        with pytest.raises(ListError) as caught:
            peak_bytes(read)
        assert caught.value.sentence() == f"{path}: {words}"
    _, peak = peak_bytes(lambda: pytest.raises(ListError, load_list, path))
    assert peak < 2**20  # refused by its size, not by reading 256 MiB
    result = run_mailer(project, "validate", "c")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"error: {path}: {words}", "1 of 1 campaign files have problems"]


def test_lone_cr_crlf_and_a_byte_order_mark_read_as_before(project: Project) -> None:
    mac = project.list_file("mac.csv", b"email,name,verein\ra@example.org,A,x\r\rb@example.org,"
                                       b"B,y\r")
    assert [(r.email, r.fields) for r in load_list(mac)] == [
        ("a@example.org", {"verein": "x"}), ("b@example.org", {"verein": "y"})]
    assert columns(["mac"], project.settings()) == {"verein"}  # was a csv.Error
    bom = project.list_file("bom.csv", "\ufeffemail,name\r\na@example.org,A\r\nb@example,B\r\n"
                            .encode())
    with pytest.raises(ListError) as caught:
        load_list(bom)
    assert caught.value.line == 3 and "'b@example' is not a valid email address" in \
        caught.value.message


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_byte_that_is_not_utf8_names_its_line(project: Project, end: str) -> None:
    body = "".join(f"person{i}@example.org,Zoë {i}{end}" for i in range(5000)).encode()
    path = project.list_file("latin.csv", b"email,name" + end.encode() + body
                             + b"z@example.org,Jos\xe9" + end.encode())
    with pytest.raises(ListError) as caught:
        load_list(path)
    assert caught.value.sentence() == (
        f"{path}, line 5002: the file is not UTF-8 (save it as UTF-8 in your editor)")


def test_a_yaml_list_is_handed_out_an_entry_at_a_time(project: Project) -> None:
    text = "".join(f"- email: person{i}@example.org\n  name: P {i}\n" for i in range(100))
    path = project.list_file("many.yaml", text)
    streamed = list(iter_entries(path, error=ListError, budget=Budget(), not_a_list="no"))
    whole = load_yaml(path, error=ListError)
    assert [e for _, e in streamed] == whole.data
    assert [line for line, _ in streamed] == [whole.line((i,)) for i in range(100)]
    # a mistake at the end: the entries before it were handed out before it was read
    broken = project.list_file("broken.yaml", text + "- email: [unclosed\n")
    got = []
    with pytest.raises(ListError, match="YAML syntax error"):
        for _, entry in iter_entries(broken, error=ListError, budget=Budget(), not_a_list="no"):
            got.append(entry["email"])
    assert len(got) == 100
    mapping = project.list_file("mapping.yaml", "email: a@example.org\n")
    with pytest.raises(ListError, match=r"mapping\.yaml, line 1: not a list$"):
        list(iter_entries(mapping, error=ListError, budget=Budget(), not_a_list="not a list"))


def test_a_test_send_to_a_listed_address_uses_its_row(project: Project) -> None:
    project.crowd(300)
    settings = project.settings()
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings,
                             with_audience=False)
    results = asyncio.run(send_test_mails(checked, settings, ["Person250@example.org",
                                                        "stranger@example.org"]))
    assert [sent for _, sent, _ in results] == [True, True]
    subjects = sorted(
        str(email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["Subject"])
        for p in (settings.outbox_dir / "new").iterdir())
    assert subjects == ["[TEST] Hallo Erika Mustermann", "[TEST] Hallo Person 250"]


# --- managed lists: read from the store as a stream -----------------------------------------


@both_databases
def test_a_managed_list_streams_from_the_store_and_its_duplicates_are_exact(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The members come in chunks (here of 2), each with its id as its place; an address a
    file list had first is dropped, whatever the digests, by reading its key back."""
    from mailer import subscribers as subs
    from mailer.audience import Recipient, _Members
    from mailer.store import open_store
    from mailer.store import queries as q

    monkeypatch.setattr(subs, "MEMBER_CHUNK", 2)
    store = open_store(project.settings().database_url)
    people = [Recipient(f"m{i}@example.org", f"M {i}", "de") for i in range(5)]
    with store.engine.begin() as conn:
        subs.import_members(conn, [*people, Recipient("A@example.org", "Anna", "tr")],
                            list_name="newsletter", consent_source="Anmeldeliste 2026",
                            send_confirmation=False)
    project.list_file("one.csv", "email,name\na@example.org,A\nm3@example.org,M\n")
    stored = subs.StoredList(store, "newsletter")
    with store.engine.connect() as conn:
        ids = [i for i, _ in subs.iter_members(conn, "newsletter")]
        # The chunked read leaves the connection as it was (on PostgreSQL a connection-wide
        # yield_per would wrap this insert in a server-side cursor and fail).
        q.suppress(conn, "later@example.org", reason="unsubscribed")
    assert ids == sorted(ids) and len(ids) == 6
    assert stored.key_of(ids[5]) == "a@example.org" and stored.key_of(max(ids) + 1) == ""
    for key_digest in (digest, collide):
        got = [(name, r.email) for name, r in _unique(
            [*sources(project, "one"), ("newsletter", _Members(stored))],
            key_digest=key_digest)]  # type: ignore[arg-type]
        assert got == [("one", "a@example.org"), ("one", "m3@example.org")] + [
            ("newsletter", f"m{i}@example.org") for i in (0, 1, 2, 4)]
        # The other way round the file's rows are the repeats: the member's key is read back.
        project.list_file("two.csv", "email\nm2@example.org\nb@example.org\nA@example.org\n")
        got = [(name, r.email) for name, r in _unique(
            [("newsletter", _Members(stored)), *sources(project, "two")],
            key_digest=key_digest)]  # type: ignore[arg-type]
        assert got == [("newsletter", r.email) for r in people] + [
            ("newsletter", "A@example.org"), ("two", "b@example.org")]


@both_databases
@pytest.mark.parametrize("key_digest", ["blake2b", "collide"])
def test_suppressions_are_kept_as_digests_and_each_hit_is_confirmed_by_the_store(
        project: Project, monkeypatch: pytest.MonkeyPatch, key_digest: str) -> None:
    """The audience filter holds a digest per suppression, not the list: a digest that is
    there is confirmed by a query, so a namesake digest drops nobody (`collide`: all share
    one), and an erased address is found by its hash."""
    from mailer import sending
    from mailer.store import open_store
    from mailer.store import queries as q

    if key_digest == "collide":
        monkeypatch.setattr(sending, "digest", collide)  # the lookup
        monkeypatch.setattr(q, "digest", collide)  # the table
    addresses = project.crowd(6)
    settings = project.settings()
    store = open_store(settings.database_url)
    with store.engine.begin() as conn:
        q.suppress(conn, addresses[0], reason="unsubscribed", list_name="crowd")
        q.suppress(conn, addresses[1], reason="unsubscribed", list_name="other")
        q.suppress(conn, addresses[2], reason="hard_bounce")
        q.suppress(conn, q.hashed_key(addresses[3]), reason="erased")
        digests, erased = q.suppression_digests(conn)
    assert len(digests) == 4 and erased
    checked = check_campaign(project.root / "campaigns" / "crowd.yaml", settings,
                             with_audience=False)
    got = [r.email for r in sending.audience(checked, settings, store)]
    assert got == [addresses[1], addresses[4], addresses[5]]


# -- the address fast path ----------------------------------------------------------------------

def _email_validator(raw: str) -> str | ValueError:
    """What normalise_address said before its fast path: email_validator on every address."""
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        return ValueError(str(exc).rstrip("."))


def _normalised(raw: str) -> str | ValueError:
    try:
        return normalise_address(raw)
    except ValueError as exc:
        return exc


LOCALS = st.one_of(
    st.sampled_from(["anna", "Anna.Schmidt", "a+tag", "o'brien", "x_y-z", "postmaster",
                     "Info", "ABUSE", "WebMaster", "a..b", ".a", "a.", "", "a b", '"a b"',
                     "ü", "jürgen", "e\u0301", "a" * 64, "a" * 65, "a" * 240, "a@b", "<a>",
                     "a(b)", "a\\b", "{|}~"]),
    st.text(alphabet="aZ09._-+!#$%&'*=?^`{|}~/\"() ü@", max_size=12),
)
DOMAINS = st.one_of(
    st.sampled_from(["example.org", "EXAMPLE.org", "Web.Example.Org", "exa_mple.org",
                     "-a.example.org", "a-.example.org", "a..example.org", "example.org.",
                     ".example.org", "localhost", "example", "a.test", "a.invalid", "a.local",
                     "a.onion", "123.456", "1.2.3.4", "[127.0.0.1]", "ex ample.org",
                     "xn--mller-kva.example.org", "müller.example.org", "XN--MLLER-KVA.org",
                     "a" * 63 + ".org", "a" * 64 + ".org", ("a" * 60 + ".") * 4 + "org",
                     "example.org>", "b@example.org", "exämple.org", "example.o-g"]),
    st.text(alphabet="aZ09.-_ü[]", max_size=12),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(local=LOCALS, domain=DOMAINS, pad=st.sampled_from(["", " ", "\t"]))
def test_the_address_fast_path_says_what_email_validator_says(local: str, domain: str,
                                                               pad: str) -> None:
    raw = f"{pad}{local}@{domain}{pad}"
    # twice: once with the domain perhaps new to the cache, once with it known
    assert _normalised(raw).__repr__() == _email_validator(raw).__repr__()
    assert _normalised(raw).__repr__() == _email_validator(raw).__repr__()


@pytest.mark.parametrize(("raw", "expected"), [
    ("Postmaster@Example.ORG", "postmaster@example.org"),  # RFC 2142 names are lowercased
    ("Anna.Schmidt@Example.ORG", "Anna.Schmidt@example.org"),  # other local parts keep case
    ("a@xn--mller-kva.example.org", "a@müller.example.org"),  # an IDN in its Unicode form
])
def test_addresses_are_normalised(raw: str, expected: str) -> None:
    assert normalise_address(raw) == expected


def test_an_address_over_254_octets_is_refused_at_a_known_domain() -> None:
    normalise_address("short@example.org")  # the domain is now known
    with pytest.raises(ValueError, match="too long"):
        normalise_address("a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example.org")
