"""Composing: DKIM signatures that verify, and headers that RFC 8058 one-click needs signed."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.audience import Recipient
from mailer.checks import Checked, check_campaign
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


# RFC 2047 §2 and §5(3): an encoded word is at most 75 characters, holds no space and no "?",
# and in a phrase (a display name) only letters, digits, ! * + - / _ and =XX.
ENCODED_WORD = re.compile(r"=\?utf-8\?q\?((?:[A-Za-z0-9!*+\-/_]|=[0-9A-F]{2})+)\?=")
TEXTS = [
    "Grüße aus der Nordstadt",
    "Einladung: Straßenfest – Dortmund ist Heymat 🎉 / Sokak şenliği / مهرجان الشارع في دورتموند",
    "Дортмундская интеграционная конференция: приглашение на форум " * 3,
    "ä" * 200,
    "a" * 70 + "ü" + "b" * 70,
    "🎉" * 40,
    "Zoë ? = _ question?mark =?utf-8?q?fake?= under_score",
]


def _q_decode(text: str) -> bytes:
    return re.sub(rb"=([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  text.replace("_", " ").encode("ascii"))


def _encoded_words(header: bytes, name: str) -> list[str]:
    """The encoded words of a header encoded whole, checked against RFC 2047 one by one."""
    text = header.decode("ascii")
    assert text.startswith(f"{name}: ")
    lines = text.split("\r\n")
    assert all(len(line) <= 76 for line in lines), lines  # §2: lines with encoded words
    assert all(line.startswith(" ") for line in lines[1:])  # folded between words
    value = " ".join(line.strip() for line in lines)[len(name) + 2:]
    words = value.split(" ")
    for word in words:
        assert len(word) <= 75, word
        match = ENCODED_WORD.fullmatch(word)
        assert match, f"not one RFC 2047 encoded word: {word!r}"
        _q_decode(match.group(1)).decode("utf-8")  # whole characters: decodes on its own
    return words


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=200).filter(lambda t: not t.isascii()))
def test_encoded_words_are_valid_one_by_one(text: str) -> None:
    _check_encoded(text)


@pytest.mark.parametrize("text", TEXTS)
def test_encoded_words_of_long_and_mixed_texts(text: str) -> None:
    _check_encoded(text)


def test_encoded_words_at_the_boundary_of_one_word() -> None:
    # "Subject: " leaves 75 - 9 - len("=?utf-8?q??=") = 54 characters for the first word
    assert len(_encoded_words(encode_header("Subject", "ä" * 9), "Subject")) == 1
    assert len(_encoded_words(encode_header("Subject", "ä" * 9 + "a"), "Subject")) == 2
    assert len(_encoded_words(encode_header("Subject", "a" * 53 + "ä"), "Subject")) == 2


def _check_encoded(text: str) -> None:
    from mailer.compose import _clean

    words = _encoded_words(encode_header("Subject", text), "Subject")
    assert b"".join(_q_decode(ENCODED_WORD.fullmatch(w).group(1))  # type: ignore[union-attr]
                    for w in words).decode("utf-8") == _clean(text)
    display = _clean(text).strip()
    if not display or display.isascii():  # a name that is ASCII once stripped goes plain
        return
    name = _encoded_words(address_header("To", text, "a@example.org")
                          .rsplit(b" <", 1)[0], "To")
    assert b"".join(_q_decode(ENCODED_WORD.fullmatch(w).group(1))  # type: ignore[union-attr]
                    for w in name).decode("utf-8") == display


GOLDEN_CAMPAIGN = """\
template: newsletter
audience: {lists: [partners]}
content:
  de:
    subject: "Grüße an {{ recipient.name }}"
    preheader: "Neues aus dem Trägerkreis"
    blocks:
      - heading: "Hallo {{ recipient.name }}"
      - text: "Das **FORUM INTEGRATION** lädt ein."
