"""Privacy leftovers: opaque tokens, erasure that sticks, safe exports, headers within RFC 5322."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import json

import pytest
from click.testing import CliRunner
from itsdangerous import URLSafeSerializer
from sqlalchemy import select

from mailer import subscribers as subs
from mailer.audience import Recipient
from mailer.checks import check_campaign
from mailer.cli import main
from mailer.compose import Composer, address_header, encode_header
from mailer.store import open_store
from mailer.store.subscriber_tables import consent_events
from mailer.store.tables import deliveries, suppressions
from mailer.tokens import TokenError, Tokens
from tests.conftest import Project
from tests.smtpd import Faults, fault_server  # noqa: F401  (fixture)
from tests.test_dispatch import send_all

SECRET = "privacy-test-secret-0123456789abcdefghij"
ADDRESS = "anna.schmidt@example.org"


# --- opaque tokens --------------------------------------------------------------------------


def decodings(token: str) -> list[bytes]:
    """Every way a curious reader could try to read a token."""
    out = []
    for part in token.split("."):
        for pad in range(3):
            with contextlib.suppress(ValueError):
                out.append(base64.urlsafe_b64decode(part + "=" * pad))
    return out


def test_tokens_reveal_nothing_about_the_subscriber() -> None:
    tokens = Tokens(SECRET)
    for token in (tokens.manage(ADDRESS, "newsletter", "wir-alle-2026-12"),
                  tokens.confirm(ADDRESS, ["newsletter"], "nonce123")):
        assert "anna" not in token.lower() and "newsletter" not in token
        for raw in decodings(token):
            assert b"anna" not in raw.lower() and b"example" not in raw and b"newsletter" not in raw
    # The same payload gives the same token: a retried message is the same message.
    assert tokens.manage(ADDRESS, "newsletter") == tokens.manage(ADDRESS, "newsletter")
    assert tokens.manage(ADDRESS, "newsletter") != tokens.manage(ADDRESS, "partners")


def test_tokens_round_trip_and_refuse_tampering() -> None:
    tokens = Tokens(SECRET)
    token = tokens.manage(ADDRESS, "partners", "heymat")
    read = tokens.read_manage(token)
    assert (read.email, read.list, read.campaign) == (ADDRESS, "partners", "heymat")
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for bad in (flipped, token[:-2], token + "AA", "", "x" * 5000,
                Tokens(SECRET + "-other").manage(ADDRESS, "partners")):
        with pytest.raises(TokenError):
            tokens.read_manage(bad)
    # A confirmation token is no unsubscribe token, and the other way round.
    with pytest.raises(TokenError):
        tokens.read_manage(tokens.confirm(ADDRESS, ["newsletter"], "n"))
    with pytest.raises(TokenError):
        tokens.read_confirm(token)


def test_confirmation_tokens_expire() -> None:
    import time

    tokens = Tokens(SECRET)
    fresh = tokens.confirm(ADDRESS, ["newsletter", "partners"], "n1")
    assert tokens.read_confirm(fresh) == (ADDRESS, ["newsletter", "partners"], "n1")
    old = tokens.confirm(ADDRESS, ["newsletter"], "n2", now=time.time() - 8 * 24 * 3600)
    with pytest.raises(TokenError, match="expired"):
        tokens.read_confirm(old)


# Issued by this release for SECRET: a later release must still read them (mails already out).
GOLDEN_MANAGE = ("0unQ5JRxKj2fHj9eo_jex9pV0BqktX5Ox5YeDe9USBySwVBmxLan82r18RPq0bHIL17xdk-Jio"
                 "dO0xveLx9sLwUrc6c")
GOLDEN_CONFIRM = ("QrapjCXVIZ4AFmSpm6NuGrSge2bMERcFw_Fk9XWywa5zk5P-cd4hg845NQ84-kts4QJFVi8_7n6X"
                  "MdspGm9kJt0LSYtrMyBeI2o")


def test_tokens_are_stable_across_releases() -> None:
    tokens = Tokens(SECRET)
    assert tokens.manage(ADDRESS, "newsletter", "wir-alle-2026-12") == GOLDEN_MANAGE
    read = tokens.read_manage(GOLDEN_MANAGE)
    assert (read.email, read.list, read.campaign) == (ADDRESS, "newsletter", "wir-alle-2026-12")
    assert tokens.confirm(ADDRESS, ["newsletter", "partners"], "n1", now=1790000000) \
        == GOLDEN_CONFIRM
    assert tokens.read_confirm(GOLDEN_CONFIRM, max_age_s=10**10) == (
        ADDRESS, ["newsletter", "partners"], "n1")


def test_many_tokens_round_trip() -> None:
    """Every padding length and every last character of base64 (a token may end in 'X')."""
    tokens = Tokens(SECRET)
    for i in range(400):
        email, list_name = f"p{i}@example.org", "l" * (i % 7 + 1)
        token = tokens.manage(email, list_name)
        assert "=" not in token
        read = tokens.read_manage(token)
        assert (read.email, read.list, read.campaign) == (email, list_name, "")


def test_token_errors_say_what_happened() -> None:
    from mailer.tokens import EXPIRED, INVALID

    tokens = Tokens(SECRET)
    wrong_shape = tokens._seal(b"manage", [ADDRESS, "newsletter"])  # a future format, say
    for bad in ("x" * 5000, "AAAA", tokens.manage(ADDRESS, "a")[:-1], wrong_shape):
        with pytest.raises(TokenError) as caught:
            tokens.read_manage(bad)
        assert str(caught.value) == INVALID
    with pytest.raises(TokenError) as caught:
        tokens.read_confirm(tokens.confirm(ADDRESS, ["n"], "x", now=0))
    assert str(caught.value) == EXPIRED
    assert "valid" in INVALID and "expired" in EXPIRED


def test_legacy_confirmation_links_still_confirm_until_they_expire() -> None:
    from itsdangerous import URLSafeTimedSerializer

    from mailer.tokens import EXPIRED, INVALID

    legacy = URLSafeTimedSerializer(SECRET, salt="imag-mailer.confirm")
    token = legacy.dumps([ADDRESS, ["newsletter", "partners"], "n7"])
    assert Tokens(SECRET).read_confirm(token) == (ADDRESS, ["newsletter", "partners"], "n7")
    with pytest.raises(TokenError) as caught:
        Tokens(SECRET).read_confirm(token, max_age_s=-1)
    assert str(caught.value) == EXPIRED
    for bad in (token[:-3] + "abc", URLSafeTimedSerializer(SECRET, salt="other").dumps([1])):
        with pytest.raises(TokenError) as caught:
            Tokens(SECRET).read_confirm(bad)
        assert str(caught.value) == INVALID


def test_links_in_mails_already_sent_keep_working() -> None:
    legacy = URLSafeSerializer(SECRET, salt="imag-mailer.manage").dumps(
        [ADDRESS, "newsletter", "c"])
    read = Tokens(SECRET).read_manage(legacy)
    assert (read.email, read.list, read.campaign) == (ADDRESS, "newsletter", "c")
    from mailer.tokens import INVALID

    with pytest.raises(TokenError) as caught:
        Tokens(SECRET + "x").read_manage(legacy)
    assert str(caught.value) == INVALID


def test_campaign_mail_carries_only_opaque_tokens(project: Project) -> None:
    project.campaign("c.yaml", "template: newsletter\naudience: {lists: [partners]}\n"
                     "content:\n  de: {subject: Hallo, blocks: [{heading: Hallo}]}\n")
    settings = project.settings()
    checked = check_campaign(project.root / "campaigns" / "c.yaml", settings)
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))
    data = composer.compose(Recipient(ADDRESS, "Anna", "de", list="partners"),
                            message_id="<1@example.org>").data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    unsubscribe = msg["List-Unsubscribe"]
    token = unsubscribe.split("/unsubscribe/")[1].split(">")[0]
    assert all(b"anna" not in raw.lower() for raw in decodings(token))
    assert Tokens(settings.secret()).read_manage(token).email == ADDRESS


# --- erasure --------------------------------------------------------------------------------


async def test_forget_erases_the_address_from_relay_replies(project: Project,
                                                           fault_server) -> None:  # noqa: F811
    project.crowd(3, special={1: ADDRESS})
    reply = (550, f"5.1.1 <{ADDRESS}>: Recipient address rejected: User unknown")
    server = await fault_server(Faults(rcpt={ADDRESS: reply}))
    settings, store, result = await send_all(project, server)
    assert result.counts["failed"] == 1
    with store.engine.connect() as conn:
        texts = [r.smtp_text for r in conn.execute(select(deliveries))]
    assert any(ADDRESS in (t or "") for t in texts)  # the relay really quoted it
    with store.engine.begin() as conn:
        subs.forget(conn, email=ADDRESS)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(deliveries))]
    dump = json.dumps(rows, default=str).lower()
    assert "anna" not in dump
    assert any("user unknown" in (r["smtp_text"] or "").lower() for r in rows)


def test_an_old_token_cannot_bring_an_erased_address_back(project: Project) -> None:
    settings = project.settings()
    store = open_store(settings.database_url)
    with store.engine.begin() as conn:
        subs.unsubscribe(conn, settings, email=ADDRESS, list_name="partners",
                         origin=subs.Origin("web"))
        subs.forget(conn, email=ADDRESS)
    # The token in a mail sent before the erasure still carries the address: use it.
    origin = subs.Origin("web", ip="192.0.2.1")
    with store.engine.begin() as conn:
        subs.unsubscribe(conn, settings, email=ADDRESS, list_name="partners", origin=origin)
        subs.unsubscribe(conn, settings, email=ADDRESS.upper(), list_name="newsletter-demo",
                         origin=origin)
        subs.unsubscribe_all(conn, settings, email=ADDRESS, origin=origin)
        subs.set_preferences(conn, settings, email=ADDRESS, language="de",
                             wanted={"newsletter"}, offered=["newsletter", "partners"],
                             origin=origin)
    with store.engine.connect() as conn:
        keys = [r.email_key for r in conn.execute(select(consent_events))]
        keys += [r.email_key for r in conn.execute(select(suppressions))]
        assert subs.export_members(conn) == []
    assert keys and all(k.startswith("sha256:") for k in keys), keys


# --- export ---------------------------------------------------------------------------------


def test_export_neutralises_formulas_in_every_field(project: Project) -> None:
    people = project.root / "people.csv"
    people.write_text("email,name\n=cmd@example.org,=HYPERLINK(\"x\")\n"
                      "-2+3@example.org,Plain\nok@example.org,\n", encoding="utf-8")
    runner = CliRunner()
    args = ["--config", str(project.config)]
    imported = runner.invoke(main, [*args, "subscribers", "import", str(people), "--list",
                                    "newsletter", "--consent-source", "Formular"],
                             env=project.env)
    assert imported.exit_code == 0, imported.output
    out = runner.invoke(main, [*args, "subscribers", "export"], env=project.env).output
    lines = out.splitlines()
    assert "'=cmd@example.org,'=HYPERLINK" in lines[1].replace('"', "")
    assert lines[2].startswith("'-2+3@example.org,Plain,")
    assert lines[3].startswith("ok@example.org,,")  # an empty name stays empty


# --- headers within RFC 5322 ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["A" * 2000, "Liebe " + "Ä" * 700, "x " * 800 + "x",
                                   "https://example.org/" + "a" * 1200])
def test_no_header_line_passes_998_octets(value: str) -> None:
    raw = (encode_header("Subject", value) + b"\r\n"
           + address_header("To", value, "a@example.org") + b"\r\n\r\nbody\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == " ".join(value.split())
    assert msg["To"].addresses[0].addr_spec == "a@example.org"
    assert len(msg["To"].addresses) == 1


async def test_a_long_merge_value_is_delivered(project: Project, fault_server) -> None:  # noqa: F811
    name, club = "Anna" + "x" * 196, "Verein" + "y" * 990
    project.list_file("crowd.csv", f"email,name,language,verein\n{ADDRESS},{name},de,{club}\n")
    project.campaign("crowd.yaml", "template: newsletter\naudience: {lists: [crowd]}\n"
                     "content:\n  de:\n"
                     "    subject: \"Hallo {{ recipient.verein }}{{ recipient.verein }}\"\n"
                     "    blocks: [{heading: Hallo}]\n")
    server = await fault_server()
    _, _, result = await send_all(project, server)
    assert result.counts.get("sent") == 1, result.counts
    (received,) = server.messages
    head = received.content.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert msg["Subject"] == f"Hallo {club}{club}" and msg["To"].addresses[0].display_name == name
