"""`mailer send --workers N`: several processes share one run, its rate limits and its crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from mailer.store import open_store
from mailer.store import queries as q
from mailer.store.tables import deliveries
from tests.conftest import Project, both_databases
from tests.helpers import finish, mailer, smtp_env, start_mailer
from tests.smtpd import Faults, fault_server  # noqa: F401  (fixture)


def children(pid: int) -> list[int]:
    """The worker processes of a `mailer send` (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def workers_of(project: Project) -> Counter[str]:
    """Rows sent per worker id, from the ledger."""
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        return Counter(r.sent_by for r in conn.execute(deliveries.select())
                       if r.status == "sent")


@both_databases
async def test_two_workers_share_one_run(project: Project, fault_server) -> None:  # noqa: F811
    addresses = project.crowd(400)
    server = await fault_server()
    code, out, err = await mailer(project, "send", "crowd", "--workers", "2", **smtp_env(server))
    assert code == 0, err
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses) and max(received.values()) == 1
    by_worker = workers_of(project)
    assert len(by_worker) == 2 and sum(by_worker.values()) == 400, by_worker
    assert all(":" in w and n > 40 for w, n in by_worker.items())  # both did a real share
    assert "run 1 of crowd: 400 sent, 0 failed, 0 left" in out
    code, report, err = await mailer(project, "report", "crowd", "--json")
    assert code == 0, err
    assert json.loads(report)["runs"][0]["sent_by"] == dict(by_worker.most_common())
    code, text, _ = await mailer(project, "report", "crowd")
    [line] = [x for x in text.splitlines() if "sent by" in x]
    assert line.startswith("  sent by 2 workers: ") and all(w in line for w in by_worker)


