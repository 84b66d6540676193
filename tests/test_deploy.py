"""deploy/: the systemd units pass `systemd-analyze verify`, and backup.sh / restore.sh bring a
database back to what it was at the backup — SQLite copied online while `mailer send` writes,
PostgreSQL through pg_dump and pg_restore."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.store import open_store
from mailer.store.tables import deliveries, runs
from tests.conftest import REPO, Project, both_databases

DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service")) + sorted(
    (DEPLOY / "systemd").glob("*.timer"))


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    assert {u.name for u in UNITS} >= {"imag-mailer-run.service", "imag-mailer-serve.service",
                                        "imag-mailer-backup.service",
                                        "imag-mailer-backup.timer"}
    # The units name the checkout /srv/imag-mailer; here it is this repository, whose .venv has
    # the `mailer` that ExecStart= must find executable.
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8").replace("/srv/imag-mailer", str(REPO))
        (tmp_path / unit.name).write_text(text, encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *[str(tmp_path / u.name) for u in UNITS]],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # verify reports unknown or misspelt settings on stderr and still exits 0: both must be clean
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    run = (DEPLOY / "systemd" / "imag-mailer-run.service").read_text(encoding="utf-8")
    for setting in ("User=imag-mailer", "ProtectSystem=strict", "StateDirectory=imag-mailer",
                    "EnvironmentFile=/etc/imag-mailer/env", "Restart=on-failure"):
        assert setting in run


def _env(project: Project) -> dict[str, str]:
    return {**os.environ, **project.env, "MAILER_CONFIG": str(project.config),
            "MAILER_PYTHON": sys.executable}


def script(project: Project, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(DEPLOY / "backup" / name), *args], capture_output=True,
                          text=True, env=_env(project), cwd=project.root, timeout=300)


def counts(project: Project) -> tuple[int, int, int]:
    """(runs, ledger rows, rows sent) in the project's database."""
    store = open_store(project.settings().database_url)
    try:
        with store.engine.connect() as conn:
            n_runs = conn.execute(select(func.count()).select_from(runs)).scalar_one()
            n_rows = conn.execute(select(func.count()).select_from(deliveries)).scalar_one()
            sent = conn.execute(select(func.count()).select_from(deliveries)
                                .where(deliveries.c.status == "sent")).scalar_one()
    finally:
        store.dispose()
    return int(n_runs), int(n_rows), int(sent)


@both_databases
async def test_backup_while_sending_then_restore(project: Project, db_url: str,
                                                 tmp_path: Path) -> None:
    if db_url and shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not installed (Debian package: postgresql-client)")
    project.crowd(600)
    outbox = project.root / "var" / "outbox" / "new"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer", "send", "crowd", env=_env(project), cwd=project.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    for _ in range(600):  # back up in the middle of the run, while the ledger is written
        await asyncio.sleep(0.05)
        if outbox.is_dir() and len(os.listdir(outbox)) >= 30:
            break
    backups = tmp_path / "backups"
    done = await asyncio.to_thread(script, project, "backup.sh", str(backups))
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()
    assert done.returncode == 0, done.stderr
    [backup] = [p for p in backups.iterdir() if p.name.startswith("mailer-")]
    assert backup.stat().st_mode & 0o777 == 0o600
    assert done.stdout.strip() == f"backup: {backup}"
    if not db_url:
        with sqlite3.connect(backup) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            at_backup = (conn.execute("SELECT count(*) FROM runs").fetchone()[0],
                         conn.execute("SELECT count(*) FROM deliveries").fetchone()[0],
                         conn.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'")
                         .fetchone()[0])
        assert at_backup[:2] == (1, 600)  # the run's snapshot is whole, never half
    assert counts(project) == (1, 600, 600)

    code = subprocess.run([sys.executable, "-m", "mailer", "send", "crowd", "--again"],
                          env=_env(project), cwd=project.root, capture_output=True,
                          timeout=180).returncode
    assert code == 0 and counts(project) == (2, 1200, 1200)

    done = script(project, "restore.sh", str(backup))
    assert done.returncode == 0, done.stderr
    assert "mailer db upgrade" in done.stdout
    restored = counts(project)
    assert restored[:2] == (1, 600)
    if not db_url:
        assert restored == at_backup
        db = project.root / "var" / "mailer.db"
        assert db.stat().st_mode & 0o777 == 0o600
        assert list(db.parent.glob("mailer.db.before-restore-*"))  # the old one kept aside


def test_restore_refuses_a_broken_backup(project: Project, tmp_path: Path) -> None:
    code = subprocess.run([sys.executable, "-m", "mailer", "db", "upgrade"], env=_env(project),
                          cwd=project.root, capture_output=True, timeout=60).returncode
    assert code == 0
    db = project.root / "var" / "mailer.db"
    before = db.read_bytes()
    broken = tmp_path / "mailer-broken.sqlite3"
    broken.write_bytes(b"not a database at all" * 100)
    done = script(project, "restore.sh", str(broken))
    assert done.returncode == 1 and "fails its integrity check" in done.stderr
    assert "Traceback" not in done.stderr and db.read_bytes() == before


def test_backup_keeps_the_newest(project: Project, tmp_path: Path) -> None:
    import time

    code = subprocess.run([sys.executable, "-m", "mailer", "db", "upgrade"], env=_env(project),
                          cwd=project.root, capture_output=True, timeout=60).returncode
    assert code == 0
    backups = tmp_path / "b"
    made = []
    for _ in range(3):
        env = {**_env(project), "BACKUP_KEEP": "2"}
        done = subprocess.run(["bash", str(DEPLOY / "backup" / "backup.sh"), str(backups)],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        made.append(done.stdout.split()[-1])
        time.sleep(1.1)  # one backup a second: the names carry the time
    assert sorted(str(p) for p in backups.iterdir()) == sorted(made[1:])


def test_the_production_config_example_passes_the_offline_checks() -> None:
    from mailer.config import load_settings
    from mailer.doctor import check_base_url, check_domains, check_impressum, check_timezone

    settings = load_settings(DEPLOY / "config.production.yaml",
                             env={"MAILER_SECRET_KEY": "x" * 8 + "abcdefghijklmnopqrstuvwxyz"})
    for findings in (check_base_url(settings), check_domains(settings),
                     check_impressum(settings), check_timezone(settings)):
        assert findings[0].level == "ok" and "fail" not in {f.level for f in findings}, findings
    assert settings.smtp.dkim is not None and settings.web.trusted_proxies == ["127.0.0.1/32"]
    assert str(settings.var_dir) == "/var/lib/imag-mailer"