attachments: [files/flyer.pdf]
"""
GOLDEN_HEAD = """\
To: =?utf-8?q?Zo=C3=AB_Y=C4=B1lmaz?= <zoe@example.org>
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_an_Zo=C3=AB_Y=C4=B1lmaz?=
Date: Mon, 07 Dec 2026 12:00:00 +0100
Message-ID: <gold@imag.example.org>
List-Unsubscribe: <http://127.0.0.1:8000/unsubscribe/{token}>,
 <mailto:unsubscribe@imag.example.org?subject=unsubscribe%20{token}>
Content-Language: de
From: =?utf-8?q?IMAG_=E2=80=93_Integration_mit_aufrechtem_Gang?= <newsletter@imag.example.org>
Reply-To: <rgv@imag.example.org>
List-Id: IMAG Newsletter <newsletter.imag.example.org>
List-Unsubscribe-Post: List-Unsubscribe=One-Click
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_mix_{b}"

--=_mix_{b}
Content-Type: multipart/alternative; boundary="=_alt_{b}"

--=_alt_{b}
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Neues aus dem Tr=C3=A4gerkreis

Hallo=20Zo=C3=AB Y=C4=B1lmaz
=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D=3D

Das FORUM INTEGRATION l=C3=A4dt ein.
"""
GOLDEN_TAIL = """\
--=_mix_{b}
Content-Type: application/pdf;
 name="flyer.pdf"
Content-Disposition: attachment;
 filename="flyer.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQgZmx5ZXI=
--=_mix_{b}--
"""


def test_a_composed_message_byte_for_byte(project: Project) -> None:
    """Every header, in order, with its exact encoding; the parts and their boundaries."""
    import re

    files = project.root / "campaigns" / "files"
    files.mkdir()
    (files / "flyer.pdf").write_bytes(b"%PDF-1.4 flyer")
    project.campaign("gold.yaml", GOLDEN_CAMPAIGN)
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "gold.yaml", settings, with_audience=False)
    tokens = Tokens(settings.secret())
    composer = Composer(checked.rendition, settings, tokens=tokens, clock=lambda: 1796641200.0)
    zoe = Recipient("zoe@example.org", "Zoë Yılmaz", "de", list="partners")
    composed = composer.compose(zoe, message_id="<gold@imag.example.org>")
    text = composed.data.decode("ascii")
    assert "\n" not in text.replace("\r\n", "")  # CRLF only
    text = text.replace("\r\n", "\n")
    boundary = re.search(r'boundary="=_mix_([0-9a-f]{16})"', text)
    assert boundary is not None
    b = boundary.group(1)
    assert f'boundary="=_alt_{b}"' in text  # one token per composer, both boundaries
    token = tokens.manage("zoe@example.org", "partners", "gold")
    assert text.startswith(GOLDEN_HEAD.format(token=token, b=b))
    assert text.endswith(GOLDEN_TAIL.format(b=b))
    assert text.count(f"--=_alt_{b}\n") == 2 and text.count(f"--=_alt_{b}--\n") == 1
    html_head = (f"--=_alt_{b}\nContent-Type: text/html; charset=utf-8\n"
                 "Content-Transfer-Encoding: quoted-printable\n\n<!doctype html>")
    assert html_head in text
    plain = email.message_from_string(text, policy=email.policy.default).get_body(("plain",))
    assert f"Abmelden: http://127.0.0.1:8000/unsubscribe/{token}\n" in plain.get_content()
    assert composed.subject == "Grüße an Zoë Yılmaz" and composed.lang == "de"
    # A second recipient: same boundaries (encoded once), another token and name.
    other = composer.compose(Recipient("a@example.org", "Anna", "de", list="partners"),
                             message_id="<other@imag.example.org>").data.decode("ascii")
    assert f"=_mix_{b}" in other and token not in other and "To: Anna <a@example.org>" in other


@pytest.mark.parametrize("subject", ["Grüße an {{ recipient.name }}", "Grüße aus Dortmund"])
def test_subject_and_date_are_each_messages_own(project: Project, subject: str) -> None:
    """The Subject line of a subject without merge fields and the Date line of a second are
    made once: a personal subject and the next second's date must still come out new."""
    project.campaign("s.yaml", GOLDEN_CAMPAIGN.replace("Grüße an {{ recipient.name }}", subject)
                     .replace("attachments: [files/flyer.pdf]\n", ""))
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "s.yaml", settings, with_audience=False)
    ticks = iter([1796641200.2, 1796641200.9, 1796641201.1])
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()),
                        clock=lambda: next(ticks), test=True)
    people = [Recipient(f"{n.lower()}@example.org", n, "de", list="partners")
              for n in ("Zoë", "Anna", "Ömer")]
    heads = [email.message_from_bytes(composer.compose(r, message_id="<d@example.org>").data,
                                      policy=email.policy.default) for r in people]
    assert [h["Date"] for h in heads] == ["Mon, 07 Dec 2026 12:00:00 +0100"] * 2 + [
        "Mon, 07 Dec 2026 12:00:01 +0100"]
    expected = [f"[TEST] {subject.replace('{{ recipient.name }}', r.name)}" for r in people]
    assert [h["Subject"] for h in heads] == expected
    # Only a subject without merge fields is kept: personal ones would pile up.
    assert list(composer._subject_lines.values()) == (
        [] if "{" in subject else [encode_header("Subject", expected[0])])


