"""`/healthz` and `/metrics` of `mailer serve`, for the administrator's monitoring.

`/healthz` answers 200 when the database answers (within HEALTH_TIMEOUT_S) and 503 otherwise,
with nothing about anyone in it. `/metrics` exists only when MAILER_METRICS_TOKEN is set, and
only for requests that carry it as `Authorization: Bearer <token>`: everyone else gets the
same 404 as for any unknown path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..config import weak_secret
from ..errors import ConfigError
from ..store import Store

log = logging.getLogger("mailer.web")
HEALTH_TIMEOUT_S = 5.0
TOKEN_ENV = "MAILER_METRICS_TOKEN"
NO_STORE = {"cache-control": "no-store"}


def metrics_token(env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token for /metrics, from the environment only; None when /metrics is off."""
    env = os.environ if env is None else env
    token = env.get(TOKEN_ENV) or None
    if token is not None:
        problem = weak_secret(token)
        if problem:
            raise ConfigError(f"{TOKEN_ENV} {problem}, so /metrics could be guessed; make one "
                              "with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return token


def _store(request: Request) -> Store:
    store: Store = request.app.state.web.store
    return store


def _ping(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def healthz(request: Request) -> Response:
    try:
        await asyncio.wait_for(run_in_threadpool(_ping, _store(request)), HEALTH_TIMEOUT_S)
    except Exception as exc:  # unreachable, refused, timed out: all the same to a monitor
        log.warning("health check: the database does not answer (%s)", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unavailable"},
                            status_code=503, headers=NO_STORE)
    return JSONResponse({"status": "ok", "database": "ok"}, headers=NO_STORE)


def routes(env: Mapping[str, str] | None = None) -> list[BaseRoute]:
    token = metrics_token(env)
    out: list[BaseRoute] = [Route("/healthz", healthz, methods=["GET"])]
    if token is None:
        return out
    expected = f"Bearer {token}".encode()

    async def metrics(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            raise HTTPException(404)  # as if there were no /metrics
        from ..metrics import render

        try:
            body = await run_in_threadpool(render, _store(request))
        except Exception as exc:
            log.warning("metrics: the database does not answer (%s)", type(exc).__name__)
            return Response("database unavailable\n", status_code=503, headers=NO_STORE)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    out.append(Route("/metrics", metrics, methods=["GET"]))
    return out
