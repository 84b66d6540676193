"""Keep addresses out of log lines: SMTP reply text and exception messages often quote them.

`redact_addresses` is for any text from outside (a relay's reply, an exception message) that a
log line at info level or above is about to carry.
"""

from __future__ import annotations

import re

# Anything with an @ between two runs of non-separators, with its angle brackets if any:
# "<a@b>", "a@b", "\"x y\"@b" (quoted local part), "user@[192.0.2.1]", UTF-8 addresses.
_ATOMS = r"""[^\s<>"'(),;:@\[\]]+"""
_ADDRESS = re.compile(rf"""<?(?:"[^"\r\n]*"|{_ATOMS})@(?:\[[^\]\s]*\]|{_ATOMS})>?""")
PLACEHOLDER = "<address>"


def redact_addresses(text: object) -> str:
    """`text` (str() of it) with every address-like part replaced by `<address>`."""
    return _ADDRESS.sub(PLACEHOLDER, str(text))
