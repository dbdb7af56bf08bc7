"""Image references as the commands take them: ``SOURCE[:TAG]`` or ``SOURCE@sha256:...``.

SOURCE is
- an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``);
- an OCI archive (a tar of such a layout) or a Docker archive (``manifest.json`` plus layer
  tars), as ``podman save`` / ``docker save`` / ``skopeo copy`` write them;
- or the name of an image recorded in the store (what ``image pull`` records).
skopeo's transport prefixes ``oci:``, ``oci-archive:`` and ``docker-archive:`` may be put in
front to say which kind a path is; ``store:`` forces a store lookup.

Paths may contain colons: the longest prefix of the text that exists is the path, and what
follows its colon is the tag (which may contain colons itself, e.g. ``img.tar:localhost/app:1``).
"""
from __future__ import annotations

import dataclasses
import os
import tarfile
from typing import Callable, Optional

from . import digest as _digest
from .errors import ImageError, NotFound

KINDS = ("oci", "oci-archive", "docker-archive", "store")


@dataclasses.dataclass(frozen=True)
class SourceRef:
    kind: str                  # one of KINDS
    path: str                  # a file system path, or the store name for "store"
    tag: Optional[str] = None
    digest: Optional[str] = None

    def __str__(self) -> str:
        s = self.path if self.kind == "store" else f"{self.kind}:{self.path}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse(text: str, *, exists: Callable[[str], bool] = os.path.lexists) -> SourceRef:
    """Split ``text`` into kind, path, tag and digest (see the module docstring)."""
    if not text:
        raise ImageError("empty image reference")
    kind = ""
    rest = text
    if not exists(text):
        for k in KINDS:
            if text.startswith(k + ":"):
                kind, rest = k, text[len(k) + 1:]
                break
    digest = None
    if "@" in rest:
        left, right = rest.rsplit("@", 1)
        if _digest.is_digest(right) and left:
            rest, digest = left, right
        elif right.startswith(("sha256:", "sha512:")):
            _digest.split(right)            # raises: a malformed digest
    if kind == "store":
        return SourceRef("store", rest, None, digest)
    path, tag = _split_path(rest, exists)
    if path is None:
        if kind:
            raise NotFound(f"{rest}: no such file or directory")
        return SourceRef("store", rest, None, digest)
    if tag == "":
        raise ImageError(f"{text}: empty tag after ':'")
    return SourceRef(kind or detect_kind(path), path, tag, digest)


def _split_path(rest: str, exists) -> tuple:
    if exists(rest):
        return rest, None
    i = len(rest)
    while True:
        i = rest.rfind(":", 0, i)
        if i <= 0:
            return None, None
        if exists(rest[:i]):
            return rest[:i], rest[i + 1:]


def detect_kind(path: str) -> str:
    """"oci" for a layout directory; "oci-archive"/"docker-archive" for a tar file."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "oci-layout")) or \
                os.path.exists(os.path.join(path, "index.json")):
            return "oci"
        raise ImageError(f"{path}: a directory, but not an OCI image layout (no oci-layout "
                         "or index.json)")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise NotFound(f"{path}: {e.strerror}") from None
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":
        raise ImageError(f"{path}: a compressed archive; decompress it first (gzip -d or "
                         "zstd -d)")
    if len(head) < 512 or head[257:262] != b"ustar":
        raise ImageError(f"{path}: neither an OCI layout directory nor a tar archive")
    try:
        with tarfile.open(path, "r:") as t:
            names = {n[2:] if n.startswith("./") else n for n in t.getnames()}
    except (tarfile.TarError, OSError) as e:
        raise ImageError(f"{path}: unreadable archive: {e}") from None
    if "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise ImageError(f"{path}: a tar archive with neither index.json (OCI) nor manifest.json "
                     "(Docker)")
