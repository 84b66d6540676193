"""config.yaml and MAILER_* overrides: secrets only from the environment, one clear sentence."""

from __future__ import annotations

import pytest

from mailer.config import load_settings
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
