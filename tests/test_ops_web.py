"""`/healthz` and `/metrics` of the web app, and the scheduler heartbeat behind them.

The app runs in-process over ASGI (its confirmation mails to a real aiosmtpd server); the data
the metrics count is made by the real commands: `mailer send` through the fault server (one
address answers 5.1.1), a double opt-in through the app, a one-click unsubscribe, a `mailer run`
process that beats. Prometheus' own parser reads what /metrics serves.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailer.store import Store, open_store
from mailer.store.db import make_engine
from mailer.tokens import Tokens
from mailer.transport import SmtpPool
from mailer.web import create_app
from tests.conftest import Project, both_databases
from tests.helpers import mailer
from tests.smtpd import Faults, FaultServer, fault_server  # noqa: F401  (fixture)

TOKEN = "metrics-" + "k9Q2xW7pLm4Rt8Zs6Vb3Nc1Hd5Fg0Jy"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
CONFIRM_RE = re.compile(r"http://127\.0\.0\.1:8000(/confirm/\S+)")
GONE = "gone@example.org"




class App:
    def __init__(self, project: Project, server: FaultServer, store: Store | None = None
                 ) -> None:
        self.settings = project.settings()
        self.store = store or open_store(self.settings.database_url)
        self.server = server
        self.pool = SmtpPool(self.settings.smtp, host=server.host, port=server.port)
        app = create_app(self.settings, store=self.store, transport=self.pool)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 40000)),
            base_url="http://testserver")

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()
        self.store.dispose()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await self.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert "@" not in response.text  # no address, not even an erased one's hash
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text)
                for s in family.samples}


@pytest.fixture
async def make_app(project: Project, fault_server) -> AsyncIterator:  # noqa: F811
    apps: list[App] = []

    async def start(faults: Faults | None = None, store: Store | None = None) -> App:
        app = App(project, await fault_server(faults), store)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.close()


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


@both_databases
async def test_metrics_count_deliveries_bounces_queue_and_consent(
        project: Project, make_app, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_METRICS_TOKEN", TOKEN)
    project.crowd(5, special={1: GONE})
    app = await make_app(Faults(rcpt={GONE: (550, "5.1.1 no such user")}))
    relay = {"MAILER_SMTP_HOST": app.server.host, "MAILER_SMTP_PORT": str(app.server.port),
             "MAILER_SMTP_RATE_PER_SECOND": "5000"}
    code, out, err = await mailer(project, "send", "crowd", **relay)
    assert code == 3 and "4 sent, 1 failed" in out, out + err  # 3: some failed
    code, out, err = await mailer(project, "send", "crowd", "--again", "--limit", "1", **relay)
    assert code == 0 and "1 sent, 0 failed, 3 left" in out, out + err

    # A double opt-in through the app, and a one-click unsubscribe from a mail.
    page = await app.client.get("/subscribe")
    csrf = CSRF_RE.search(page.text)
    assert csrf
    response = await app.client.post("/subscribe", data={
        "csrf": csrf.group(1), "email": "neu@example.org", "name": "Neu", "language": "de",
        "lists": ["newsletter"]})
    assert response.status_code == 200
    mail = email.message_from_bytes(app.server.messages[-1].content, policy=email.policy.default)
    path = CONFIRM_RE.search(mail.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    assert path
    page = await app.client.get(path.group(1))
    csrf = CSRF_RE.search(page.text)
    assert csrf
    assert (await app.client.post(path.group(1), data={"csrf": csrf.group(1)})).status_code == 200
    token = Tokens(app.settings.secret()).manage("person0@example.org", "crowd", "crowd")
    response = await app.client.post(f"/unsubscribe/{token}",
                                     data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200

    m = await app.metrics()
    assert value(m, "mailer_deliveries", status="sent") == 5
    assert value(m, "mailer_deliveries", status="failed") == 1
    assert value(m, "mailer_deliveries", status="pending") == 3
    assert value(m, "mailer_queue_depth") == 3
    assert value(m, "mailer_runs", status="running") == 1
    assert value(m, "mailer_runs", status="finished") == 1
    assert value(m, "mailer_bounces", reason="hard_bounce") == 1
    assert value(m, "mailer_subscriptions_total") == 1
    assert value(m, "mailer_unsubscriptions_total") == 1
    assert value(m, "mailer_consent_events_total", event="subscribed") == 1
    assert value(m, "mailer_consent_events_total", event="confirmed") == 1
    assert value(m, "mailer_list_members", list="newsletter", status="subscribed") == 1
    assert not any(name.startswith("mailer_scheduler") for name, _ in m)  # never beat yet


async def test_metrics_only_with_the_token(project: Project, make_app,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    app = await make_app()  # MAILER_METRICS_TOKEN unset: no /metrics at all
    plain = (await app.client.get("/no-such-page")).status_code
    assert plain == 404
    response = await app.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404
    monkeypatch.setenv("MAILER_METRICS_TOKEN", TOKEN)
    app = await make_app()
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}]:
        response = await app.client.get("/metrics", headers=headers)
        assert response.status_code == 404 and "mailer_" not in response.text, headers
    assert "mailer_deliveries" in (await app.client.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).text
    monkeypatch.setenv("MAILER_METRICS_TOKEN", "short")
    with pytest.raises(Exception, match="MAILER_METRICS_TOKEN is 5 characters long"):
        await make_app()


async def test_healthz_says_whether_the_database_answers(project: Project, make_app,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_METRICS_TOKEN", TOKEN)
    app = await make_app()
    code, _, err = await mailer(project, "subscribers", "import", str(_people(project)),
                                "--list", "newsletter", "--consent-source", "Formular 2026")
    assert code == 0, err
    response = await app.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}
    assert response.headers["cache-control"] == "no-store"
    assert "@" not in response.text and "Ayşe" not in response.text
    # A database that does not answer (nothing listens on port 1): 503, for metrics too.
    down = Store(make_engine("postgresql+psycopg://mailer@127.0.0.1:1/mailer"))
    app = await make_app(store=down)
    response = await app.client.get("/healthz")
    assert response.status_code == 503 and response.json()["status"] == "unavailable"
    response = await app.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503


def _people(project: Project) -> Path:
    path = project.root / "people.csv"
    path.write_text("email,name\nayse@example.org,Ayşe Yılmaz\n", encoding="utf-8")
    return path


async def test_the_scheduler_heartbeat_reaches_metrics(project: Project, make_app,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_METRICS_TOKEN", TOKEN)
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(text.replace("scheduler:\n", "scheduler:\n  poll_s: 0.2\n", 1),
                              encoding="utf-8")
    full = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer", "run", env=full, cwd=project.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        started = time.time()
        app = await make_app()
        beat = None
        for _ in range(150):
            m = await app.metrics()
            beat = m.get(("mailer_scheduler_heartbeat_timestamp_seconds", ()))
            if beat:
                break
            await asyncio.sleep(0.2)
        assert beat is not None and started - 1 < beat <= time.time()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    log = err.decode()
    assert proc.returncode == 0, log
    assert "event=heartbeat role=scheduler" in log


async def test_serve_answers_healthz_as_a_process(project: Project) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config),
            "MAILER_METRICS_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer", "serve", "--port", str(port), env=full, cwd=project.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(150):
                try:
                    response = await client.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
            assert json.loads(response.text) == {"status": "ok", "database": "ok"}
            assert (await client.get("/metrics")).status_code == 404
            response = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 200 and "mailer_queue_depth 0.0" in response.text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert TOKEN not in err.decode()