def test_arabic_parts_go_base64_and_test_sends_say_so(project: Project) -> None:
    project.campaign("ar.yaml", "template: newsletter\naudience: {lists: [partners]}\n"
                     "content:\n  ar:\n    subject: \"مرحبا {{ recipient.name }}\"\n"
                     "    blocks: [{heading: \"أهلا وسهلا بكم في نشرة الأخبار\"}, "
                     "{text: \"" + "يدعوكم منتدى الاندماج إلى لقاء في دورتموند. " * 150
                     + "\"}]\n")  # enough Arabic that base64 is the smaller encoding
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "ar.yaml", settings, with_audience=False)
    composer = Composer(checked.rendition, settings, tokens=Tokens(settings.secret()), test=True)
    data = composer.compose(Recipient("r@example.org", "Rania", "ar", list="partners"),
                            message_id="<ar@imag.example.org>").data
    head, _, body = data.partition(b"\r\n\r\n")
    assert body.count(b"Content-Transfer-Encoding: base64") == 2
    assert b"quoted-printable" not in body
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "[TEST] مرحبا Rania"
    plain = msg.get_body(("plain",))
    assert plain is not None and "أهلا وسهلا بكم" in plain.get_content()
    assert all(len(line) <= 78 for line in body.split(b"\r\n"))


def shipped_newsletter(project: Project) -> tuple[Checked, Composer]:
    """The shipped December newsletter (de, tr, ar) and a composer for it."""
    settings = project.settings()
    shipped = Path(__file__).resolve().parent.parent / "campaigns"
    checked = check_campaign(shipped / "wir-alle-sind-dortmund-2026-12.yaml", settings,
                             with_audience=False)
    return checked, Composer(checked.rendition, settings, tokens=Tokens(settings.secret()))


def test_each_part_takes_the_smaller_transfer_encoding(project: Project) -> None:
    """The shipped Arabic newsletter: its HTML is mostly ASCII markup, its text part is not."""
    from mailer.compose import b64, qp

    checked, composer = shipped_newsletter(project)
    for lang in checked.campaign.languages:
        data = composer.compose(Recipient("r@example.org", "Rania", lang, list="partners"),
                                message_id="<enc@imag.example.org>").data
        msg = email.message_from_bytes(data, policy=email.policy.default)
        seen = {}
        for part in msg.walk():
            if part.get_content_maintype() != "text":
                continue
            decoded = part.get_payload(decode=True)
            sizes = {"quoted-printable": len(qp(decoded.decode("utf-8"))),
                     "base64": len(b64(decoded))}
            cte = part["Content-Transfer-Encoding"]
            assert sizes[cte] <= min(sizes.values()) * 1.02, (lang, part.get_content_type(),
                                                              sizes)
            seen[part.get_content_subtype()] = cte
        parts = (seen["plain"], seen["html"])
        if lang == "ar":
            assert parts == ("base64", "quoted-printable")
        else:
            assert parts == ("quoted-printable", "quoted-printable")


