"""Read returned mail: a maildir or mbox file (`mailer mailbox import`) or an IMAP folder
(`mailer mailbox fetch`, polled by `mailer run`); bounces.py understands and acts on each mail.

Each mail is one transaction: its record in `returned_mails` and everything it causes commit
together or not at all, so a failure half-way applies nothing and reading the mail again later
(or twice) is safe. A mail that cannot be read is one sentence; the rest is still processed.
IMAP: processed mail is moved to `processed_folder` (or flagged `$MailerProcessed`), a mail
too large to read is flagged `$MailerSkipped`; nothing is ever deleted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mailbox
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bounces import Applied, apply, classify
from .config import MailboxSettings, Settings
from .errors import ConfigError, MailerError
from .store import Store
from .tokens import Tokens

log = logging.getLogger("mailer.mailbox")

PROCESSED_FLAG = "$MailerProcessed"
SKIPPED_FLAG = "$MailerSkipped"


class MailboxError(MailerError):
    """The mailbox cannot be read at all (not there, login refused): one sentence."""


@dataclass(frozen=True, slots=True)
class Item:
    """One mail from a source: its bytes, or why it is skipped."""

    ref: str  # names it in a sentence: a file, "mbox.txt, message 3", "IMAP UID 17"
    data: bytes | None = None
    problem: str = ""


@dataclass
class Summary:
    read: int = 0
    already: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(self.kinds.items()))
        done = ", ".join(f"{n} {a}" for a, n in sorted(self.actions.items()))
        parts = [f"{self.read} mails read"]
        if kinds:
            parts.append(kinds)
        if done:
            parts.append(f"actions: {done}")
        if self.already:
            parts.append(f"{self.already} read before (nothing changed)")
        if self.problems:
            parts.append(f"{len(self.problems)} skipped")
        return "; ".join(parts)


# --- one mail -----------------------------------------------------------------------------


def process(store: Store, settings: Settings, item: Item, *, source: str, tokens: Tokens,
            summary: Summary) -> bool:
    """Understand and act on one mail in one transaction; False if it was skipped."""
    if item.data is None:
        summary.problems.append(f"{item.ref}: {item.problem}")
        return False
    if not item.data.strip():
        summary.problems.append(f"{item.ref}: skipped: the mail is empty")
        return False
    try:
        returned = classify(item.data, settings)
        with store.engine.begin() as conn:
            applied = apply(conn, returned, settings=settings, tokens=tokens, source=source)
    except Exception as exc:  # this mail is rolled back whole; the others go on
        log.warning("a returned mail could not be processed (%s): %s", item.ref,
                    type(exc).__name__)
        summary.problems.append(f"{item.ref}: could not be processed ({type(exc).__name__}); "
                                "nothing of it was applied")
        return False
    summary.read += 1
    if applied is None:
        summary.already += 1
    else:
        _count(summary, applied)
        log.info("returned mail %s: %s", item.ref, applied.sentence)
    return True


def _count(summary: Summary, applied: Applied) -> None:
    summary.kinds[applied.kind.value] += 1
    if applied.action:
        summary.actions[applied.action] += 1


# --- files: maildir and mbox --------------------------------------------------------------


def read_paths(paths: Iterable[Path], *, max_bytes: int) -> Iterator[Item]:
    """Every mail under these paths (maildirs and mbox files); a path that is neither is one
    problem item and the next path is still read."""
    for path in paths:
        if not path.exists():
            yield Item(str(path), problem="no such file or folder")
        elif path.is_dir():
            yield from _maildir(path, max_bytes=max_bytes)
        else:
            yield from _mbox(path, max_bytes=max_bytes)


def path_kind(path: Path) -> str:
    return "maildir" if path.is_dir() else "mbox"


def _maildir(path: Path, *, max_bytes: int) -> Iterator[Item]:
    subdirs = [path / "new", path / "cur"]
    if not any(d.is_dir() for d in subdirs):
        yield Item(str(path), problem="is a folder but not a maildir (it has no cur/ or new/)")
        return
    for sub in subdirs:
        if not sub.is_dir():
            continue
        for file in sorted(sub.iterdir()):
            if file.name.startswith(".") or not file.is_file():
                continue
            yield _file_item(file, max_bytes=max_bytes)


def _file_item(file: Path, *, max_bytes: int) -> Item:
    try:
        size = file.stat().st_size
        if size > max_bytes:
            return Item(str(file), problem=_too_big(size, max_bytes))
        return Item(str(file), data=file.read_bytes())
    except OSError as exc:
        return Item(str(file), problem=f"cannot be read ({exc.strerror or exc})")


def _too_big(size: int, max_bytes: int) -> str:
    return (f"skipped: {_amount(size, exact=False)} is more than the {_amount(max_bytes)} a "
            "returned mail may have (bounces.max_message_bytes); it was left as it is")


def _amount(n: int, *, exact: bool = True) -> str:
    """50.0 MB, 10 MB, 98 KB: sizes as the operator set and reads them."""
    if n < 1 << 20:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1 << 20):.0f} MB" if exact and n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MB"


def _mbox(path: Path, *, max_bytes: int) -> Iterator[Item]:
    try:
        with path.open("rb") as fh:
            head = fh.read(5)
    except OSError as exc:
        yield Item(str(path), problem=f"cannot be read ({exc.strerror or exc})")
        return
    if head != b"From ":
        yield Item(str(path), problem="is neither a maildir nor an mbox file (an mbox starts "
                   "with a 'From ' line); nothing in it was read")
        return
    box = mailbox.mbox(path, create=False)
    try:
        for number, key in enumerate(box.iterkeys(), start=1):
            ref = f"{path}, message {number}"
            with box.get_file(key) as fh:  # never more than the limit in memory
                data = fh.read(max_bytes + 1)
                size = len(data) + sum(len(chunk) for chunk in iter(
                    lambda: fh.read(1 << 20), b"")) if len(data) > max_bytes else len(data)
            if size > max_bytes:
                yield Item(ref, problem=_too_big(size, max_bytes))
            else:
                yield Item(ref, data=data)
    finally:
        box.close()


def import_paths(store: Store, settings: Settings, paths: Iterable[Path]) -> Summary:
    tokens = Tokens(settings.secret())
    summary = Summary()
    for path in paths:
        for item in read_paths([path], max_bytes=settings.bounces.max_message_bytes):
            process(store, settings, item, source=path_kind(path), tokens=tokens,
                    summary=summary)
    return summary


# --- IMAP -----------------------------------------------------------------------------------


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quote(name: str) -> str:
    """An IMAP mailbox name as a quoted string (RFC 3501 §4.3)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(cfg: MailboxSettings | None) -> MailboxSettings:
    if cfg is None:
        raise ConfigError("no mailbox is configured: add a 'mailbox:' block (host, username, "
                          "folder) to the config", field="mailbox")
    if not cfg.password:
        raise ConfigError("the mailbox password is missing: set MAILER_MAILBOX_PASSWORD",
                          field="mailbox")
    if cfg.tls == "none" and not _is_local(cfg.host):
        raise ConfigError(f"the login to {cfg.host} would cross the network unencrypted: set "
                          "mailbox.tls to tls (port 993)", field="mailbox.tls")
    return cfg


