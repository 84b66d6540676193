"""What every `mailer` command shares: the context, and user errors as one sentence."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from ..config import Settings, load_settings
from ..errors import MailerError, UserError

if TYPE_CHECKING:
    from ..store import Store

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> NoReturn:
    _say(message, error=True)
    sys.exit(1)


def error_line(message: str) -> None:
    """`error: …` on stderr (or a JSON log line) without ending the command."""
    _say(message, error=True)


def _say(message: str, *, error: bool = False) -> None:
    """On stderr: `error: …` as text, or with --log-format json one JSON line like the rest."""
    from ..logs import json_enabled

    if json_enabled():
        logging.getLogger("mailer").log(logging.ERROR if error else logging.INFO, message)
    else:
        click.echo(f"error: {message}" if error else message, err=True)


def user_errors(func: F) -> F:
    """User errors become one sentence on stderr and exit code 1; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(exc.sentence())
        except MailerError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            _say("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class Ctx:
    def __init__(self, config: str | None) -> None:
        self.config_path = config
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    def store(self) -> Store:
        """The database of the settings, its schema brought up to date (imported late: a
        command that needs no database does not load SQLAlchemy)."""
        from ..store import open_store

        return open_store(self.settings.database_url, var_dir=self.settings.var_dir)


pass_ctx = click.make_pass_decorator(Ctx)