# --- pinned by mutation testing -------------------------------------------------------------


def test_a_message_without_attachments_is_one_alternative(project: Project) -> None:
    project.campaign("plain.yaml", CAMPAIGN)
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "plain.yaml", settings,
                             with_audience=False)
    data = Composer(checked.rendition, settings, tokens=Tokens(settings.secret())).compose(
        Recipient("a@example.org", "Anna", "de", list="partners"), message_id="<p@b>").data
    head, _, body = data.partition(b"\r\n\r\n")
    boundary = re.search(rb'Content-Type: multipart/alternative; boundary="(=_alt_[0-9a-f]+)"',
                         head)
    assert boundary is not None and b"=_mix_" not in data
    assert body.startswith(b"--" + boundary.group(1) + b"\r\n")
    assert data.endswith(b"--" + boundary.group(1) + b"--\r\n")


def test_links_carry_the_language_of_the_mail(project: Project) -> None:
    project.campaign("two.yaml", CAMPAIGN + "  tr:\n    subject: Merhaba\n    blocks:\n"
                     "      - text: \"[Çevrimiçi]({{ links.view_online }}) ve "
                     "[ayarlar]({{ links.preferences }})\"\n")
    settings = project.settings()
    checked = check_campaign(settings.campaigns_dir / "two.yaml", settings, with_audience=False)
    tokens = Tokens(settings.secret())
    composer = Composer(checked.rendition, settings, tokens=tokens)
    ayse = Recipient("ayse@example.org", "Ayşe", "tr", list="partners")
    links = composer.links(ayse)
    token = tokens.manage("ayse@example.org", "partners", "two")
    base = settings.base_url
    assert (links.unsubscribe, links.preferences, links.view_online) == (
        f"{base}/unsubscribe/{token}", f"{base}/preferences/{token}", f"{base}/archive/two")
    assert composer.links(ayse, "tr").view_online == f"{base}/archive/two?lang=tr"
    msg = email.message_from_bytes(composer.compose(ayse, message_id="<l@b>").data,
                                   policy=email.policy.default)
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"{base}/archive/two?lang=tr" in text and f"{base}/preferences/{token}" in text


def test_control_characters_become_single_spaces() -> None:
    from mailer.compose import _clean

    assert _clean("a\nb\r\nc\x7fd\te") == "a b  c d e"
    assert _clean("ohne Steuerzeichen: !~") == "ohne Steuerzeichen: !~"


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                              min_size=1, max_size=30), min_size=1, max_size=25))
def test_long_ascii_headers_fold_between_words_and_unfold_to_the_value(words: list[str]) -> None:
    value = " ".join(words)
    header = encode_header("Subject", value).decode("ascii")
    if "=?" in value:  # would be decoded by a reader: must go as encoded words instead
        assert header.startswith("Subject: =?utf-8?q?")
        return
    lines = header.split("\r\n")
    assert all(len(line) <= 78 for line in lines), lines  # every word is short enough to fit
    assert all(line.startswith(" ") for line in lines[1:])
    assert "".join(lines) == f"Subject: {value}"  # unfolding removes only the CRLFs
    assert len(lines) == 1 or len(lines[0]) + 1 + len(lines[1].split(" ")[1]) > 78


