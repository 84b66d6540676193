"""A key from `mailer dkim keygen` signs what `mailer send` hands the relay, and verifiers that
know nothing of mailer accept the signature with the TXT record keygen printed: dkimpy's
verifier (its DNS look-up answered with that record) and OpenDKIM (Debian's `opendkim`, its
`TestPublicKeys` file holding the record), when installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dkim
import pytest

from tests.conftest import Project
from tests.smtpd import fault_server  # noqa: F401  (fixture)
from tests.test_doctor import DOMAIN, keygen, mailer


def _dnsfunc(records: dict[str, str]):  # noqa: ANN202
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip(".").lower())
        return value.encode() if value is not None else None

    return lookup


def opendkim_verdicts(messages: list[bytes], name: str, value: str, tmp: Path) -> list[str]:
    keys = tmp / "keys"
    keys.write_text(f"{name} {value}\n", encoding="ascii")
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keys}\n", encoding="ascii")
    verdicts = []
    for i, data in enumerate(messages):
        path = tmp / f"m{i}.eml"
        path.write_bytes(data)
        done = subprocess.run(["opendkim", "-x", str(conf), "-t", str(path)],
                              capture_output=True, text=True, timeout=30)
        verdicts.append(done.stdout + done.stderr)
    return verdicts


async def test_mails_signed_with_a_generated_key_verify(project: Project, fault_server,  # noqa: F811
                                                        tmp_path: Path) -> None:
    key = tmp_path / "dkim.pem"
    value = keygen(project, key, selector="nl2026")
    other = keygen(project, tmp_path / "other.pem", selector="nl2026")
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(text.replace(
        "smtp:\n", f"smtp:\n  dkim: {{selector: nl2026, domain: {DOMAIN}, key_file: {key}}}\n", 1),
        encoding="utf-8")
    project.crowd(3)
    server = await fault_server()
    code, out, err = await mailer(project, "send", "crowd", MAILER_SMTP_HOST=server.host,
                                  MAILER_SMTP_PORT=str(server.port))
    assert code == 0 and "3 sent" in out, err
    assert len(server.messages) == 3
    name = f"nl2026._domainkey.{DOMAIN}"
    for message in server.messages:
        data = message.content
        assert data.startswith(b"DKIM-Signature:") and f"d={DOMAIN}".encode() in data
        assert dkim.verify(data, dnsfunc=_dnsfunc({name: value}))
        assert not dkim.verify(data, dnsfunc=_dnsfunc({name: other}))  # another key: no
        tampered = data.replace(b"FORUM", b"F0RUM", 1)
        assert tampered != data and not dkim.verify(tampered, dnsfunc=_dnsfunc({name: value}))

    if shutil.which("opendkim") is None:
        pytest.skip("Debian's opendkim is not installed: OpenDKIM's verdict was not asked "
                    "(apt-get install opendkim)")
    contents = [m.content for m in server.messages]
    verdicts = opendkim_verdicts(contents, name, value, tmp_path)
    assert all("verification (s=nl2026, d=imag-dortmund.de, 2048-bit key) succeeded" in v
               for v in verdicts), verdicts
    wrong = opendkim_verdicts(contents[:1], name, other, tmp_path)
    assert "failed" in wrong[0] and "succeeded" not in wrong[0], wrong
