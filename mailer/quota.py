"""The relay's rate limits as token buckets in the database, shared by every sending process.

`smtp.rate_per_second` and `smtp.rate_per_hour` are totals: a provider's quota belongs to the
account, so `mailer send --workers 4`, three `mailer run` on two machines and the web app's
confirmation mails all draw from the same buckets (table `send_quota`). Each process takes
tokens in small grants (about 50 ms of the rate) so that a fast run costs a few database
writes per second, not one per message; a grant taken beyond the bucket's balance is debt that
its process sleeps off before sending, so the total never runs ahead of the rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import Engine, case, update

from .config import SmtpSettings
from .store import queries as q
from .store.ops_tables import send_quota

GRANT_S = 0.05  # a grant is this much of the rate, at least one token

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


class SharedBucket:
    """One token bucket row; `acquire` reserves a token, sleeping off any debt first."""

    def __init__(self, engine: Engine, name: str, *, rate_per_s: float, burst: float,
                 grant: int, clock: Clock = time.time, sleep: Sleep = asyncio.sleep) -> None:
        self._engine = engine
        self._name = name
        self._rate = rate_per_s
        self._burst = burst
        self._grant = max(1, min(int(burst), grant))
        self._clock = clock
        self._sleep = sleep
        self._left = 0  # tokens of the last grant not yet spent
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self._left > 0:
            self._left -= 1
            return
        async with self._lock:  # one grant at a time; the others queue behind it
            if self._left > 0:
                self._left -= 1
                return
            balance = await asyncio.to_thread(self._take, self._grant)
            if balance < 0:
                await self._sleep(-balance / self._rate)
            self._left = self._grant - 1

    def _take(self, count: int) -> float:
        """Refill by the time passed, take `count`: one statement, so it holds the row's lock
        from read to write on SQLite as on PostgreSQL. Returns the balance after taking."""
        now = self._clock()
        t = send_quota.c
        # A stamp in the future (another machine's clock runs ahead) refills nothing.
        elapsed = case((t.stamp < now, now - t.stamp), else_=0.0)
        refilled = t.tokens + elapsed * self._rate
        with self._engine.begin() as conn:
            conn.execute(q._insert(conn, send_quota).values(
                name=self._name, tokens=self._burst, stamp=now).on_conflict_do_nothing())
            balance = conn.execute(
                update(send_quota).where(t.name == self._name)
                .values(tokens=case((refilled > self._burst, self._burst), else_=refilled) - count,
                        stamp=case((t.stamp < now, now), else_=t.stamp))
                .returning(t.tokens)).scalar_one()
        return float(balance)


class SharedRateLimiter:
    """`rate_per_second` (burst max(1, rate)) and optionally `rate_per_hour` (burst: the hour's
    quota), as RateLimiter in transport.py, but counted across processes."""

    def __init__(self, engine: Engine, settings: SmtpSettings, *, clock: Clock = time.time,
                 sleep: Sleep = asyncio.sleep) -> None:
        rate, hourly = settings.rate_per_second, settings.rate_per_hour
        grant = int(rate * GRANT_S)  # the same for both: one write per grant, not per message
        self._buckets = [SharedBucket(engine, "second", rate_per_s=rate, burst=max(1.0, rate),
                                      grant=grant, clock=clock, sleep=sleep)]
        if hourly:
            self._buckets.append(SharedBucket(engine, "hour", rate_per_s=hourly / 3600,
                                              burst=hourly, grant=grant, clock=clock,
                                              sleep=sleep))

    async def acquire(self) -> None:
        for bucket in self._buckets:
            await bucket.acquire()
