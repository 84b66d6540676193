"""One error tree for the whole mailer.

User errors (config, campaign, list) carry a file and a line and become one sentence on stderr.
SMTP replies are not exceptions: the transport classifies them (RFC 5321 §4.2.1: 4yz temporary,
5yz permanent) into results the dispatcher records; only a refused login stops a run.
"""

from __future__ import annotations

from pathlib import Path


class MailerError(Exception):
    """Base of every error the mailer raises on purpose."""


class UserError(MailerError):
    """Something a person can fix: printed as one sentence, exit code 1."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self.sentence())

    def sentence(self) -> str:
        where = ""
        if self.path:
            where = self.path + (f", line {self.line}" if self.line else "")
        if self.field:
            where = f"{where}, field '{self.field}'" if where else f"field '{self.field}'"
        return f"{where}: {self.message}" if where else self.message


class ConfigError(UserError):
    """config.yaml or a MAILER_* variable is wrong."""


class CampaignError(UserError):
    """A campaign file is wrong."""


class ListError(UserError):
    """A list file under lists/ is wrong."""


class TemplateError(UserError):
    """A template under templates/ does not render."""


class DeliveryError(MailerError):
    """An SMTP transaction did not succeed."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class LedgerError(MailerError):
    """The ledger could not record the result of a sent message: the run stops at once (no
    further transaction), and a later start resumes it."""


class AuthenticationFailure(DeliveryError):
    """The relay refused our credentials: the run stops and stays resumable."""
