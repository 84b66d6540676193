"""Rate limits shared through the database (mailer/quota.py): totals across processes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from mailer.config import SmtpSettings
from mailer.quota import SharedBucket, SharedRateLimiter
from mailer.store import Store, open_store
from mailer.store.ops_tables import send_quota
from tests.conftest import Project, both_databases
from tests.helpers import FakeTime


def limiter(store: Store, fake: FakeTime, **smtp: Any) -> SharedRateLimiter:
    settings = SmtpSettings.model_validate({"rate_per_second": 10, **smtp})
    return SharedRateLimiter(store.engine, settings, clock=fake.clock, sleep=fake.sleep)


def balance(store: Store, name: str = "second") -> float:
    with store.engine.connect() as conn:
        return float(conn.execute(select(send_quota.c.tokens)
                                  .where(send_quota.c.name == name)).scalar_one())


@both_databases
async def test_two_processes_share_one_budget(project: Project) -> None:
    url = project.settings().database_url
    one, two = open_store(url), open_store(url)  # two engines: as two processes have
    fake = FakeTime(now=1_000_000.0)
    a, b = limiter(one, fake), limiter(two, fake)
    for _ in range(15):
        await a.acquire()
        await b.acquire()
    # 30 sends at 10 per second with a burst of 10: 2 s, not the 1 s of two own buckets.
    assert abs(sum(fake.sleeps) - 2.0) < 1e-6
    assert fake.sleeps[0] == 0.1 and len(fake.sleeps) == 20


@both_databases
async def test_tokens_are_taken_in_grants(project: Project) -> None:
    store = open_store(project.settings().database_url)
    fake = FakeTime(now=1_000_000.0)
    fast = limiter(store, fake, rate_per_second=1000)
    await fast.acquire()
    assert balance(store) == 1000 - 50  # one write took 50 ms of the rate
    for _ in range(49):
        await fast.acquire()
    assert balance(store) == 950  # spent from the grant, no write
    await fast.acquire()
    assert balance(store) == 900 and fake.sleeps == []


@both_databases
async def test_the_hourly_quota_is_shared_too(project: Project) -> None:
    url = project.settings().database_url
    fake = FakeTime(now=1_000_000.0)
    a = limiter(open_store(url), fake, rate_per_hour=2)
    b = limiter(open_store(url), fake, rate_per_hour=2)
    await a.acquire()
    await a.acquire()
    assert fake.sleeps == []  # within both bursts
    await b.acquire()
    assert fake.sleeps[-1] == 1800.0  # the hour's two are used up: the third waits its turn


async def test_time_refills_up_to_the_burst_and_never_backwards(project: Project) -> None:
    store = open_store(project.settings().database_url)
    fake = FakeTime(now=1_000_000.0)
    bucket = SharedBucket(store.engine, "second", rate_per_s=10, burst=10, grant=1,
                          clock=fake.clock, sleep=fake.sleep)
    for _ in range(10):
        await bucket.acquire()
    assert balance(store) == 0
    fake.now += 0.5
    await bucket.acquire()
    assert balance(store) == 4  # five came back in half a second, one taken
    fake.now += 3600
    await bucket.acquire()
    assert balance(store) == 9  # no more than the burst came back
    ahead = fake.now + 60
    with store.engine.begin() as conn:  # another machine, its clock a minute ahead
        conn.execute(update(send_quota).values(stamp=ahead, tokens=0))
    await bucket.acquire()
    assert balance(store) == -1 and fake.sleeps[-1] == 0.1  # no refill from a future stamp
    with store.engine.connect() as conn:
        assert conn.execute(select(send_quota.c.stamp)).scalar_one() == ahead
