"""Opening the configured relay: the SMTP pool, or the embedded capture server behind one.

Beside the transport rather than in dispatch: the web app (confirmation mails) and `mailer
send --to` open a relay too, and need nothing else of the sending machinery.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from .config import Settings
from .store import Store
from .transport import Limiter, SmtpPool, Transport


@contextlib.asynccontextmanager
async def open_transport(settings: Settings, *, store: Store | None = None
                         ) -> AsyncIterator[Transport]:
    """The relay of `settings.smtp`, or a capture server writing to var/outbox/.

    With `store`, the rate limits are the database's shared buckets (quota.py): totals across
    every process sending through that database."""
    smtp = settings.smtp
    limiter: Limiter | None = None
    if store is not None:
        from .quota import SharedRateLimiter

        limiter = SharedRateLimiter(store.engine, smtp)
    if not smtp.embedded:
        async with SmtpPool(smtp, limiter=limiter) as pool:
            yield pool
        return
    from .capture import CaptureServer  # aiosmtpd: ~40 ms to import, needed only here

    async with CaptureServer(outbox=settings.outbox_dir) as server, SmtpPool(
        smtp, host=server.host, port=server.port, limiter=limiter
    ) as pool:
        yield pool
