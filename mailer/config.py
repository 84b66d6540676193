"""Settings: config.yaml, then MAILER_* environment overrides; secrets only from the environment."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .files import private_dir
from .yamlsrc import Located, load_yaml, raise_validation


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DkimSettings(Strict):
    selector: str
    domain: str
    key_file: Path


class SmtpSettings(Strict):
    host: str = "embedded"
    port: int = Field(0, ge=0, le=65535)
    username: str | None = None
    password: str | None = None  # only ever set from MAILER_SMTP_PASSWORD
    tls: Literal["none", "starttls", "tls"] = "none"
    pool_size: int = Field(4, ge=1, le=64)
    rate_per_second: float = Field(100.0, gt=0)
    rate_per_hour: int | None = Field(None, gt=0)
    retry_base_s: float = Field(30.0, ge=0)
    max_attempts: int = Field(5, ge=1, le=50)
    timeout_s: float = Field(30.0, gt=0)
    helo: str | None = None
    dkim: DkimSettings | None = None

    @property
    def embedded(self) -> bool:
        return self.host == "embedded"

    @property
    def on_this_machine(self) -> bool:
        """Is the relay at a loopback address (localhost, 127.0.0.0/8, ::1; 0.0.0.0 reaches this
        machine too)? The embedded capture server is not: it runs inside each sending process."""
        host = self.host.rstrip(".").lower()
        if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 §6.3
            return True
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified


class SenderSettings(Strict):
    name: str
    address: str
    reply_to: str | None = None

    @field_validator("name", "address", "reply_to")
    @classmethod
    def _no_crlf(cls, value: str | None) -> str | None:
        if value is not None and ("\r" in value or "\n" in value):
            raise ValueError("must not contain line breaks")
        return value


class OrganisationSettings(Strict):
    name: str
    department: str
    body: str
    street: str
    postcode: str
    city: str
    email: str
    phone: str | None = None
    website: str | None = None
    responsible: str | None = None


class SchedulerSettings(Strict):
    misfire_grace_s: int = Field(3600, ge=0)
    poll_s: float = Field(2.0, gt=0)


class DispatchSettings(Strict):
    """How many processes `mailer send` sends with; `auto` is one per core, less the one a
    relay on this machine needs."""

    workers: int | Literal["auto"] = "auto"

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be 'auto' or a number from 1 to 64")
        return value

    def count(self, pool_size: int, *, relay_here: bool = False) -> int:
        """The worker processes: `auto` is one per core, one less when the relay runs on
        this machine (`relay_here`): it takes a core's work too, and on two cores one worker
        beside it sent faster than two (bench/README.md). Never more than connections."""
        if self.workers == "auto":
            wanted = usable_cores() - (1 if relay_here else 0)
        else:
            wanted = int(self.workers)
        return max(1, min(wanted, pool_size))


def usable_cores() -> int:
    """The cores this process may run on: a container's cpuset or `taskset` can leave it fewer
    than the machine has (os.cpu_count), and a worker without a core of its own only
    competes with the others."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class ListSettings(Strict):
    """How people see a list: its title per language (the first one is the fallback)."""

    title: dict[str, str] = {}

    @field_validator("title")
    @classmethod
    def _one_line(cls, value: dict[str, str]) -> dict[str, str]:
        for lang, text in value.items():
            if not text.strip() or any(ord(c) < 32 for c in text):
                raise ValueError(f"the '{lang}' title must be one line of text")
        return value


class WebSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    subscribe_lists: list[str] = ["newsletter"]
    languages: list[str] = ["de", "en", "tr", "ar"]
    # X-Forwarded-For is believed only from these peers (IPs or CIDRs, e.g. the reverse proxy
    # on 127.0.0.1); empty: the TCP peer is the client. MAILER_WEB_TRUSTED_PROXIES="a,b".
    trusted_proxies: list[str] = []
    # Slow or idle clients (uvicorn): answer 503 beyond `limit_concurrency` connections or
    # requests; close new connections at once beyond `max_connections` (kept below the process's
    # file limit); a request (head and body) must arrive within `request_timeout_s`; an idle
    # keep-alive connection is closed after `timeout_keep_alive_s`.
    limit_concurrency: int = Field(100, ge=1)
    max_connections: int = Field(256, ge=1)
    request_timeout_s: float = Field(10.0, gt=0, le=300)
    timeout_keep_alive_s: int = Field(5, ge=1, le=300)
    backlog: int = Field(128, ge=1, le=4096)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: comma-separated
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"'{item}' is not an IP address or network "
                                 "(e.g. 127.0.0.1 or 10.0.0.0/8)") from None
        return out


