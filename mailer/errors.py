"""One error tree for the whole mailer.

User errors (config, campaign, list) carry a file and a line and become one sentence on stderr.
Delivery errors split into temporary (retry later) and permanent (give up), as RFC 5321 §4.2.1
splits replies into 4yz and 5yz.
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


class TemporaryFailure(DeliveryError):
    """4xx reply, dropped connection or timeout: retried with backoff."""


class PermanentFailure(DeliveryError):
    """5xx reply: not retried."""


class AuthenticationFailure(DeliveryError):
    """The relay refused our credentials: the run stops and stays resumable."""
