"""Running the real `mailer` command from tests: one environment, one way to start it.

    result = run_mailer(project, "validate")                      # blocking, text output
    code, out, err = await mailer(project, "send", "crowd", **smtp_env(server))
    proc = await start_mailer(project, "send", "crowd", **smtp_env(server))  # kill it yourself

and a real fault in the real ledger for it (or an in-process dispatcher) to run into.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from mailer.store import Store
from tests.conftest import Project

MAILER = [sys.executable, "-m", "mailer"]


def mailer_env(project: Project, **env: str) -> dict[str, str]:
    """The test process's environment, the project's secrets and config, then `env`."""
    return {**os.environ, **project.env, "MAILER_CONFIG": str(project.config), **env}


def smtp_env(server: Any, **extra: str) -> dict[str, str]:
    """MAILER_SMTP_* for a test relay (a FaultServer): quick retries, no rate limit to speak of."""
    return {"MAILER_SMTP_HOST": server.host, "MAILER_SMTP_PORT": str(server.port),
            "MAILER_SMTP_RETRY_BASE_S": "0.05", "MAILER_SMTP_TIMEOUT_S": "2",
            "MAILER_SMTP_RATE_PER_SECOND": "5000", **extra}


def run_mailer(project: Project, *args: str, timeout: float = 60,
               preexec_fn: Callable[[], None] | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
    """`mailer ARGS` in the project folder, waited for; stdout and stderr as text."""
    return subprocess.run([*MAILER, *args], capture_output=True, text=True,
                          env=mailer_env(project, **env), cwd=project.root, timeout=timeout,
                          preexec_fn=preexec_fn)


async def start_mailer(project: Project, *args: str, **env: str) -> asyncio.subprocess.Process:
    """`mailer ARGS` started, not waited for (to signal or kill it mid-run)."""
    return await asyncio.create_subprocess_exec(
        *MAILER, *args, env=mailer_env(project, **env), cwd=project.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a started `mailer`: (exit code, stdout, stderr)."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    code = await proc.wait()
    return code, out.decode(), err.decode()


async def mailer(project: Project, *args: str, timeout: float = 120,
                 **env: str) -> tuple[int, str, str]:
    """`mailer ARGS` without blocking the event loop (an in-process SMTP server keeps
    answering it): (exit code, stdout, stderr)."""
    return await finish(await start_mailer(project, *args, **env), timeout)


def refuse_sent_rows(store: Store, *, on: bool) -> None:
    """A trigger that makes every ledger write recording a row as `sent` fail, as a full disk
    or a lost database connection would."""
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_sent BEFORE UPDATE OF status ON deliveries "
                "WHEN NEW.status = 'sent' BEGIN SELECT RAISE(ABORT, 'ledger write refused'); END"
                if on else "DROP TRIGGER refuse_sent")
        elif on:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_sent() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.status = 'sent' THEN RAISE EXCEPTION 'ledger write refused'; END IF; "
                "RETURN NEW; END $$")
            conn.exec_driver_sql("CREATE TRIGGER refuse_sent BEFORE UPDATE ON deliveries "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse_sent()")
        else:
            conn.exec_driver_sql("DROP TRIGGER refuse_sent ON deliveries")
            conn.exec_driver_sql("DROP FUNCTION refuse_sent()")


class FakeTime:
    """An injected clock: sleeping advances it instantly and records the wait."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds
        await asyncio.sleep(0)
