"""Readdir order and offsets of a merged directory listing.

A listing is ordered by a 63-bit hash of each name, and that hash is the readdir offset: offsets
do not shift when entries are added or removed during a listing, so telldir/seekdir stay valid,
and a listing can be resumed from an offset with no per-open state. That last property lets the
daemon answer OPENDIR with ENOSYS (see ops.py): the kernel then sends READDIR with the inode
instead of a handle, and caches the listing in its page cache.
"""
from __future__ import annotations

import bisect
from typing import Iterable, List, Tuple

import xxhash

# 0 = start of the listing; 1 and 2 are the offsets after '.' and '..'
FIRST_NAME_OFFSET = 3


def name_offset(name: bytes) -> int:
    return (xxhash.xxh64_intdigest(name) >> 2) + FIRST_NAME_OFFSET


class Listing:
    """The names of one directory, in offset order."""

    __slots__ = ("entries", "offsets")

    def __init__(self, names: Iterable[bytes]):
        self.entries: List[Tuple[int, bytes]] = sorted((name_offset(n), n) for n in names)
        self.offsets = [o for o, _ in self.entries]

    def after(self, offset: int) -> int:
        """Position of the first entry whose offset is greater than ``offset``."""
        return bisect.bisect_right(self.offsets, offset)
