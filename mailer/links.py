"""Refuse broken links: no mail through a real relay unless its links can be followed.

Every campaign and confirmation mail carries links built from `base_url` (unsubscribe,
preferences, view online, confirm). Sent through a real relay with the shipped
`http://127.0.0.1:8000`, each of them leads nowhere: the one-click unsubscribe that RFC 8058,
the big mailbox providers and the law (UWG, DSG-EKD: withdrawal as easy as consent) ask for
would not work. So every command that hands mail to a relay checks the base URL first, before
anything is written. The embedded capture server (nothing leaves the machine) and dry runs are
exempt; `MAILER_ALLOW_LOCAL_LINKS=1` lets a local URL through, for tests only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .config import Settings
from .errors import ConfigError

ALLOW_ENV = "MAILER_ALLOW_LOCAL_LINKS"

# RFC 6761 / RFC 2606 special-use names, mDNS (.local, RFC 6762), home networks (RFC 8375)
# and names that only ever resolve inside one network.
_LOCAL_SUFFIXES = ("localhost", "test", "invalid", "example", "local", "internal", "lan",
                   "home.arpa", "localdomain", "intranet", "corp", "home")


def link_problem(base_url: str) -> str | None:
    """Why links under `base_url` cannot be followed by a recipient, or None when they can
    (https, and a host name or address that is reachable from the internet)."""
    try:
        parts = urlsplit(base_url)
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        return "not a URL"
    if parts.scheme != "https":
        return "not https"
    if not host:
        return "without a host"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if address.is_loopback or address.is_unspecified:
            return f"on the loopback address {host}"
        if not address.is_global:
            return f"on the private address {host}"
        return None
    labels = host.split(".")
    if len(labels) < 2:
        return f"on the local name {host}"
    if "example" in labels[-2:]:
        return f"on the reserved example domain {host}"
    if any(host == s or host.endswith("." + s) for s in _LOCAL_SUFFIXES):
        return f"on the local name {host}"
    return None


def local_links_allowed(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(ALLOW_ENV, "") == "1"


def refuse_broken_links(settings: Settings, *, env: Mapping[str, str] | None = None) -> None:
    """Raise a ConfigError (one sentence) when mail would go through a real relay with links
    under a base URL that recipients cannot reach. Call it before anything is written."""
    if settings.smtp.embedded or local_links_allowed(env):
        return
    problem = link_problem(settings.base_url)
    if problem is None:
        return
    raise ConfigError(
        f"refusing to send through the relay {settings.smtp.host}: base_url (or "
        f"MAILER_BASE_URL) is {settings.base_url}, {problem}, so the unsubscribe and "
        "confirmation links in every mail would lead nowhere; set it to the public https "
        f"address of `mailer serve` ({ALLOW_ENV}=1 lets it through, for tests only)")
