"""The scheduler's sign of life: `mailer run` writes it to the database while it leads, and
`/metrics` of `mailer serve` (on any machine sharing the database) exposes it, so that an alert
can fire when the scheduler has stopped (`time() - mailer_scheduler_heartbeat_timestamp_seconds
> 120`). It is also logged: the first beat at INFO, then one line an hour."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import weakref
from collections.abc import Callable

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .store import Store
from .store.ops_tables import heartbeats

log = logging.getLogger("mailer.scheduler")
EVERY_S = 15.0  # at most one database write per this many seconds
LOG_EVERY_S = 3600.0
SCHEDULER = "scheduler"


class _State:
    def __init__(self) -> None:
        self.written = -math.inf  # monotonic time of the last write
        self.logged = -math.inf


_states: weakref.WeakKeyDictionary[Store, _State] = weakref.WeakKeyDictionary()


async def beat(store: Store, *, name: str = SCHEDULER,
               clock: Callable[[], float] = time.time) -> None:
    """Record that `name` is alive now (throttled to one write per EVERY_S). Never raises: a
    database hiccup must not stop the scheduler; it is logged instead."""
    state = _states.setdefault(store, _State())
    mono = time.monotonic()
    if mono - state.written < EVERY_S:
        return
    state.written = mono
    at = clock()
    try:
        await asyncio.to_thread(write, store.engine, name, at)
    except SQLAlchemyError as exc:
        log.warning("event=heartbeat-failed role=%s error=%s", name, type(exc).__name__)
        return
    level = logging.DEBUG
    if mono - state.logged >= LOG_EVERY_S:
        state.logged, level = mono, logging.INFO
    log.log(level, "event=heartbeat role=%s at=%.3f", name, at)


def write(engine: Engine, name: str, at: float) -> None:
    values = {"host": socket.gethostname()[:120], "pid": os.getpid(), "beat_at": at}
    with engine.begin() as conn:
        done = conn.execute(update(heartbeats).where(heartbeats.c.name == name).values(**values))
        if done.rowcount:
            return
    try:
        with engine.begin() as conn:
            conn.execute(insert(heartbeats).values(name=name, **values))
    except IntegrityError:  # another process inserted it first
        with engine.begin() as conn:
            conn.execute(update(heartbeats).where(heartbeats.c.name == name).values(**values))


def last_beat(engine: Engine, name: str = SCHEDULER) -> float | None:
    with engine.connect() as conn:
        value = conn.execute(select(heartbeats.c.beat_at)
                             .where(heartbeats.c.name == name)).scalar()
    return None if value is None else float(value)
