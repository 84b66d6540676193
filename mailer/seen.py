"""Which email keys a stream of recipients has passed, in about 25 bytes per row.

A set of the keys themselves costs ~150 bytes per address (the string, its slot, the set's spare
room), a set of 64-bit ints still ~70: at a million recipients either takes most of the 150 MB
that `mailer validate` and `mailer send` may use in all. So only an 8-byte blake2b digest of each
key is kept in flat arrays, with an 8-byte number saying where its row is (which list, where in
it). Two different addresses can share a digest (about 3e-8 likely in a million), so a match is
only a suspect: the caller reads the earlier row back from that place and compares the keys
themselves (audience.py), and a distinct address is never dropped for its digest.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

EMPTY = 0  # a free slot; slots hold the row's index + 1


def digest(key: str) -> int:
    """64 bits of blake2b: keys cannot be steered into one slot chain (unlike hash(str) with
    PYTHONHASHSEED fixed, or a plain CRC)."""
    raw = blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(raw, "little")


class Seen:
    """A multimap digest → places, open addressing with linear probing over an array of row
    indexes, kept at most half full."""

    def __init__(self) -> None:
        self._digests = array("Q")
        self._places = array("Q")
        self._slots = array("I", [EMPTY]) * 1024
        self._mask = len(self._slots) - 1

    def __len__(self) -> int:
        return len(self._digests)

    def add(self, key_digest: int, place: int) -> list[int]:
        """Record a row; return the places of the earlier rows with the same digest (almost
        always none: then the key is new for certain)."""
        earlier, free = self._probe(key_digest)
        self._digests.append(key_digest)
        self._places.append(place)
        self._slots[free] = len(self._digests)
        if 2 * len(self._digests) > len(self._slots):
            self._grow()
        return earlier

    def places(self, key_digest: int) -> list[int]:
        """The places recorded with this digest (none: no row had that key, for certain)."""
        return self._probe(key_digest)[0]

    def _probe(self, key_digest: int) -> tuple[list[int], int]:
        """The places under this digest, and the free slot where the chain ends."""
        slots, digests, mask = self._slots, self._digests, self._mask
        i = key_digest & mask
        found = []
        while (j := slots[i]) != EMPTY:
            if digests[j - 1] == key_digest:
                found.append(self._places[j - 1])
            i = (i + 1) & mask
        return found, i

    def _grow(self) -> None:
        slots = array("I", [EMPTY]) * (2 * len(self._slots))
        mask = len(slots) - 1
        for j, d in enumerate(self._digests, start=1):
            i = d & mask
            while slots[i] != EMPTY:
                i = (i + 1) & mask
            slots[i] = j
        self._slots, self._mask = slots, mask
