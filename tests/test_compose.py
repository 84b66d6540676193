"""Composing: DKIM signatures that verify, and headers that RFC 8058 one-click needs signed."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.compose import Composer, address_header, encode_header
from mailer.errors import ConfigError
from mailer.tokens import Tokens
from tests.conftest import Project

CAMPAIGN = """\
template: newsletter
audience: {lists: [partners]}
content:
  de:
    subject: "Grüße an {{ recipient.name }}"
    blocks:
      - heading: "Hallo"
"""


def dkim_key(project: Project, tmp_path: Path) -> tuple[Path, bytes]:
    """A fresh 2048-bit key in a 0600 file named by config.yaml; returns it and its DER."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = tmp_path / "dkim.pem"
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    pub_der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    config = project.config.read_text(encoding="utf-8").replace(
        "  timeout_s: 30\n",
        f"  timeout_s: 30\n  dkim: {{selector: mail, domain: imag.example.org, key_file: {key}}}\n")
    project.config.write_text(config, encoding="utf-8")
    return key, pub_der


def test_dkim_key_readable_by_others_is_refused(project: Project, tmp_path: Path) -> None:
    key, _ = dkim_key(project, tmp_path)
    key.chmod(0o644)
    project.campaign("c.yaml", CAMPAIGN)
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "c.yaml", settings)
    with pytest.raises(ConfigError, match="chmod 600"):
        Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))


def test_dkim_signature_verifies_and_covers_list_unsubscribe(project: Project,
                                                             tmp_path: Path) -> None:
    _, pub_der = dkim_key(project, tmp_path)
    project.campaign("c.yaml", CAMPAIGN)
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "c.yaml", settings)
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))
    data = composer.compose(Recipient(email="a@example.org", name="Zoë", list="partners"),
                            message_id="<1@imag.example.org>").data
    assert data.startswith(b"DKIM-Signature:")
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub_der)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mail._domainkey.imag.example.org."
        return record

    assert dkim.verify(data, dnsfunc=dns)
    signature = data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"list-unsubscribe" in signature and b"list-unsubscribe-post" in signature
    # Any change to a signed header breaks the signature.
    assert not dkim.verify(data.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                                        b"List-Unsubscribe-Post: List-Unsubscribe=One-Clock"),
                           dnsfunc=dns)


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=1, max_size=300).filter(lambda t: t.strip() == t and t.isprintable()
                                                      and "  " not in t))
def test_any_subject_round_trips_through_a_mail_parser(text: str) -> None:
    raw = encode_header("Subject", text) + b"\r\n" + address_header(
        "To", text[:4], "a@example.org") + b"\r\n\r\nbody\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == text
    assert msg["To"].addresses[0].addr_spec == "a@example.org"
    assert msg["To"].addresses[0].display_name == text[:4].strip()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_header_values_cannot_inject_headers() -> None:
    raw = encode_header("Subject", "Hallo\r\nBcc: victim@example.org") + b"\r\n\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None and "Bcc" in msg["Subject"]
