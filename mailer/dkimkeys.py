"""DKIM keys: make one (RSA 2048, a 0600 file, never overwritten by accident) and the DNS TXT
record that publishes its public half (RFC 6376 §3.6.1)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import ConfigError, UserError

KEY_BITS = 2048
# RFC 6376 §3.1: a selector is one or more DNS labels; a domain is a host name.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
SELECTOR = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")


@dataclass(frozen=True)
class DkimRecord:
    """The TXT record `<selector>._domainkey.<domain>` for one public key."""

    selector: str
    domain: str
    public_key: str  # base64 of the DER SubjectPublicKeyInfo, as in p=

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def value(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_key}"

    def zone_line(self, ttl: int = 3600) -> str:
        """The record in zone-file syntax: the value split into strings of at most 255
        characters (RFC 1035 §3.3.14 character-strings; a 2048-bit key needs two)."""
        return zone_line(self.name, self.value, ttl=ttl)


def zone_line(name: str, value: str, *, ttl: int = 3600) -> str:
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    strings = " ".join(f'"{c}"' for c in chunks)
    if len(chunks) > 1:
        strings = f"( {strings} )"
    return f"{name}. {ttl} IN TXT {strings}"


def check_names(selector: str, domain: str) -> tuple[str, str]:
    selector, domain = selector.strip().lower(), domain.strip().lower().rstrip(".")
    if not SELECTOR.match(selector):
        raise UserError(f"--selector '{selector}' is not a DNS label: use letters, digits and "
                        "hyphens, e.g. imag2026")
    if not DOMAIN.match(domain):
        raise UserError(f"--domain '{domain}' is not a domain name: use the domain of "
                        "sender.address, e.g. imag-dortmund.de")
    return selector, domain


def public_key_b64(key: rsa.RSAPublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def generate(out: Path, *, selector: str, domain: str, force: bool = False,
             bits: int = KEY_BITS) -> DkimRecord:
    """Write a new private key to `out` (PEM, PKCS#1, mode 0600) and return its record.

    The key is written to a private temporary file beside `out` and linked into place, so
    nobody ever reads half a key, and an existing file is only replaced with `force`."""
    selector, domain = check_names(selector, domain)
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to replace it (mails signed with the old "
                        "key stop verifying once its DNS record is replaced)")
    if out.is_dir():
        raise UserError(f"{out} is a directory: name the key file, e.g. {out}/{selector}.pem")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} does not exist: create it (mode 700) first")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".dkim.")  # mode 0600
    except OSError as exc:
        raise UserError(f"cannot write to {out.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if another process made the file meanwhile
            except FileExistsError:
                raise UserError(f"{out} exists: pass --force to replace it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return DkimRecord(selector, domain, public_key_b64(key.public_key()))


def read_key_file(path: Path) -> bytes:
    """The bytes of a private key file, refused (one sentence) when others can read it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the DKIM key ({exc.strerror})", path=path) from None
    if mode & 0o077:
        raise ConfigError(f"the DKIM private key can be read by other users: run 'chmod 600 "
                          f"{path}'", path=path)
    return data


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA key in `path`, refused (one sentence) when others can read it or it is not one."""
    data = read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError("is not an unencrypted PEM private key: make one with "
                          "'mailer dkim keygen'", path=path) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("is not an RSA key (the one kind every verifier knows): make one "
                          "with 'mailer dkim keygen'", path=path)
    return key


def record_for(path: Path, *, selector: str, domain: str) -> DkimRecord:
    key = load_private_key(path)
    return DkimRecord(selector, domain.lower().rstrip("."), public_key_b64(key.public_key()))


def parse_tags(txt: str) -> dict[str, str]:
    """`v=DKIM1; k=rsa; p=…` as a mapping (RFC 6376 §3.2: whitespace inside values ignored)."""
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip()] = re.sub(r"\s+", "", value)
    return tags