class BouncesSettings(Strict):
    """Returned mail (mailbox.py): the VERP return path and when soft bounces suppress."""

    # The envelope sender becomes `<local>+<token>@<domain>` of this address (VERP); None
    # keeps sender.address as the envelope sender, and returned mail is matched by Message-ID.
    address: str | None = None
    soft_limit: int = Field(3, ge=1, le=100)
    soft_window_days: int = Field(30, ge=1, le=3650)
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=64 * 1024)

    @field_validator("address")
    @classmethod
    def _verp_room(cls, value: str | None) -> str | None:
        from .tokens import VERP_TOKEN_CHARS

        if value is None:
            return None
        local, at, domain = value.partition("@")
        if not at or not local or not domain or any(c in value for c in " \t\r\n<>+"):
            raise ValueError("must be a plain address like bounces@imag.example.org")
        room = 64 - 1 - VERP_TOKEN_CHARS  # RFC 5321 §4.5.3.1.1: a local part of <= 64 octets
        if len(local) > room:
            raise ValueError(f"the part before @ must be at most {room} characters, to leave "
                             "room for the token")
        return value


class MailboxSettings(Strict):
    """The IMAP folder returned mail arrives in; the password comes from MAILER_MAILBOX_PASSWORD.

    aioimaplib speaks implicit TLS (port 993) but not STARTTLS, so `tls` is `tls` or `none`,
    and `none` is only accepted for a server on this machine (the login would cross the network
    unencrypted otherwise)."""

    host: str
    port: int | None = Field(None, ge=1, le=65535)
    tls: Literal["tls", "none"] = "tls"
    username: str
    password: str | None = None  # only ever set from MAILER_MAILBOX_PASSWORD
    folder: str = "INBOX"
    # Processed mail is moved here; None: it stays and is flagged ($MailerProcessed, \Seen).
    processed_folder: str | None = "Processed"
    poll_s: float = Field(300.0, ge=5)
    timeout_s: float = Field(30.0, gt=0)

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "tls" else 143)


