"""Shared fixtures: a throwaway project folder, and the databases to run store tests against."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailer.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
PG_ENV = "MAILER_TEST_POSTGRES_URL"
CROWD_CAMPAIGN = """\
template: newsletter
audience: {lists: [crowd]}
content:
  de:
    subject: "Hallo {{ recipient.name }}"
    blocks:
      - heading: "Liebe {{ recipient.name }}"
      - text: "Das **FORUM INTEGRATION** lädt ein."
"""


@dataclass
class Project:
    """A copy of the shipped config, templates and lists in a temporary folder."""

    root: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def settings(self, **env: str) -> Settings:
        return load_settings(self.config, env={**self.env, **env})

    def campaign(self, name: str, text: str) -> Path:
        path = self.root / "campaigns" / name
        path.write_text(text, encoding="utf-8")
        return path

    def crowd(self, n: int, *, special: dict[int, str] | None = None) -> list[str]:
        """A list `crowd` of n addresses (some replaced by `special`) and campaign `crowd`."""
        addresses = [f"person{i}@example.org" for i in range(n)]
        for i, address in (special or {}).items():
            addresses[i] = address
        rows = ["email,name,language"] + [f"{a},Person {i},de" for i, a in enumerate(addresses)]
        self.list_file("crowd.csv", "\n".join(rows) + "\n")
        self.campaign("crowd.yaml", CROWD_CAMPAIGN)
        return addresses

    def list_file(self, name: str, text: str | bytes) -> Path:
        path = self.root / "lists" / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> Project:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    shutil.copytree(REPO / "templates", root / "templates")
    shutil.copytree(REPO / "lists", root / "lists")
    (root / "campaigns").mkdir()
    # Tests send through a relay on 127.0.0.1 with links to http://127.0.0.1 (tests/smtpd.py):
    # mailer refuses that outside tests (mailer/links.py); test_links.py unsets it.
    env = {"MAILER_SECRET_KEY": "test-secret-" + secrets.token_hex(16),
           "MAILER_ALLOW_LOCAL_LINKS": "1"}
    if db_url:
        env["MAILER_DATABASE_URL"] = db_url
    return Project(root=root, env=env)


def _fresh_postgres(base: str) -> Iterator[str]:
    import psycopg

    name = f"mailer_test_{secrets.token_hex(6)}"
    admin = base.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {exc}")
    head, _, _ = base.rpartition("/")
    try:
        yield f"{head}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLite by default; tests that must run on both parametrize with `both_databases`."""
    if request.param == "sqlite":
        yield ""  # the project's config: a SQLite file under its var/
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1/postgres)")
    yield from _fresh_postgres(base)


both_databases = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
