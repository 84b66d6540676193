"""What `mailer send` does, as functions the CLI and the scheduler share."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import Connection

from .audience import Recipient, email_key, iter_audience, normalise_address
from .checks import Checked, sample_recipient
from .compose import Composer, message_id
from .config import Settings
from .dispatch import RunResult, deliver_run, start_run, stop_on_signals
from .errors import UserError
from .relay import open_transport
from .seen import digest
from .store import ONCE, RunStatus, Store
from .store import queries as q
from .tokens import Tokens
from .transport import Outcome, Outgoing


def occurrence_for(checked: Checked, *, again: bool, now: datetime) -> str:
    """A one-off campaign has one occurrence; a manual send of a cron campaign makes its own."""
    schedule = checked.campaign.schedule
    stamp = now.strftime("%Y%m%dT%H%M%S.%f")  # two --again sends in one second stay two
    if again:
        return f"again-{stamp}"
    if schedule is not None and schedule.cron is not None:
        return f"manual-{stamp}"
    return ONCE


def audience(checked: Checked, settings: Settings, store: Store) -> Iterator[Recipient]:
    """File lists from lists/, managed lists from the store (confirmed members only), as a
    stream: a run's snapshot consumes it in chunks, so memory does not grow with the list."""
    from . import subscribers

    campaign = checked.campaign
    with store.engine.connect() as conn:
        digests, erased = q.suppression_digests(conn)

    def is_suppressed(key: str, list_name: str) -> bool:
        # No digest: certainly not suppressed. Only a suppressed address (or, once in 2^64,
        # a namesake digest) costs a query. Without erased entries no address is hashed.
        keys = (key, q.hashed_key(key)) if erased else (key,)
        if not any(digests.places(digest(k)) for k in keys):
            return False
        with store.engine.connect() as conn:
            return bool(q.suppressed_among(conn, [(key, list_name)]))

    return iter_audience(campaign.audience.lists, settings, is_suppressed=is_suppressed,
                         managed=lambda name: subscribers.StoredList(store, name),
                         languages=campaign.audience.languages)


@dataclass
class Plan:
    run: q.Run | None
    message: str
    number: int = 0  # the run's number within its campaign (1, 2, 3 …), what staff are shown


def plan_run(checked: Checked, settings: Settings, store: Store, *, again: bool,
             retry_failed: bool, trigger: str = "send") -> Plan:
    """Find the run to resume, or start the right occurrence; None when nothing is to do."""
    from .report import describe_occurrence, local_time

    campaign = checked.campaign
    tz = settings.tz
    with store.engine.begin() as conn:
        existing = q.runs_of(conn, campaign.id)
        if retry_failed:
            if not existing:
                raise UserError(f"campaign '{campaign.id}' has no run yet: send it first")
            last = existing[-1]
            n = q.retry_failed(conn, last.id)
            q.set_run_status(conn, last.id, RunStatus.RUNNING)
            return Plan(q.get_run(conn, last.id), f"run {len(existing)} of {campaign.id}: "
                        f"{n} failed rows get another try", len(existing))
    number = {r.id: n for n, r in enumerate(existing, start=1)}
    unfinished = [r for r in existing if r.status == RunStatus.RUNNING]
    if unfinished and not again:
        run = unfinished[-1]
        return Plan(run, f"resuming run {number[run.id]} of {campaign.id} "
                         f"({describe_occurrence(run.occurrence, tz)})", number[run.id])
    occurrence = occurrence_for(checked, again=again, now=datetime.now(tz))
    done = next((r for r in existing if r.occurrence == occurrence), None)
    if done is not None:
        when = local_time(done.finished_at or done.created_at, tz)
        return Plan(None, f"'{campaign.id}' already went out on {when} to {done.total} "
                          f"recipients (run {number[done.id]}); use --again to send it anew")
    recipients = audience(checked, settings, store)
    run, created = start_run(store, campaign_id=campaign.id, occurrence=occurrence,
                             trigger=trigger, recipients=recipients)
    with store.engine.connect() as conn:
        n = run_number(conn, run)
    verb = "started" if created else "resuming"
    message = f"{verb} run {n} of {campaign.id}: {run.total} recipients"
    if created and occurrence == ONCE and (at := scheduled_at(checked, settings)) is not None \
            and at > datetime.now(UTC):
        message += (f"\nthis replaces the scheduled send at {local_time(at, tz)}: "
                    "mailer run will not send it again")
    return Plan(run, message, n)