def test_an_ascii_value_that_looks_encoded_is_encoded() -> None:
    value = "Rabatt =?utf-8?q?Gratis?= nur heute"
    header = encode_header("Subject", value)
    assert header.startswith(b"Subject: =?utf-8?q?")
    parsed = email.message_from_bytes(header + b"\r\n\r\n", policy=email.policy.default)
    assert parsed["Subject"] == value


def test_quoted_printable_has_crlf_line_ends_whatever_came_in() -> None:
    import binascii

    from mailer.compose import qp

    encoded = qp("eins\r\nzwei\rdrei\nvier")
    assert b"\n" not in encoded.replace(b"\r\n", b"") and b"=0D" not in encoded
    assert binascii.a2b_qp(encoded) == b"eins\r\nzwei\r\ndrei\r\nvier"


# Pieces as a template yields them: long ones (soft breaks), trailing blanks, line ends at either
# side, "=", dots, umlauts, Arabic, and anything else.
_pieces = st.lists(st.sampled_from([
    "", " ", "\n", "Hallo Ayşe,", "a" * 75, "b" * 76, "c " * 60, "Preis = 5 €  ", ".\n", "\t",
    "<td style=\"color:#333\">Gemeinsam gegen Rassismus</td>\n" * 3, "From here", "x=\ty ",
    "\nneue Zeile", "مرحبا", "Ende \n\n", ".mj-column { width:100% }\n", ".", "..", ". a",
    "https://imag.example.org/" + "x" * 49 + ".html", "a" * 74 + ".b" * 40,
]) | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200), max_size=12)


def assert_clean_qp(encoded: bytes) -> None:
    """RFC 2045 §6.7: printable ASCII, lines of at most 76, no blank before a line end; and
    no line that starts with a dot, which SMTP would have to double (Outgoing.composed)."""
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76 and not line.endswith((b" ", b"\t")), line
        assert not line.startswith(b"."), line
        assert all(32 <= b < 127 or b == 9 for b in line), line
    assert b"\r" not in encoded.replace(b"\r\n", b"") and b"\n" not in encoded.replace(b"\r\n", b"")


@settings(max_examples=400, deadline=None)
@given(pieces=_pieces, ends=st.sampled_from(["\n", "\r\n", "\r"]))
def test_pieces_encoded_apart_decode_like_quoted_printable_of_the_whole(
        pieces: list[str], ends: str) -> None:
    import binascii

    from mailer.compose import QPPieces, qp

    pieces = [p.replace("\n", ends) for p in pieces]
    first, again = QPPieces()(pieces), QPPieces(pieces)(pieces)  # encoded now, from the memo
    assert first == again
    assert_clean_qp(first)
    assert binascii.a2b_qp(first) == binascii.a2b_qp(qp("".join(pieces)))


@settings(max_examples=1000, deadline=None)
@given(piece=st.text(alphabet=st.sampled_from([*map(chr, range(32, 127)), "\t", "\n", "ä"]),
                     max_size=80)
       | st.text(alphabet=st.sampled_from([c for c in map(chr, range(32, 127)) if c != "="]),
                 min_size=70, max_size=400)
       | st.sampled_from([".", "..", "a" * 75, "a" * 76, "a" * 151, "a" * 152, "a ", " a", "=",
                          "a=b", "a.", ".a", "a" * 75 + ".", "a" * 73 + " ", "ä" * 12 + "a" * 4]))
def test_a_piece_is_encoded_as_the_encoder_writes_it_whole(piece: str) -> None:
    """The short cuts (a piece without escapes, a short line) give b2a_qp's bytes."""
    import binascii

    from mailer.compose import _encode_piece, _fit_lines

    whole = _fit_lines(binascii.b2a_qp(piece.encode("utf-8"), istext=True)
                       .replace(b"\n", b"\r\n"), last=75)
    lines = whole.split(b"\r\n")
    expected = (whole, len(lines[0]), len(lines[-1]) if len(lines) > 1 else -1)
    assert _encode_piece(piece) == expected


