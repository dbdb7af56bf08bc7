"""Content digests (``sha256:<hex>``, ``sha512:<hex>``): parsing, hashing, verified reading."""
from __future__ import annotations

import hashlib
import re
from typing import Optional, Tuple

from .errors import DigestMismatch, ImageError

_HEX_LEN = {"sha256": 64, "sha512": 128}
_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")


def split(digest: str) -> Tuple[str, str]:
    """``sha256:abc...`` -> ("sha256", "abc..."); ImageError if it is not a valid digest."""
    m = _RE.match(digest) if isinstance(digest, str) else None
    if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise ImageError(f"invalid digest {digest!r} (expected sha256:<64 hex digits>)")
    return m.group(1), m.group(2)


def is_digest(text: str) -> bool:
    try:
        split(text)
        return True
    except ImageError:
        return False


def new_hasher(digest_or_algo: str = "sha256"):
    algo = digest_or_algo.split(":", 1)[0]
    if algo not in _HEX_LEN:
        raise ImageError(f"unsupported digest algorithm {algo!r}")
    return hashlib.new(algo)


def of_bytes(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def short(digest: Optional[str], n: int = 12) -> str:
    if not digest:
        return "-"
    return digest.split(":", 1)[-1][:n]


class DigestingReader:
    """Reads a raw stream, hashing and counting every byte; ``verify()`` at the end."""

    __slots__ = ("raw", "hasher", "count", "expected", "expected_size", "what")

    def __init__(self, raw, expected: Optional[str], expected_size: Optional[int] = None,
                 what: str = "blob"):
        self.raw = raw
        self.expected = expected
        self.expected_size = expected_size if expected_size is not None and expected_size >= 0 \
            else None
        self.hasher = new_hasher(expected or "sha256")
        self.count = 0
        self.what = what

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        if b:
            self.hasher.update(b)
            self.count += len(b)
            if self.expected_size is not None and self.count > self.expected_size:
                raise DigestMismatch(f"{self.what}: more data than the {self.expected_size} "
                                     f"bytes its descriptor promises")
        return b

    def digest(self) -> str:
        return f"{self.hasher.name}:{self.hasher.hexdigest()}"

    def drain(self, bufsize: int = 1 << 20) -> None:
        while self.read(bufsize):
            pass

    def verify(self) -> str:
        """Raise DigestMismatch unless what was read matches; return the digest."""
        got = self.digest()
        if self.expected_size is not None and self.count != self.expected_size:
            raise DigestMismatch(f"{self.what}: {self.count} bytes where its descriptor "
                                 f"promises {self.expected_size}")
        if self.expected is not None and got != self.expected:
            raise DigestMismatch(f"{self.what}: digest mismatch: expected {self.expected}, "
                                 f"got {got}")
        return got