class Settings(Strict):
    timezone: str = "Europe/Berlin"
    base_url: str = "http://127.0.0.1:8000"
    database_url: str = "sqlite:///var/mailer.db"
    secret_key: str | None = None  # only from MAILER_SECRET_KEY (or a generated dev key)
    sender: SenderSettings
    list_id: str
    unsubscribe_mailto: str
    message_id_domain: str | None = None
    campaigns_dir: Path = Path("campaigns")
    lists_dir: Path = Path("lists")
    templates_dir: Path = Path("templates")
    var_dir: Path = Path("var")
    organisation: OrganisationSettings
    smtp: SmtpSettings = SmtpSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    dispatch: DispatchSettings = DispatchSettings()
    web: WebSettings = WebSettings()
    lists: dict[str, ListSettings] = {}
    bounces: BouncesSettings = BouncesSettings()
    mailbox: MailboxSettings | None = None
    max_recipients: int = Field(1_000_000, ge=1)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone '{value}' (use e.g. Europe/Berlin)") from None
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// or http://")
        return value.rstrip("/")

    @field_validator("secret_key")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        problem = None if value is None else weak_secret(value)
        if problem:
            raise ValueError(f"MAILER_SECRET_KEY {problem}, so links could be forged; make one "
                             "with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def msgid_domain(self) -> str:
        return self.message_id_domain or self.sender.address.rpartition("@")[2]

    @property
    def outbox_dir(self) -> Path:
        return self.var_dir / "outbox"

    def secret(self) -> str:
        """The signing key: MAILER_SECRET_KEY, else a random key kept in var/secret.key."""
        if self.secret_key:
            return self.secret_key
        return _key_file(self.var_dir / "secret.key")


SECRET_MIN_CHARS = 32


def weak_secret(key: str) -> str | None:
    """Why a signing key is too weak to keep tokens unforgeable, or None."""
    if len(key) < SECRET_MIN_CHARS:
        return f"is {len(key)} characters long, fewer than the {SECRET_MIN_CHARS} needed"
    if len(set(key)) < 10:
        return "repeats too few characters to be random"
    return None


def _key_file(path: Path) -> str:
    """Read the key file, or create it atomically: the key is written to a private temporary
    file and linked into place, so a concurrent reader sees all of it or no file at all."""
    if not path.exists():
        private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: use its key
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the signing key ({getattr(exc, 'strerror', exc)}); "
                          "set MAILER_SECRET_KEY or fix the file", path=path) from None
    if mode & 0o077:
        raise ConfigError("the signing key can be read by other users: run "
                          f"'chmod 600 {path}' (or set MAILER_SECRET_KEY)", path=path)
    problem = weak_secret(key)
    if problem:
        raise ConfigError(
            f"the signing key {problem}, so links could be forged: delete the file to have a "
            "new one made (links in mails already sent stop working) or set MAILER_SECRET_KEY",
            path=path)
    return key


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    data = dict(data)
    smtp = dict(data.get("smtp") or {})
    simple = {
        "MAILER_DATABASE_URL": "database_url",
        "MAILER_SECRET_KEY": "secret_key",
        "MAILER_BASE_URL": "base_url",
        "MAILER_TIMEZONE": "timezone",
    }
    for var, key in simple.items():
        if env.get(var):
            data[key] = env[var]
    for name in SmtpSettings.model_fields:
        value = env.get(f"MAILER_SMTP_{name.upper()}")
        if value is not None and name != "dkim":
            smtp[name] = None if value == "" else value
    if env.get("MAILER_SMTP_HOST") and "MAILER_SMTP_PORT" not in env:
        smtp["port"] = 465 if smtp.get("tls") == "tls" else 25
    data["smtp"] = smtp
    mailbox = data.get("mailbox")
    if env.get("MAILER_MAILBOX_PASSWORD") and isinstance(mailbox, dict):
        data["mailbox"] = {**mailbox, "password": env["MAILER_MAILBOX_PASSWORD"]}
    dispatch = data.get("dispatch")
    if env.get("MAILER_DISPATCH_WORKERS") and (dispatch is None or isinstance(dispatch, dict)):
        data["dispatch"] = {**(dispatch or {}), "workers": env["MAILER_DISPATCH_WORKERS"]}
    web = data.get("web")
    if "MAILER_WEB_TRUSTED_PROXIES" in env and (web is None or isinstance(web, dict)):
        data["web"] = {**(web or {}), "trusted_proxies": env["MAILER_WEB_TRUSTED_PROXIES"]}
    return data


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    path = Path(path or env.get("MAILER_CONFIG") or "config.yaml")
    located = load_yaml(path, error=ConfigError)
    if located.data is None:
        located.data = {}
    if not isinstance(located.data, dict):
        raise ConfigError("the config must be a mapping of keys to values", path=path, line=1)
    if "secret_key" in located.data:
        raise ConfigError(
            "secrets belong in the environment: remove it and set MAILER_SECRET_KEY",
            path=path, line=located.line(("secret_key",)), field="secret_key")
    for block in ("sender", "organisation", "smtp", "scheduler", "dispatch", "web", "lists",
                  "bounces", "mailbox"):
        value = located.data.get(block)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"'{block}' must be a block of keys and values (indented lines below it), "
                f"not {type(value).__name__}", path=path, line=located.line((block,)),
                field=block)
    if "password" in (located.data.get("smtp") or {}):
        raise ConfigError(
            "secrets belong in the environment: remove it and set MAILER_SMTP_PASSWORD",
            path=path, line=located.line(("smtp", "password")), field="smtp.password")
    if "password" in (located.data.get("mailbox") or {}):
        raise ConfigError(
            "secrets belong in the environment: remove it and set MAILER_MAILBOX_PASSWORD",
            path=path, line=located.line(("mailbox", "password")), field="mailbox.password")
    data = _env_overrides(located.data, env)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise_validation(exc, Located(data, path, located.lines), error=ConfigError, model=Settings)
        raise  # unreachable: raise_validation always raises
    return _rooted(settings, path.parent)


def _rooted(settings: Settings, root: Path) -> Settings:
    """Relative directories in config.yaml are relative to the config file."""
    updates: dict[str, object] = {}
    for name in ("campaigns_dir", "lists_dir", "templates_dir", "var_dir"):
        value: Path = getattr(settings, name)
        if not value.is_absolute():
            updates[name] = root / value
    db = settings.database_url
    prefix = "sqlite:///"
    if db.startswith(prefix) and not db.startswith("sqlite:////") and ":memory:" not in db:
        updates["database_url"] = prefix + str((root / db[len(prefix):]).resolve())
    return settings.model_copy(update=updates)