@pytest.mark.parametrize("text", [
    "a" * 75 + " \nb", "a" * 74 + "\t\n", "a" * 73 + "ä \nb", "b" * 76, "=" * 30 + " \n"])
def test_quoted_printable_lines_stay_within_76_even_when_they_end_in_a_blank(text: str) -> None:
    """binascii's b2a_qp writes such lines with 77 or 78 characters (its =20 is not counted)."""
    import binascii

    from mailer.compose import qp

    encoded = qp(text)
    assert_clean_qp(encoded)
    assert binascii.a2b_qp(encoded) == text.replace("\n", "\r\n").encode()


def test_pieces_share_a_line_while_it_has_room_then_a_soft_break_joins_them() -> None:
    from mailer.compose import QPPieces

    assert QPPieces()(["Hallo ", "Ayşe", ",\nschön", "\n"]) == (
        b"Hallo=20Ay=C5=9Fe,\r\nsch=C3=B6n\r\n")
    assert QPPieces()(["a" * 70, "b" * 5, "c"]) == b"a" * 70 + b"bbbbb=\r\nc"
    assert QPPieces()(["a" * 70, "b" * 6]) == b"a" * 70 + b"=\r\n" + b"b" * 6
    long = QPPieces()(["x" * 10, "y" * 100 + "\nz"])  # a piece's own soft break, then its end
    assert long == b"x" * 10 + b"=\r\n" + b"y" * 75 + b"=\r\n" + b"y" * 25 + b"\r\nz"
    # After a soft break the line holds the next piece and then 75 minus its length.
    assert QPPieces()(["x" * 70, "y" * 10, "z" * 65]) == (
        b"x" * 70 + b"=\r\n" + b"y" * 10 + b"z" * 65)
    # An escaped piece counts with its escapes: "ä" is 6 characters of the line.
    assert QPPieces()(["ä", "b" * 69]) == b"=C3=A4" + b"b" * 69
    assert QPPieces()(["ä", "b" * 70]) == b"=C3=A4=\r\n" + b"b" * 70
    # After a line end the column starts again from the last line of the piece.
    assert QPPieces()(["abc\n", "d" * 74]) == b"abc\r\n" + b"d" * 74
    assert QPPieces()(["ab\ncd\nef", "e" * 73]) == b"ab\r\ncd\r\nef" + b"e" * 73
    # A piece's lines: b2a_qp's 76 in the middle stay, its last is cut to 75.
    assert QPPieces()(["y" * 100 + "\n" + "z" * 76]).split(b"\r\n") == [
        b"y" * 75 + b"=", b"y" * 25, b"z" * 74 + b"=", b"zz"]


def test_no_line_of_the_joined_text_starts_with_a_dot() -> None:
    """A dot that begins a piece or a line of it is written =2E (it decodes the same), so that
    SMTP has none to double, wherever the piece stands: at the start of the text, after a
    line end, after a soft break. A dot inside a line stays a dot."""
    from mailer.compose import QPPieces

    memo = QPPieces([".a", "x" * 70])
    assert memo([".a", "b"]) == QPPieces()([".a", "b"]) == b"=2Eab"
    assert memo(["x\n", ".a"]) == b"x\r\n=2Ea"
    assert memo(["x" * 70, ".abcdef"]) == b"x" * 70 + b"=\r\n=2Eabcdef"
    assert memo(["x", ".a"]) == b"x=2Ea"
    assert QPPieces()(["x", "a.b"]) == b"xa.b"
    assert QPPieces()(["a\n.b"]) == b"a\r\n=2Eb"
    assert QPPieces()(["y" * 75 + ".z"]) == b"y" * 75 + b"=\r\n=2Ez"  # a link's soft break
    # =2E makes a full line longer: it is cut again
    assert QPPieces()(["." + "q" * 74]) == b"=2E" + b"q" * 71 + b"=\r\nqqq"