async def _connect(cfg: MailboxSettings) -> Any:
    import aioimaplib

    port = cfg.effective_port
    where = f"the IMAP server {cfg.host}:{port}"
    try:
        if cfg.tls == "tls":
            client = aioimaplib.IMAP4_SSL(host=cfg.host, port=port, timeout=cfg.timeout_s)
        else:
            client = aioimaplib.IMAP4(host=cfg.host, port=port, timeout=cfg.timeout_s)
        await client.wait_hello_from_server()
    except (OSError, TimeoutError) as exc:
        raise MailboxError(f"cannot reach {where} ({exc.__class__.__name__}: "
                           f"{getattr(exc, 'strerror', None) or exc or 'no answer'})") from None
    response = await client.login(cfg.username, cfg.password or "")
    if response.result != "OK":
        await _close(client)
        raise MailboxError(f"{where} refused the login of '{cfg.username}': check "
                           "mailbox.username and MAILER_MAILBOX_PASSWORD")
    response = await client.select(_quote(cfg.folder))
    if response.result != "OK":
        await _close(client)
        raise MailboxError(f"{where} has no folder '{cfg.folder}' (mailbox.folder)")
    return client


async def _close(client: Any) -> None:
    try:
        await client.logout()
    except Exception:  # already gone: nothing to tidy up
        log.debug("IMAP logout failed", exc_info=True)


