"""`mailer serve` as a real process on a loopback port: slow clients, and what it logs.

The server runs with a low file limit (RLIMIT_NOFILE 200) so that a flood of half-sent
requests would exhaust it without the connection cap, and with `request_timeout_s: 2` so the
test waits seconds, not minutes. Loopback only, a bounded number of sockets, bounded time.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mailer.tokens import Tokens
from tests.conftest import Project

FILE_LIMIT = 200
HALF_OPEN = 200
TIMEOUT_S = 2
WEB_LIMITS = f"""\
  request_timeout_s: {TIMEOUT_S}
  timeout_keep_alive_s: 1
  backlog: 32
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Serving:
    base: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    secret: str

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.log()


def _limit_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, hard))


@pytest.fixture
def serving(project: Project, tmp_path: Path) -> Iterator[Serving]:
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(text.replace("web:\n", "web:\n" + WEB_LIMITS, 1),
                              encoding="utf-8")
    port = free_port()
    env = {**os.environ, **project.env, "MAILER_BASE_URL": f"http://127.0.0.1:{port}",
           "MAILER_LOG_LEVEL": "INFO"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailer", "--config", str(project.config), "serve",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=project.root,
            preexec_fn=_limit_files)
    served = Serving(f"http://127.0.0.1:{port}", port, process, log_path,
                     project.env["MAILER_SECRET_KEY"])
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{served.base}/subscribe", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mailer serve did not start:\n{served.log()[-3000:]}")
            time.sleep(0.2)
        yield served
    finally:
        served.stop()


def _half_sent(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each send part of a request head, and then nothing."""
    opened = []
    for i in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
            head = b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else b"GET /sub"
            sock.sendall(head)
        except OSError:
            sock.close()
            continue
        opened.append(sock)
    return opened


def _wait_until_closed(sockets: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """Read every socket until the server closes it (a 408 first, or nothing); the ones
    still open after `timeout_s`."""
    waiting = {s.fileno(): s for s in sockets}
    for sock in sockets:
        sock.setblocking(False)
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(list(waiting), [], [], 0.2)
        for fd in readable:
            try:
                if not waiting[fd].recv(4096):
                    del waiting[fd]
            except BlockingIOError:
                continue
            except OSError:  # reset
                del waiting[fd]
    return list(waiting.values())


def test_a_flood_of_half_sent_requests_is_cut_off_quietly(serving: Serving) -> None:
    started = time.monotonic()
    sockets = _half_sent(serving.port, HALF_OPEN)
    flooded_s = time.monotonic() - started
    try:
        # The request body may also crawl: the app sees a disconnect, not an error.
        crawler = socket.create_connection(("127.0.0.1", serving.port), timeout=2)
        crawler.sendall(b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                        b"x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nemail=a")
        sockets.append(crawler)
        still_open = _wait_until_closed(sockets, TIMEOUT_S + 8)
        assert still_open == [], f"{len(still_open)} of {len(sockets)} connections still open"
        closed_s = time.monotonic() - started
        answered = httpx.get(f"{serving.base}/subscribe", timeout=5)
        assert answered.status_code == 200 and "csrf" in answered.text
    finally:
        for sock in sockets:
            sock.close()
    log = serving.stop()
    lines = log.splitlines()
    print(f"{len(sockets)} half-sent connections opened in {flooded_s:.2f} s, all closed by "
          f"the server after {closed_s:.2f} s; {len(lines)} log lines:\n{log}")
    assert len(lines) < 30, log
    assert "Traceback" not in log and "out of system resource" not in log
    assert re.search(r"closed \d+ connections that sent no complete request", log)


def test_log_lines_of_the_server_carry_no_tokens_or_addresses(serving: Serving) -> None:
    tokens = Tokens(serving.secret)
    token = tokens.manage("secret.person@example.org", "newsletter")
    confirm = tokens.confirm("secret.person@example.org", ["newsletter"], "n" * 22)
    with httpx.Client(base_url=serving.base, timeout=5) as client:
        for method, path in [
            ("GET", f"/unsubscribe/{token}"), ("HEAD", f"/unsubscribe/{token}"),
            ("GET", f"/Unsubscribe/{token}"), ("GET", f"/PREFERENCES/{token}/"),
            ("GET", f"/preferences/{token}?lang=de"), ("GET", f"/confirm/{confirm}"),
            ("POST", f"/unsubscribe/{token}"), ("GET", f"/{token}"),
            ("GET", "/subscribe?email=secret.person%40example.org"),
            ("GET", "/secret.person@example.org"), ("GET", "/subscribe/"),
        ]:
            client.request(method, path)
        client.get("/subscribe/", headers={"Host": "evil.example"})
        client.post("/subscribe", data={"email": "secret.person@example.org"})  # no CSRF: 403
    log = serving.stop()
    assert log.count('HTTP/1.1"') >= 12, log  # the access lines are there
    for secret in (token[:12], token[-12:], confirm[:12], confirm[-12:], "secret.person",
                   "secret%2Eperson", "evil.example"):
        assert secret not in log, (secret, log)
    assert "/Unsubscribe/…" in log and "/subscribe?…" in log


def test_forwarded_for_from_an_untrusted_peer_changes_nothing(serving: Serving,
                                                              project: Project) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 by default; `mailer serve` believes it
    only from `web.trusted_proxies` (empty here): a client on loopback cannot rotate it to
    escape the per-IP limit or to put a made-up address into the consent log."""
    from sqlalchemy import select

    from mailer.store import open_store
    from mailer.store.subscriber_tables import consent_events

    codes = []
    with httpx.Client(base_url=serving.base, timeout=5) as client:
        page = client.get("/subscribe")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        for i in range(22):
            response = client.post("/subscribe", data={
                "csrf": token.group(1), "email": f"xff{i}@example.org", "language": "de",
                "lists": "newsletter"}, headers={"X-Forwarded-For": f"198.51.100.{i}"})
            codes.append(response.status_code)
    log = serving.stop()
    assert codes == [200] * 20 + [429] * 2
    store = open_store(project.settings().database_url)
    with store.engine.connect() as conn:
        ips = {row.ip for row in conn.execute(select(consent_events))}
    store.dispose()
    assert ips == {"127.0.0.1"}
    assert "198.51.100." not in log  # nor in the access log