def test_a_base64_text_part_is_encoded_with_crlf_line_ends_whatever_came_in() -> None:
    from mailer.compose import QPPieces, encoded_part

    head, _, body = encoded_part(["a\r\nb", "\rc\n", "d\ne"], False, QPPieces()).partition(
        b"\r\n\r\n")
    assert head == b"Content-Transfer-Encoding: base64"
    assert base64.b64decode(body) == b"a\r\nb\r\nc\r\nd\r\ne"


def test_lines_are_cut_before_the_overflow_and_never_inside_an_escape() -> None:
    from mailer.compose import _fit_lines, qp

    assert qp("b" * 76) == b"b" * 76  # a full line is not cut
    assert qp("a" * 75 + " ") == b"a" * 75 + b"=\r\n=20"  # b2a_qp wrote 78 characters
    assert _fit_lines(b"a" * 72 + b"=3D" + b"b" * 5) == b"a" * 72 + b"=3D=\r\n" + b"b" * 5
    assert _fit_lines(b"a" * 73 + b"=3D" + b"b" * 5) == b"a" * 73 + b"=\r\n=3D" + b"b" * 5
    assert _fit_lines(b"a" * 74 + b"=3D" + b"b" * 4) == b"a" * 74 + b"=\r\n=3D" + b"b" * 4


def test_the_static_pieces_come_from_the_memo_and_merge_values_never_enter_it() -> None:
    from mailer.compose import QPPieces

    memo = QPPieces(["Hallo ", ",\nschön"])
    assert set(memo._memo) == {"Hallo ", ",\nschön"}
    memo._memo["Hallo "] = (b"HALLO=20", 8, -1)  # a marked entry: is it read?
    assert memo(["Hallo ", "Ayşe", ",\nschön"]) == b"HALLO=20Ay=C5=9Fe,\r\nsch=C3=B6n"
    assert set(memo._memo) == {"Hallo ", ",\nschön"}  # the name was not kept


def test_the_composer_splices_the_templates_pieces_from_its_memo(project: Project) -> None:
    checked, composer = shipped_newsletter(project)
    people = [Recipient(f"p{i}@example.org", f"Person{i}", "de", list="partners")
              for i in range(3)]
    messages = [composer.compose(r, message_id="<m@imag.example.org>").data for r in people]
    memo = composer._qp._memo
    assert sum(len(piece) for piece in memo) > 20_000  # the templates' own text, all languages
    assert not any("Person" in piece or "@example.org" in piece for piece in memo)
    for person, data in zip(people, messages, strict=True):
        msg = email.message_from_bytes(data, policy=email.policy.default)
        text = msg.get_body(("plain",)).get_content()
        assert person.name in text and all(p.name not in text for p in people if p != person)


def test_every_part_decodes_to_exactly_the_personalised_text(project: Project) -> None:
    """Spliced quoted-printable (de, tr) and base64 (the Arabic text part) alike."""
    from mailer.render import personalise

    checked, composer = shipped_newsletter(project)
    for lang in checked.campaign.languages:
        person = Recipient(f"{lang}@example.org", "Zoë Yılmaz", lang, list="partners")
        data = composer.compose(person, message_id="<p@imag.example.org>").data
        msg = email.message_from_bytes(data, policy=email.policy.default)
        lr = checked.rendition.for_language(lang)
        want = personalise(lr, person, composer.links(person, lr.lang))
        for kind, text in (("plain", want.text), ("html", want.html)):
            part = msg.get_body((kind,))
            assert part.get_payload(decode=True).decode() == text.replace("\n", "\r\n"), kind


def test_non_ascii_attachment_names_go_as_rfc_2231() -> None:
    from mailer.compose import _file_param

    assert _file_param("filename", "flyer.pdf") == 'filename="flyer.pdf"'
    assert _file_param("filename", 'Einladung "Fest" ü.pdf') == (
        "filename*=utf-8''Einladung%20%22Fest%22%20%C3%BC.pdf")
    assert _file_param("name", 'a"b.pdf') == "name*=utf-8''a%22b.pdf"


