"""Where images come from: the common part of every source (tag and digest selection), and
``open_source``, which turns a parsed reference into the right kind of source.

A source lists top-level descriptors (``entries()``: an OCI layout's or archive's index, a
registry's tag...) and opens blobs (``open_blob(desc)``: a raw, unverified stream).
``resolve()`` picks an entry by tag or digest and hands it to ``manifest.resolve``, which
verifies every document it reads. Layer blobs are verified by whoever streams them
(``store.Store.unpack_layer``, ``commit``), while they stream.

A registry client is one more subclass: ``entries()`` asks for the tag, ``open_blob`` streams
``/v2/<name>/blobs/<digest>``.
"""
from __future__ import annotations

from typing import BinaryIO, List, Optional

from . import manifest as _manifest
from . import mediatypes as mt
from .errors import NotFound
from .manifest import Descriptor, Image, Platform
from .reference import SourceRef


class Source:
    kind = "?"

    def __init__(self, description: str):
        self.description = description

    # -- what a subclass provides
    def entries(self) -> List[Descriptor]:
        raise NotImplementedError

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        raise NotImplementedError

    def has_blob(self, desc: Descriptor) -> bool:
        try:
            self.open_blob(desc).close()
            return True
        except NotFound:
            return False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- shared
    def read_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        with self.open_blob(desc) as f:
            return f.read(desc.size + 1)

    def tags(self) -> List[str]:
        out = []
        for e in self.entries():
            name = e.annotation(mt.ANNOTATION_REF_NAME) or e.annotation(
                mt.ANNOTATION_CONTAINERD_NAME)
            if name:
                out.append(name)
        return out

    def select(self, tag: Optional[str], digest: Optional[str]) -> Descriptor:
        entries = self.entries()
        if digest:
            for e in entries:
                if e.digest == digest:
                    return e
            # Not listed at the top: any manifest blob of that digest will do.
            probe = Descriptor(mt.OCI_MANIFEST, digest, 0)
            try:
                with self.open_blob(probe) as f:
                    data = f.read(_manifest.MAX_JSON + 1)
            except NotFound:
                raise NotFound(f"{self.description}: no manifest {digest}") from None
            doc = _manifest.loads(data, f"{self.description}: {digest}")
            return Descriptor(_manifest.media_type_of(doc, None), digest, len(data))
        if tag:
            return select_by_tag(self.description, entries, tag)
        if len(entries) == 1:
            return entries[0]
        if not entries:
            raise NotFound(f"{self.description}: the index lists no image")
        tagged = [e for e in entries if _names(e)]
        latest = [e for e in tagged if any(n == "latest" or n.endswith(":latest")
                                           for n in _names(e))]
        if len(latest) == 1:
            return latest[0]
        raise NotFound(f"{self.description}: holds {len(entries)} images; name one with "
                       f":TAG or @DIGEST (tags: {', '.join(self.tags()) or 'none'})")

    def resolve(self, tag: Optional[str] = None, digest: Optional[str] = None,
                platform: Optional[Platform] = None) -> Image:
        top = self.select(tag, digest)
        name = self.description + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        return _manifest.resolve(name, top, self.read_blob, platform)


def _names(e: Descriptor) -> List[str]:
    return [n for n in (e.annotation(mt.ANNOTATION_REF_NAME),
                        e.annotation(mt.ANNOTATION_CONTAINERD_NAME)) if n]


def _tag_part(name: str) -> Optional[str]:
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def select_by_tag(description: str, entries: List[Descriptor], tag: str) -> Descriptor:
    """Exact name first (``latest``, ``localhost/app:1``), then a full name whose tag is
    ``tag`` (``localhost/app:1`` for ``1``), then a full name without its tag."""
    exact = [e for e in entries if tag in _names(e)]
    if not exact:
        exact = [e for e in entries if any(_tag_part(n) == tag for n in _names(e))]
    if not exact:
        exact = [e for e in entries if any(n.rsplit(":", 1)[0] == tag and _tag_part(n)
                                           for n in _names(e))]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1 and len({e.digest for e in exact}) == 1:
        return exact[0]
    if exact:
        raise NotFound(f"{description}: tag {tag!r} names {len(exact)} different images")
    raise NotFound(f"{description}: no image tagged {tag!r} (tags: "
                   f"{', '.join(t for e in entries for t in _names(e)) or 'none'})")


def open_source(ref: SourceRef, store=None) -> Source:
    """The source a parsed reference names (``store`` for kind "store")."""
    if ref.kind == "oci":
        from .layout import OCILayout
        return OCILayout(ref.path)
    if ref.kind in ("oci-archive", "docker-archive"):
        from .archive import open_archive
        return open_archive(ref.path, ref.kind)
    if ref.kind == "store":
        if store is None:
            raise NotFound(f"no image source {ref.path!r} (not a file or directory, and no "
                           "store to look it up in)")
        return store.source(ref.path)
    raise NotFound(f"unknown kind of image source {ref.kind!r}")
