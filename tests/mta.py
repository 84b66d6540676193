"""Private instances of Debian's dovecot (IMAP) and postfix (an MTA writing real DSNs) for tests.

Both run from a config folder of their own under /tmp, on free loopback ports, and are stopped
at teardown; the system's own instances (if any) are never touched. They need the binaries
(.ci/run installs postfix and dovecot-imapd) and root, since both drop privileges to their own
users. Mail is kept in one maildir tree owned by `nobody`: postfix's virtual(8) delivers the
DSNs for the bounce domain there, and dovecot serves the same folders over IMAP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NOBODY = 65534
USER, PASSWORD = "bounces", "imap-test-password"
BOUNCE_DOMAIN = "imag.example.org"
LOCAL_DOMAIN = "lists.example.org"  # postfix's own domain: unknown users bounce with a DSN


def need(*binaries: str) -> None:
    """Skip (saying why) unless the binaries are there and we are root; CI installs them."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages postfix, dovecot-imapd; "
                    ".ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("the private postfix/dovecot instances must be started as root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}\n{detail}")


@dataclass
class Dovecot:
    root: Path
    port: int

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / USER

    def folder(self, name: str = "INBOX") -> Path:
        return self.maildir if name == "INBOX" else self.maildir / f".{name}"

    def deliver(self, data: bytes, name: str) -> Path:
        """Put a mail into the INBOX as an MDA would (owned by the mail user)."""
        new = self.maildir / "new"
        path = new / f"{time.time_ns()}.{name}.test"
        path.write_bytes(data)
        os.chown(path, NOBODY, NOBODY)
        return path

    def count(self, name: str = "INBOX") -> int:
        folder = self.folder(name)
        return sum(1 for sub in ("new", "cur") if (folder / sub).is_dir()
                   for f in (folder / sub).iterdir() if f.is_file())


def _mail_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="imag-mta-", dir="/tmp"))
    root.chmod(0o755)  # the mail processes (nobody) must reach the maildirs below it
    mail = root / "mail" / USER
    for sub in ("new", "cur", "tmp"):
        (mail / sub).mkdir(parents=True)
    for path in (root / "mail", mail, *(mail / s for s in ("new", "cur", "tmp"))):
        os.chown(path, NOBODY, NOBODY)
    return root


DOVECOT_CONF = """\
base_dir = {root}/dovecot-run
state_dir = {root}/dovecot-state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%n
first_valid_uid = {uid}
first_valid_gid = {uid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {root}/dovecot.passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={root}/mail/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    need("dovecot")
    root = _mail_root()
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(root=root, port=port, uid=NOBODY))
    (root / "dovecot.passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_port(port, log=root / "dovecot.log")
        yield Dovecot(root, port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/postfix-queue
data_directory = {root}/postfix-data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.example.org
mydomain = example.org
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
mydestination = {local_domain}
# Any local user is accepted at RCPT time and bounced by local(8) afterwards, with a DSN.
local_recipient_maps =
alias_maps =
alias_database =
recipient_delimiter = +
virtual_mailbox_domains = {bounce_domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:{user}/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
maillog_file = {root}/postfix.log
maillog_file_prefixes = /tmp
biff = no
smtputf8_enable = no
delay_warning_time = 0
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    root: Path
    port: int
    maildir: Path  # where the DSNs for the bounce domain land

    def log(self) -> str:
        path = self.root / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_postfix(root: Path) -> Postfix:
    need("postfix")
    etc = root / "postfix-etc"
    etc.mkdir()
    port = free_port()
    values = {"root": root, "port": port, "local_domain": LOCAL_DOMAIN,
              "bounce_domain": BOUNCE_DOMAIN, "user": USER, "uid": NOBODY}
    (etc / "main.cf").write_text(MAIN_CF.format(**values))
    (etc / "master.cf").write_text(MASTER_CF.format(**values))
    (root / "postfix-queue").mkdir()
    (root / "postfix-data").mkdir()
    os.chown(root / "postfix-data", *_ids("postfix"))
    # The queue's subfolders, with the owners and modes postfix wants (postfix-files).
    subprocess.run(["postfix", "-c", str(etc), "set-permissions"], capture_output=True,
                   timeout=60)
    started = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True,
                             text=True, timeout=60)
    if started.returncode != 0:
        raise AssertionError(f"postfix did not start: {started.stderr}")
    wait_port(port, log=root / "postfix.log")
    return Postfix(root, port, root / "mail" / USER)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def stop_postfix(pf: Postfix) -> None:
    subprocess.run(["postfix", "-c", str(pf.root / "postfix-etc"), "stop"],
                   capture_output=True, timeout=60)