def test_message_ids_are_random_and_of_our_domain() -> None:
    from mailer.compose import message_id

    ids = {message_id(domain="imag.example.org") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"<[0-9a-f]{24}@imag\.example\.org>", i) for i in ids)


def test_ascii_folding_at_the_exact_limit_and_with_double_spaces() -> None:
    exact = "a" * 60 + " " + "b" * 8  # "Subject: " + this is exactly 78 characters
    assert encode_header("Subject", exact) == f"Subject: {exact}".encode()
    spaced = "Einladung  zum  Fest " * 6  # long, with double spaces: folded, none lost
    header = encode_header("Subject", spaced).decode("ascii")
    assert "\r\n" in header and header.replace("\r\n", "") == f"Subject: {spaced}"


def test_an_ascii_word_too_long_to_fold_is_encoded() -> None:
    fits = "x" * 69  # "Subject: " + 69 = 78: plain
    assert encode_header("Subject", fits) == f"Subject: {fits}".encode()
    for long in ("x" * 70, "y" * 120):  # no line could hold it: encoded words, folded
        header = encode_header("Subject", long).decode("ascii")
        assert header.startswith("Subject: =?utf-8?q?")
        assert all(len(line) <= 76 for line in header.split("\r\n"))


# --- the transport trusts the composer's line ends and dots (Outgoing.composed) -------------

HOSTILE_CAMPAIGN = """\
template: newsletter
audience: {lists: [partners]}
content:
  de:
    subject: "Hallo {{ recipient.name }} . RCPT TO:<x@example.org>"
    preheader: "Vorab . mit {{ recipient.organisation }}"
    blocks:
      - heading: ". Hallo {{ recipient.name }}"
      - text: ".Zeile mit Punkt\\r\\n.\\r\\n{{ recipient.organisation }}\\n.\\nEnde\\rCR"
  ar:
    subject: "مرحبا {{ recipient.name }}"
    blocks:
      - text: "أهلا وسهلا {{ recipient.organisation }}\\r\\n.\\r\\nنهاية\\r"
"""
HOSTILE = (st.lists(st.sampled_from(
    ["\r", "\n", "\r\n", ".", "\r\n.\r\n", "\n.\n", "\x00", "\x0b", "\u2028", "\u0085", " ",
     "a", "ü", "ش", "=", "<", ">", '"', "\t", "😀", "x" * 80, "x." * 40]), max_size=30)
           .map("".join))


def test_a_composed_message_has_crlf_line_ends_no_other_cr_or_lf_and_no_leading_dot(
        project: Project, tmp_path: Path) -> None:
    """Whatever the recipient's data and the campaign's text hold (DKIM-signed: the signature
    is part of the message), so the transport may skip its check (Outgoing.composed)."""
    from mailer.transport import dot_stuffed

    dkim_key(project, tmp_path)
    project.campaign("hostile.yaml", HOSTILE_CAMPAIGN)
    settings_ = project.settings()
    checked = check_campaign(settings_.campaigns_dir / "hostile.yaml", settings_,
                             with_audience=False)
    composer = Composer(checked.rendition, settings_, tokens=Tokens(settings_.secret()))

    @settings(max_examples=150, deadline=None)
    @given(name=HOSTILE, note=HOSTILE, lang=st.sampled_from(["de", "ar"]))
    def check(name: str, note: str, lang: str) -> None:
        person = Recipient("zoe@example.org", name, lang, fields={"organisation": note},
                           list="partners")
        data = composer.compose(person, message_id="<h@imag.example.org>").data
        assert data.startswith(b"DKIM-Signature:")
        assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
        assert not data.startswith(b".") and b"\n." not in data
        assert dot_stuffed(data, composed=True) == dot_stuffed(data)

    check()
