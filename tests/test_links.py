"""Refuse broken links: no mail through a real relay with links recipients cannot follow.

The relay is the fault server on 127.0.0.1 (a real relay as far as mailer can tell: anything
but the embedded capture server). Every refusal happens before anything is written: the
SQLite file under var/ is never even created, and the relay never sees a connection.
"""

from __future__ import annotations

import pytest

from mailer.links import link_problem
from tests.conftest import Project
from tests.helpers import mailer as run_async
from tests.helpers import smtp_env
from tests.smtpd import FaultServer, fault_server  # noqa: F401  (fixture)

PUBLIC = "https://newsletter.imag-dortmund.de"


async def mailer(project: Project, server: FaultServer | None, *args: str,
                 **env: str) -> tuple[int, str, str]:
    """`mailer ARGS` with local links refused again (the fixture allows them), optionally
    through the fault server `server` as the relay."""
    relay = smtp_env(server) if server is not None else {}
    return await run_async(project, *args, **{"MAILER_ALLOW_LOCAL_LINKS": "",
                                              "MAILER_SMTP_RATE_PER_SECOND": "5000",
                                              **relay, **env})


@pytest.mark.parametrize("url", [
    "http://newsletter.imag-dortmund.de",
    "http://127.0.0.1:8000",
    "https://127.0.0.1:8000",
    "https://[::1]/",
    "https://localhost:8443",
    "https://mailer.localhost",
    "https://10.1.2.3",
    "https://192.168.178.20",
    "https://172.20.0.4",
    "https://[fd00::5]",
    "https://169.254.1.1",
    "https://imag.example.org",
    "https://example.com",
    "https://newsletter.example",
    "https://newsletter.test",
    "https://mailer.local",
    "https://mailer",
])
def test_links_that_lead_nowhere(url: str) -> None:
    assert link_problem(url) is not None


@pytest.mark.parametrize("url", [PUBLIC, "https://newsletter.imag-dortmund.de:8443/nl",
                                 "https://80.158.12.34", "https://examples.org"])
def test_public_https_links(url: str) -> None:
    assert link_problem(url) is None


def _refused(code: int, err: str, url: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: refusing to send through the relay")
    assert "base_url" in err and "MAILER_BASE_URL" in err and url in err
    assert "MAILER_ALLOW_LOCAL_LINKS=1" in err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://newsletter.imag.example.org"])
async def test_send_through_a_relay_is_refused_before_anything_is_written(
        project: Project, fault_server, url: str) -> None:  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    code, _, err = await mailer(project, server, "send", "crowd", MAILER_BASE_URL=url)
    _refused(code, err, url)
    assert server.connections == 0
    assert not (project.root / "var" / "mailer.db").exists()  # no run, no ledger, no database


async def test_test_sends_and_confirmations_are_refused_too(project: Project,
                                                             fault_server) -> None:  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    url = "http://127.0.0.1:8000"
    code, _, err = await mailer(project, server, "send", "crowd", "--to", "me@imag-dortmund.de")
    _refused(code, err, url)
    people = project.root / "people.csv"
    people.write_text("email,name\nneu@example.org,Neu\n", encoding="utf-8")
    code, _, err = await mailer(project, server, "subscribers", "import", str(people),
                                "--list", "newsletter", "--send-confirmation")
    _refused(code, err, url)
    assert server.connections == 0
    assert not (project.root / "var" / "mailer.db").exists()


async def test_scheduler_and_web_app_refuse_to_start(project: Project,
                                                     fault_server) -> None:  # noqa: F811
    server = await fault_server()
    url = "https://192.168.1.10"
    code, _, err = await mailer(project, server, "run", "--once", MAILER_BASE_URL=url)
    _refused(code, err, url)
    code, _, err = await mailer(project, server, "serve", "--port", "1", MAILER_BASE_URL=url)
    _refused(code, err, url)
    assert server.connections == 0
    assert not (project.root / "var" / "mailer.db").exists()


async def test_dry_runs_the_capture_server_and_public_links_are_not_refused(
        project: Project, fault_server) -> None:  # noqa: F811
    project.crowd(3)
    server = await fault_server()
    code, out, err = await mailer(project, server, "send", "crowd", "--dry-run")
    assert code == 0 and "3 messages would be sent" in out, err
    code, out, err = await mailer(project, None, "send", "crowd")  # the embedded capture server
    assert code == 0 and "3 sent" in out, err
    assert len(list((project.root / "var" / "outbox" / "new").iterdir())) == 3
    code, out, err = await mailer(project, server, "send", "crowd", "--again",
                                  MAILER_BASE_URL=PUBLIC)
    assert code == 0 and "3 sent" in out, err
    assert len(server.messages) == 3
    assert f"<{PUBLIC}/unsubscribe/".encode() in server.messages[0].content


async def test_the_test_switch_lets_local_links_through(project: Project,
                                                        fault_server) -> None:  # noqa: F811
    project.crowd(2)
    server = await fault_server()
    code, out, err = await mailer(project, server, "send", "crowd",
                                  MAILER_ALLOW_LOCAL_LINKS="1")
    assert code == 0 and "2 sent" in out, err
    assert len(server.messages) == 2
