"""config.yaml and MAILER_* overrides: secrets only from the environment, one clear sentence."""

from __future__ import annotations

import os

import pytest

from mailer.config import DispatchSettings, SmtpSettings, load_settings
from mailer.errors import ConfigError
from tests.conftest import Project


def write(project: Project, old: str, new: str) -> None:
    text = project.config.read_text(encoding="utf-8")
    assert old in text
    project.config.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_shipped_config_with_environment_overrides(project: Project) -> None:
    settings = project.settings(MAILER_SMTP_HOST="relay.example.org", MAILER_SMTP_TLS="starttls",
                                MAILER_SMTP_POOL_SIZE="8", MAILER_SMTP_PASSWORD="s3cret",
                                MAILER_BASE_URL="https://imag.example.org/",
                                MAILER_DATABASE_URL="postgresql+psycopg://u@db.example.org/m")
    assert settings.smtp.host == "relay.example.org" and not settings.smtp.embedded
    assert settings.smtp.port == 25 and settings.smtp.tls == "starttls"
    assert settings.smtp.pool_size == 8 and settings.smtp.password == "s3cret"
    assert settings.base_url == "https://imag.example.org"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert str(settings.tz) == "Europe/Berlin" and settings.organisation.street == "Jägerstraße 5"
    default = project.settings()
    assert default.smtp.embedded and default.database_url.startswith("sqlite:////")


@pytest.mark.parametrize(("old", "new", "words"), [
    ("  tls: none", "  tls: none\n  password: hunter2", "MAILER_SMTP_PASSWORD"),
    ("timezone: Europe/Berlin", "timezone: Europe/Berlin\nsecret_key: x", "MAILER_SECRET_KEY"),
    ("timezone: Europe/Berlin", "timezone: Europe/Dortmund", "unknown time zone"),
    ("  pool_size: 4", "  pool_sise: 4", "did you mean 'pool_size'"),
    ("base_url: http://127.0.0.1:8000", "base_url: imag.example.org", "https://"),
    ("smtp:\n", "smtp: 5\nnot_smtp:\n", "'smtp' must be a block"),
    ("web:\n", "web: [a]\nnot_web:\n", "'web' must be a block"),
])
def test_bad_config_is_one_sentence_with_the_line(project: Project, old: str, new: str,
                                                  words: str) -> None:
    write(project, old, new)
    with pytest.raises(ConfigError) as info:
        project.settings()
    sentence = info.value.sentence()
    assert "config.yaml, line" in sentence and words in sentence, sentence


def test_bad_environment_value_is_named(project: Project) -> None:
    with pytest.raises(ConfigError, match="smtp.port"):
        load_settings(project.config, env={"MAILER_SMTP_PORT": "twenty-five"})


@pytest.mark.parametrize(("host", "here"), [
    ("localhost", True), ("LOCALHOST.", True), ("relay.localhost", True), ("127.0.0.1", True),
    ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("embedded", False),  # the capture server runs inside each sending process
    ("relay.example.org", False), ("notlocalhost", False), ("localhost.example.org", False),
    ("0.0.0.0", True), ("::", True), ("192.0.2.25", False), ("2001:db8::25", False),
])
def test_a_relay_on_this_machine_is_one_at_a_loopback_address(host: str, here: bool) -> None:
    assert SmtpSettings(host=host).on_this_machine is here


@pytest.mark.parametrize(("workers", "pool", "relay_here", "cores", "expected"), [
    ("auto", 16, False, 2, 2), ("auto", 16, True, 2, 1),  # the relay keeps a core
    ("auto", 16, True, 8, 7), ("auto", 16, False, 8, 8),
    ("auto", 16, True, 1, 1), ("auto", 3, False, 8, 3),  # never none, never more than connections
    (3, 16, True, 2, 3), (3, 2, False, 8, 2),  # a number is taken as given, up to the pool
])
def test_auto_workers_are_the_cores_left_to_us(monkeypatch: pytest.MonkeyPatch,
                                               workers: int | str, pool: int, relay_here: bool,
                                               cores: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    chosen = DispatchSettings(workers=workers)
    assert chosen.count(pool, relay_here=relay_here) == expected
