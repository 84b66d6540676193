"""`--log-format json` for `mailer run` and `mailer serve`: real processes, every stderr line a
JSON object, fields taken apart, and no address in any of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from mailer.logs import fields_of
from mailer.tokens import Tokens
from tests.conftest import Project
from tests.smtpd import Faults, fault_server  # noqa: F401  (fixture)

GONE = "gone.person@example.org"


def objects(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    out = []
    for line in lines:
        try:
            obj = json.loads(line)  # every line is one JSON object
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(obj, dict) and {"ts", "level", "logger", "message"} <= set(obj), line
        assert obj["ts"].endswith("Z")
        out.append(obj)
    return out


async def start(project: Project, *args: str, **env: str) -> asyncio.subprocess.Process:
    full = {**os.environ, **project.env, "MAILER_CONFIG": str(project.config), **env}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer", *args, env=full, cwd=project.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_run_logs_one_json_object_per_line(project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(4, special={2: GONE})
    when = (datetime.now(UTC) - timedelta(minutes=2)).astimezone(ZoneInfo("Europe/Berlin"))
    text = (project.root / "campaigns" / "crowd.yaml").read_text(encoding="utf-8")
    project.campaign("crowd.yaml", text + f'schedule: {{at: "{when:%Y-%m-%d %H:%M:%S}"}}\n')
    server = await fault_server(Faults(rcpt={GONE: (550, f"5.1.1 <{GONE}> no such user")}))
    proc = await start(project, "--log-format", "json", "run", "--once",
                       MAILER_SMTP_HOST=server.host, MAILER_SMTP_PORT=str(server.port))
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == ""
    logged = objects(err.decode())
    events = {o.get("event"): o for o in logged}
    assert events["fire"]["campaign"] == "crowd" and events["fire"]["recipients"] == "4"
    assert events["finished"]["sent"] == "3" and events["finished"]["failed"] == "1"
    assert "@" not in err.decode()  # not the 5.1.1 reply's address, not anyone's
    assert len(server.messages) == 3


async def test_serve_logs_json_access_lines_without_tokens(project: Project) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await start(project, "serve", "--port", str(port), MAILER_LOG_FORMAT="json")
    token = Tokens(project.env["MAILER_SECRET_KEY"]).manage("anna@example.org", "newsletter", "")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(150):
                try:
                    await client.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
            assert (await client.get("/subscribe")).status_code == 200
            response = await client.post(f"/unsubscribe/{token}",
                                         data={"List-Unsubscribe": "One-Click"})
            assert response.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    logged = objects(out.decode() + err.decode())
    access = [o for o in logged if o["logger"] == "uvicorn.access"]
    assert {(o["method"], o["path"], o["status"]) for o in access} >= {
        ("GET", "/subscribe", 200), ("POST", "/unsubscribe/…", 200)}
    assert any(o["message"].startswith("serving on http://") for o in logged)
    assert any("Started server process" in o["message"] for o in logged)
    text = out.decode() + err.decode()
    assert token not in text and "@" not in text


async def test_a_user_error_is_a_json_line_too(project: Project, fault_server) -> None:  # noqa: F811
    server = await fault_server()
    proc = await start(project, "--log-format", "json", "run", MAILER_ALLOW_LOCAL_LINKS="",
                       MAILER_SMTP_HOST=server.host, MAILER_SMTP_PORT=str(server.port))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    [line] = objects(err.decode())
    assert line["level"] == "ERROR" and "base_url" in line["message"]


def test_key_value_messages_come_apart() -> None:
    assert fields_of('event=fire campaign=x late_s=0.250 note="a b c"') == {
        "event": "fire", "campaign": "x", "late_s": "0.250", "note": "a b c"}
    assert fields_of("Started server process [42]") == {}
