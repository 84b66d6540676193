"""Diagnostic: where one `mailer send` spends its time, per message, in-process.

    .venv/bin/python bench/profile_send.py --port PORT [--pool 1] [--n 3000]

Needs an SMTP sink on 127.0.0.1:PORT (e.g. `smtp-sink -u nobody 127.0.0.1:PORT 1000`).
Runs the same code path as `mailer send` (plan_run + send_run) with timing wrappers around
Composer.compose, SmtpPool.send (the SMTP transaction) and GroupCommit.submit (waiting for the
ledger write), and reports wall and CPU time per message.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_SECRET, loadavg, make_project  # noqa: E402

from mailer import compose, dispatch, transport  # noqa: E402
from mailer.checks import check_campaign  # noqa: E402
from mailer.config import load_settings  # noqa: E402
from mailer.sending import plan_run, send_run  # noqa: E402
from mailer.store import open_store  # noqa: E402

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed_sync(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[name] += time.perf_counter() - t0
            calls[name] += 1
    return wrapper


def timed_async(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            spent[name] += time.perf_counter() - t0
            calls[name] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pool", type=int, default=1)
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    folder = make_project(args.n)
    try:
        env = {"MAILER_SMTP_HOST": "127.0.0.1", "MAILER_SMTP_PORT": str(args.port),
               "MAILER_SMTP_POOL_SIZE": str(args.pool), "MAILER_SMTP_RATE_PER_SECOND": "1000000",
               "MAILER_SECRET_KEY": BENCH_SECRET, "MAILER_DATABASE_URL": f"sqlite:///{folder}/l.db"}
        settings = load_settings(folder / "config.yaml", env)
        checked = check_campaign(folder / "campaigns" / "bench-40k.yaml", settings)
        store = open_store(settings.database_url)
        plan = plan_run(checked, settings, store, again=False, retry_failed=False)
        assert plan.run is not None
        compose.Composer.compose = timed_sync("compose", compose.Composer.compose)
        transport.SmtpPool.send = timed_async("smtp transaction (incl. queueing for a session)",
                                              transport.SmtpPool.send)
        dispatch.GroupCommit.submit = timed_async("waiting for the ledger commit",
                                                  dispatch.GroupCommit.submit)
        dispatch.Dispatcher._record = timed_sync(  # type: ignore[method-assign]
            "ledger write (thread)", dispatch.Dispatcher._record)
        dispatch.Dispatcher._tx = timed_async("other ledger transactions (claim, counts)",
                                              dispatch.Dispatcher._tx)
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = send_run(settings, store, checked, plan.run, limit=None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        shutil.rmtree(folder)
    n = result.counts["sent"]
    print(f"pool {args.pool}: {n} sent in {wall:.2f} s = {n / wall:,.0f} msg/s; process CPU "
          f"{cpu:.2f} s ({cpu / wall:.0%} of wall, {cpu / n * 1e3:.2f} ms per message); "
          f"{loadavg()}")
    for name, s in spent.items():
        print(f"  {name:50} {calls[name]:7} calls  {s / n * 1e3:7.3f} ms per message "
              f"(summed over concurrent workers)")


if __name__ == "__main__":
    main()