def run_number(conn: Connection, run: q.Run) -> int:
    from .report import run_numbers

    return run_numbers(conn, run.campaign_id)[run.id]


def scheduled_at(checked: Checked, settings: Settings) -> datetime | None:
    """When a one-off campaign's `schedule: {at: …}` fires; None without one."""
    from .campaign import resolve_local

    schedule = checked.campaign.schedule
    if schedule is None or schedule.at is None:
        return None
    return resolve_local(schedule.at, settings)


class LineProgress:
    """Plain progress lines when stdout is not a terminal; a rich bar when it is."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._last = 0.0
        self._start = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                                 transient=False)
            self._task = self._bar.add_task(label, total=None, rate="", note="")
            self._bar.start()

    def update(self, *, done: int, total: int, note: str = "") -> None:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = f"{done / elapsed:,.0f}/s" if done else ""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, rate=rate, note=note)
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or done == total or note:
            self._last = now
            print(" ".join(x for x in (f"{self.label}: {done}/{total}", rate, note) if x),
                  file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def send_run(settings: Settings, store: Store, checked: Checked, run: q.Run, *,
             limit: int | None, workers: int = 1) -> RunResult:
    """Send the run here, or with `workers` processes (workers.py); Ctrl-C stops cleanly."""
    progress = LineProgress(checked.campaign.id)
    try:
        if workers > 1:
            from .workers import send_with_workers

            return send_with_workers(settings, store, checked, run, workers=workers,
                                     limit=limit, progress=progress)
        return asyncio.run(_send_here(settings, store, checked, run, limit=limit,
                                      progress=progress))
    finally:
        progress.close()


async def _send_here(settings: Settings, store: Store, checked: Checked, run: q.Run, *,
                     limit: int | None, progress: LineProgress) -> RunResult:
    stop = asyncio.Event()
    with stop_on_signals(asyncio.get_running_loop(), stop):
        return await deliver_run(settings, store, checked.rendition, run, stop=stop,
                                 progress=progress, limit=limit)


def dry_run(checked: Checked, settings: Settings, store: Store) -> tuple[int, int]:
    """Everything but the SMTP dialogue; writes nothing. Returns (messages, bytes)."""
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))
    count = size = 0
    for recipient in audience(checked, settings, store):
        size += len(composer.compose(recipient, message_id=message_id(
            domain=settings.msgid_domain)).data)
        count += 1
    return count, size


async def test_send(checked: Checked, settings: Settings, addresses: list[str], *,
                    lang: str | None = None) -> list[tuple[str, bool, str]]:
    """Send to these addresses only, subject prefixed [TEST]; not recorded as a run.
    `lang`: every test mail in that language. Returns (address, sent, reply) per address."""
    sample = sample_recipient(checked.campaign, settings)
    campaign = checked.campaign
    if lang is not None and lang not in campaign.languages:
        raise UserError(f"--lang {lang}: the campaign has no '{lang}' text (it has "
                        f"{', '.join(campaign.languages)})")
    wanted = []
    for raw in addresses:
        try:
            wanted.append(normalise_address(raw))
        except ValueError as exc:
            raise UserError(f"--to '{raw}' is not a valid address ({exc})") from None
    keys = {email_key(address) for address in wanted}
    known = {r.key: r for r in iter_audience(campaign.audience.lists, settings,
                                             languages=campaign.audience.languages)
             if r.key in keys}  # only these: the lists may hold a million
    targets = []
    for address in wanted:
        target = known.get(email_key(address)) or Recipient(
            email=address, name=sample.name, language=checked.campaign.default_language,
            fields=sample.fields, list=checked.campaign.audience.lists[0])
        targets.append(target if lang is None else replace(target, language=lang))
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()), test=True)
    out = []
    async with open_transport(settings) as transport:
        for i, r in enumerate(targets):
            data = composer.compose(r, message_id=message_id(domain=settings.msgid_domain)).data
            result = await transport.send(Outgoing(key=i, sender=settings.sender.address,
                                                   recipient=r.email, data=data, composed=True))
            reply = f"{result.code or ''} {result.text}".strip()
            out.append((r.email, result.outcome == Outcome.SENT, reply))
    return out