_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


async def _uids(client: Any) -> list[str]:
    response = await client.uid_search(f"UNKEYWORD {PROCESSED_FLAG} UNKEYWORD {SKIPPED_FLAG}",
                                       charset=None)
    if response.result != "OK":
        raise MailboxError("the IMAP server refused to list the mails of the folder")
    first = bytes(response.lines[0]) if response.lines else b""
    return [u.decode() for u in first.split() if u.isdigit()]


async def _size(client: Any, uid: str) -> int:
    response = await client.uid("fetch", uid, "(RFC822.SIZE)")
    for line in response.lines:
        found = _SIZE.search(bytes(line))
        if found:
            return int(found.group(1))
    return 0


async def _body(client: Any, uid: str) -> bytes | None:
    response = await client.uid("fetch", uid, "(BODY.PEEK[])")  # PEEK: stays unread
    if response.result != "OK":
        return None
    literals = [bytes(x) for x in response.lines if isinstance(x, bytearray)]
    return literals[0] if literals else None


async def _done(client: Any, uid: str, cfg: MailboxSettings) -> None:
    """Processed: moved to processed_folder (MOVE, RFC 6851), else flagged where it is."""
    if cfg.processed_folder and client.has_capability("MOVE"):
        response = await client.uid("move", uid, _quote(cfg.processed_folder))
        if response.result == "OK":
            return
    await client.uid("store", uid, "+FLAGS", f"({PROCESSED_FLAG} \\Seen)")


async def fetch(store: Store, settings: Settings) -> Summary:
    """Read every new mail of the configured IMAP folder once."""
    cfg = _check(settings.mailbox)
    tokens = Tokens(settings.secret())
    summary = Summary()
    client = await _connect(cfg)
    try:
        if cfg.processed_folder:
            await client.create(_quote(cfg.processed_folder))  # NO when it exists: fine
        for uid in await _uids(client):
            await _one_imap(client, uid, store=store, settings=settings, tokens=tokens,
                            summary=summary)
    finally:
        await _close(client)
    return summary


async def _one_imap(client: Any, uid: str, *, store: Store, settings: Settings,
                    tokens: Tokens, summary: Summary) -> None:
    cfg = _check(settings.mailbox)
    ref = f"IMAP {cfg.folder} UID {uid}"
    limit = settings.bounces.max_message_bytes
    size = await _size(client, uid)
    if size > limit:
        summary.problems.append(f"{ref}: {_too_big(size, limit)}")
        await client.uid("store", uid, "+FLAGS", f"({SKIPPED_FLAG})")
        return
    data = await _body(client, uid)
    item = Item(ref, data=data, problem="" if data is not None else "could not be fetched")
    # The store is synchronous (SQLAlchemy): off the event loop, like the dispatcher's writes.
    ok = await asyncio.to_thread(process, store, settings, item, source="imap", tokens=tokens,
                                 summary=summary)
    if ok:
        await _done(client, uid, cfg)


async def poll(store: Store, settings: Settings, stop: asyncio.Event) -> None:
    """`mailer run` (the leader): read the IMAP folder every `mailbox.poll_s` until stopped.
    A failed round (server down, login refused) is one warning; the next round tries again."""
    try:
        cfg = _check(settings.mailbox)
    except ConfigError as exc:
        log.error("mailbox: %s; returned mail is not read", exc)
        return
    while not stop.is_set():
        try:
            summary = await fetch(store, settings)
            if summary.read or summary.problems:
                log.info("mailbox: %s", summary.line())
            for problem in summary.problems:
                log.warning("mailbox: %s", problem)
        except MailerError as exc:
            log.warning("mailbox: %s; trying again in %.0f s", exc, cfg.poll_s)
        except Exception as exc:  # never let the mailbox stop the scheduler
            log.exception("mailbox: the poll failed (%s)", type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), timeout=cfg.poll_s)
        except TimeoutError:
            continue