async def test_the_pool_is_divided_among_the_workers(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(120)
    server = await fault_server(Faults(stall_s=0.02))  # slow replies: every connection is used
    code, _, err = await mailer(project, "send", "crowd", "--workers", "2",
                                **smtp_env(server, MAILER_SMTP_POOL_SIZE="3"))
    assert code == 0, err
    assert server.peak_connections <= 3  # one command: smtp.pool_size connections in all
    assert len(workers_of(project)) == 2


async def test_the_rate_limit_is_a_total_across_workers(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(60)
    server = await fault_server()
    code, _, err = await mailer(project, "send", "crowd", "--workers", "2",
                                **smtp_env(server, MAILER_SMTP_RATE_PER_SECOND="20"))
    assert code == 0, err
    times = sorted(t for ts in server.rcpt_times.values() for t in ts)
    # A burst of 20, then 20 per second: the other 40 take 2 s - not 1 s, as two
    # processes with a limiter each would.
    assert times[-1] - times[0] >= 1.8, times[-1] - times[0]
    assert len(workers_of(project)) == 2


# The test relay listens on 127.0.0.1: `auto` leaves it a core.
@pytest.mark.parametrize(("given", "workers"),
                         [("3", 3), ("auto", max(1, min(len(os.sched_getaffinity(0)) - 1, 4)))])
async def test_workers_from_the_environment(project: Project, fault_server, given: str,  # noqa: F811
                                            workers: int) -> None:
    project.crowd(200)
    server = await fault_server(Faults(stall_s=0.005))
    code, _, err = await mailer(project, "send", "crowd",
                                **smtp_env(server, MAILER_DISPATCH_WORKERS=given))
    assert code == 0, err
    assert len(workers_of(project)) == workers


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine of 2 cores or more")
async def test_auto_counts_only_the_cores_this_process_may_use(project: Project) -> None:
    # As a container's cpuset or `taskset -c 0` leaves it: one core of the machine's several.
    # The embedded capture server (it runs inside each worker): no core is left to a relay.
    project.crowd(50)
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the mailer subprocess inherits it
    try:
        code, _, err = await mailer(project, "send", "crowd", MAILER_DISPATCH_WORKERS="auto")
    finally:
        os.sched_setaffinity(0, allowed)
    assert code == 0, err
    assert len(workers_of(project)) == 1


async def test_a_bad_workers_value_is_one_sentence(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(2)
    server = await fault_server()
    code, out, err = await mailer(project, "send", "crowd", "--workers", "many",
                                  **smtp_env(server))
    assert code == 1 and server.messages == []
    assert err.strip().splitlines()[-1] == (
        "error: --workers many: give a number from 1 to 64, or auto (one per core)")


async def test_a_worker_killed_mid_run_loses_nothing(project: Project, fault_server) -> None:  # noqa: F811
    n = 1500
    addresses = project.crowd(n)
    server = await fault_server()
    proc = await start_mailer(project, "send", "crowd", "--workers", "2", **smtp_env(server))
    for _ in range(600):
        await asyncio.sleep(0.05)
        if len(server.messages) >= n // 4:
            break
    workers = children(proc.pid)
    assert len(workers) == 2 and proc.returncode is None
    os.kill(workers[0], signal.SIGKILL)
    code, out, err = await finish(proc)
    assert code == 0, err
    assert "ended with signal SIGKILL; the other workers take over its rows" in err
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert set(received) == set(addresses)  # nobody lost
    duplicates = sum(c - 1 for c in received.values())
    assert duplicates <= project.settings().smtp.pool_size  # the crash bound: all connections
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        [run] = q.runs_of(conn, "crowd")
        assert run.status == "finished" and q.status_counts(conn, run.id)["sent"] == n
        assert run.in_flight_recovered == duplicates or run.in_flight_recovered >= duplicates


async def test_killing_the_command_stops_its_workers(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(3000)
    server = await fault_server()
    proc = await start_mailer(project, "send", "crowd", "--workers", "2", **smtp_env(server))
    for _ in range(600):
        await asyncio.sleep(0.05)
        if len(server.messages) >= 100:
            break
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    for _ in range(100):  # they stop gracefully: in-flight results recorded, nothing claimed
        if not any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the workers went on after their command was killed")
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        [run] = q.runs_of(conn, "crowd")
        counts = q.status_counts(conn, run.id)
    assert counts["sending"] == 0 and counts["sent"] == len(server.messages) < 3000


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


# --- mailer run: a standby process sends beside the leader ----------------------------------


@both_databases
async def test_a_standby_scheduler_sends_the_leaders_run_beside_it(project: Project) -> None:
    from datetime import UTC, datetime, timedelta

    from mailer.scheduler import serve
    from tests.test_scheduler import at_text, fast, outbox, until

    project.crowd(600)
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    project.campaign("soon.yaml", at_text(when).replace("[partners]", "[crowd]"))
    settings = fast(project.settings())
    settings = settings.model_copy(update={"smtp": settings.smtp.model_copy(
        update={"rate_per_second": 400.0})})  # 1.5 s of sending: time for both to join
    stops = [asyncio.Event(), asyncio.Event()]
    runs = [asyncio.create_task(serve(settings, str(project.config), stop=stop))
            for stop in stops]
    try:
        store = open_store(settings.database_url)

        def finished() -> bool:
            with store.engine.connect() as conn:
                found = q.runs_of(conn, "soon")
                return bool(found) and found[0].status == "finished"

        await until(finished, 30)
    finally:
        for stop in stops:
            stop.set()
        assert await asyncio.wait_for(asyncio.gather(*runs), 20) == [0, 0]
    assert len(outbox(settings)) == 600  # each once
    by_worker = workers_of(project)
    assert len(by_worker) == 2 and min(by_worker.values()) > 30, by_worker


def _exit_after(seconds: float) -> None:
    import time

    time.sleep(seconds)


async def test_the_command_ends_when_its_last_worker_does_not_at_the_next_poll(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    from datetime import UTC

    from mailer import workers
    from mailer.audience import Recipient
    from mailer.dispatch import NoProgress, start_run

    monkeypatch.setattr(workers, "POLL_S", 60.0)  # a poll would come far too late
    store = open_store(project.settings().database_url)
    run, _ = start_run(store, campaign_id="c", occurrence="1", trigger="send",
                       recipients=[Recipient(email="a@example.org", list="crowd")])
    store.engine.dispose()
    context = multiprocessing.get_context("fork")
    kids = [context.Process(target=_exit_after, args=(s,)) for s in (0.2, 0.5)]
    for kid in kids:
        kid.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(workers._watch(store, run, kids, NoProgress(), tz=UTC), 20)
    assert loop.time() - started < 10  # the poll would have taken 60 s
    assert not any(kid.is_alive() for kid in kids)
    for kid in kids:
        kid.join()

