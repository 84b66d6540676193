"""Log lines as text (the default) or as JSON: one object per line, for journald, Loki & co.

`mailer --log-format json COMMAND` (or MAILER_LOG_FORMAT=json, handy in a unit file) turns every
line on stderr into `{"ts": "…Z", "level": "INFO", "logger": "…", "message": "…", …}`. The
scheduler's `event=fire campaign=… run=…` lines also come apart into fields, uvicorn's access
lines into `client`, `method`, `path` (tokens already cut out) and `status`. Messages at INFO
and above pass through `redact_addresses`, whatever logger wrote them: no address in the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from .redact import redact_addresses

FORMATS = ("text", "json")
ENV = "MAILER_LOG_FORMAT"
_RESERVED = {"ts", "level", "logger", "message", "exception"}
_PAIR = r'[A-Za-z_][\w.-]*=(?:"[^"]*"|\S*)'
_PAIRS = re.compile(rf"^{_PAIR}(?: {_PAIR})*$")
_ONE = re.compile(r'([A-Za-z_][\w.-]*)=("[^"]*"|\S*)')
_state = {"json": False}


def json_enabled() -> bool:
    return _state["json"]


def fields_of(message: str) -> dict[str, str]:
    """`event=fire campaign=x note="a b"` as a mapping; {} for a message that is not just
    key=value pairs."""
    if not _PAIRS.match(message):
        return {}
    return {key: value[1:-1] if value.startswith('"') else value
            for key, value in _ONE.findall(message)}


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """One line of the scheduler (scheduler.py, jobs.py, leader.py), as `fields_of` reads it:
    event=… campaign=… run=… and counts; never addresses."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.3f}"
        value = str(value)
        parts.append(f'{key}="{value}"' if (" " in value or not value) else f"{key}={value}")
    logging.getLogger("mailer.scheduler").log(level, " ".join(parts))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.INFO:
            message = redact_addresses(message)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"ts": f"{stamp}.{int(record.msecs):03d}Z",
                               "level": record.levelname, "logger": record.name,
                               "message": message}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) \
                and len(record.args) == 5:
            client, method, path, _, status = record.args
            out |= {"client": client, "method": method, "path": path, "status": status}
        else:
            for key, value in fields_of(message).items():
                if key not in _RESERVED:
                    out[key] = value
        if record.exc_info:
            text = record.exc_text or self.formatException(record.exc_info)
            out["exception"] = redact_addresses(text) if record.levelno >= logging.INFO else text
        return json.dumps(out, ensure_ascii=False, default=str)


class JsonHandler(logging.StreamHandler):
    """Writes JSON whatever formatter is set on it later (`mailer run` sets its own on every
    handler for text lines)."""

    _json = JsonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        return self._json.format(record)


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """The root logger on stderr, as text or JSON. aiosmtpd logs every SMTP command (addresses
    included) at INFO on 'mail.log': kept at WARNING, like APScheduler and Alembic."""
    root = logging.getLogger()
    if fmt == "json":
        _state["json"] = True
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(JsonHandler(sys.stderr))
        root.setLevel(level)
    else:
        _state["json"] = False
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    for noisy in ("apscheduler", "alembic", "flufl.bounce"):  # flufl: every detector at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
