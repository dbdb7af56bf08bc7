"""Images in tar archives: OCI archives (a tar of an OCI layout, as ``podman save --format
oci-archive`` and ``skopeo copy ... oci-archive:F`` write them) and Docker archives
(``docker save``, ``podman save --format docker-archive``: ``manifest.json``, a config file
and one tar per layer).

The archive is never extracted: its member index is read once, and each blob is read in place
(``tarfile`` gives a view of the member's bytes), so hostile member names cannot reach the
file system.

A Docker archive has no OCI manifest. We make one, in memory, from ``manifest.json``: the
config's descriptor, and per layer a descriptor of the layer file as stored (uncompressed as
a rule -- then its digest is its ``diff_id``, checked while it streams -- or gzip/zstd, whose
digest is computed when the image is resolved).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import BinaryIO, Dict, List, Optional, Tuple

from . import compression as _compression
from . import digest as _digest
from . import manifest as _manifest
from . import mediatypes as mt
from .errors import CorruptData, ImageError, NotFound
from .manifest import Descriptor, Image, Platform
from .source import Source


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


class TarArchive:
    """Random access to the members of an uncompressed tar file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file = open(path, "rb")
        except OSError as e:
            raise NotFound(f"{path}: {e.strerror}") from None
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:")
            self.members: Dict[str, tarfile.TarInfo] = {}
            for m in self.tar.getmembers():
                self.members[_norm(m.name)] = m
        except tarfile.TarError as e:
            self.file.close()
            raise CorruptData(f"{path}: unreadable archive: {e}") from None

    def close(self) -> None:
        self.tar.close()
        self.file.close()

    def has(self, name: str) -> bool:
        return _norm(name) in self.members

    def open(self, name: str) -> BinaryIO:
        m = self.members.get(_norm(name))
        if m is None:
            raise NotFound(f"{self.path}: no {name} in the archive")
        if m.isreg() and not m.issparse():
            return MemberReader(self.file.fileno(), m.offset_data, m.size)
        if not (m.isfile() or m.islnk() or m.issym()):
            raise CorruptData(f"{self.path}: {name} is not a file")
        try:
            f = self.tar.extractfile(m)
        except (tarfile.TarError, KeyError) as e:
            raise CorruptData(f"{self.path}: {name}: {e}") from None
        if f is None:
            raise CorruptData(f"{self.path}: {name} is not a file")
        return f

    def size(self, name: str) -> int:
        return self.members[_norm(name)].size

    def read(self, name: str, limit: int = _manifest.MAX_JSON) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CorruptData(f"{self.path}: {name} is too large")
        return data


class MemberReader(io.RawIOBase):
    """A member's bytes, read with pread from the archive's fd: no shared file position and no
    lock, so several members can be read at once, and closing never waits."""

    def __init__(self, fd: int, offset: int, size: int):
        super().__init__()
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.offset + self.pos)
        if not data:
            raise CorruptData(f"archive member at offset {self.offset}: truncated")
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class OCIArchive(Source):
    kind = "oci-archive"

    def __init__(self, path: str, archive: Optional[TarArchive] = None):
        super().__init__(f"oci-archive:{path}")
        self.archive = archive or TarArchive(path)

    def close(self) -> None:
        self.archive.close()

    def entries(self) -> List[Descriptor]:
        try:
            data = self.archive.read("index.json")
        except NotFound:
            raise NotFound(f"{self.archive.path}: no index.json in the archive") from None
        return _manifest.index_entries(_manifest.loads(data, f"{self.archive.path}: "
                                                             "index.json"),
                                       f"{self.archive.path}: index.json")

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        algo, hexd = _digest.split(desc.digest)
        name = f"blobs/{algo}/{hexd}"
        if not self.archive.has(name):
            raise NotFound(f"{self.archive.path}: blob {desc.digest} is missing")
        return self.archive.open(name)


class DockerArchive(Source):
    kind = "docker-archive"

    def __init__(self, path: str, archive: Optional[TarArchive] = None):
        super().__init__(f"docker-archive:{path}")
        self.archive = archive or TarArchive(path)
        self._blobs: Dict[str, str] = {}      # digest -> member name

    def close(self) -> None:
        self.archive.close()

    def _manifest_json(self) -> list:
        try:
            data = self.archive.read("manifest.json")
        except NotFound:
            raise NotFound(f"{self.archive.path}: no manifest.json in the archive") from None
        import json
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise CorruptData(f"{self.archive.path}: manifest.json: not valid JSON ({e})") \
                from None
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
            raise CorruptData(f"{self.archive.path}: manifest.json is not a list of images")
        return doc

    def entries(self) -> List[Descriptor]:
        return []            # not used: resolve() is specific to this format

    def tags(self) -> List[str]:
        return [t for e in self._manifest_json() for t in (e.get("RepoTags") or [])]

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        name = self._blobs.get(desc.digest)
        if name is None:
            raise NotFound(f"{self.archive.path}: blob {desc.digest} is missing")
        return self.archive.open(name)

    def _select(self, tag: Optional[str], digest: Optional[str]) -> Tuple[dict, bytes]:
        images = self._manifest_json()
        if not images:
            raise NotFound(f"{self.archive.path}: manifest.json lists no image")
        if digest:
            for e in images:
                cfg = self.archive.read(str(e.get("Config")))
                if _digest.of_bytes(cfg, digest.split(":")[0]) == digest:
                    return e, cfg
            raise NotFound(f"{self.description}: no image with config digest {digest}")
        if tag:
            def names(e):
                return [str(t) for t in (e.get("RepoTags") or [])]
            found = [e for e in images if tag in names(e)]
            if not found:
                found = [e for e in images if any(
                    t.rsplit("/", 1)[-1].rsplit(":", 1)[-1] == tag for t in names(e))]
            if not found:
                found = [e for e in images if any(t.rsplit(":", 1)[0] == tag
                                                  for t in names(e))]
            if len(found) != 1:
                what = "no image" if not found else f"{len(found)} images"
                raise NotFound(f"{self.description}: {what} tagged {tag!r} (tags: "
                               f"{', '.join(self.tags()) or 'none'})")
            e = found[0]
        elif len(images) == 1:
            e = images[0]
        else:
            raise NotFound(f"{self.description}: holds {len(images)} images; name one with "
                           f":TAG (tags: {', '.join(self.tags()) or 'none'})")
        cfg_name = e.get("Config")
        if not isinstance(cfg_name, str):
            raise CorruptData(f"{self.archive.path}: an image in manifest.json has no Config")
        try:
            cfg = self.archive.read(cfg_name)
        except NotFound:
            raise NotFound(f"{self.archive.path}: config {cfg_name} is missing") from None
        return e, cfg

    def resolve(self, tag: Optional[str] = None, digest: Optional[str] = None,
                platform: Optional[Platform] = None) -> Image:
        entry, cfg = self._select(tag, digest)
        name = self.description + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        cfg_digest = _digest.of_bytes(cfg)
        # Docker names the config after its digest: check it where it does.
        stem = _norm(str(entry["Config"])).rsplit("/", 1)[-1].removesuffix(".json")
        if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and \
                cfg_digest != f"sha256:{stem}":
            from .errors import DigestMismatch
            raise DigestMismatch(f"{name}: config {entry['Config']} has digest {cfg_digest}")
        cdoc = _manifest.loads(cfg, f"{name}: config")
        diff_ids = _manifest.config_diff_ids(cdoc, f"{name}: config")
        files = entry.get("Layers")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise CorruptData(f"{name}: manifest.json has no Layers list")
        if len(files) != len(diff_ids):
            raise CorruptData(f"{name}: {len(files)} layer files for {len(diff_ids)} diff_ids")
        layers = []
        for fname, diff_id in zip(files, diff_ids):
            if not self.archive.has(fname):
                raise NotFound(f"{self.archive.path}: layer {fname} is missing")
            with self.archive.open(fname) as f:
                kind = _compression.sniff(f.read(4))
            if kind == "none":
                dg = diff_id            # its bytes are the tar: verified as the diff_id
            else:
                h = hashlib.sha256()
                with self.archive.open(fname) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                dg = f"sha256:{h.hexdigest()}"
            self._blobs[dg] = fname
            layers.append(Descriptor(mt.oci_layer_type(kind), dg, self.archive.size(fname)))
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": cfg_digest, "size": len(cfg)},
            "layers": [d.to_json() for d in layers],
        }
        self._blobs[cfg_digest] = str(entry["Config"])
        mdata = _manifest.dumps(manifest)
        return Image(name, _digest.of_bytes(mdata), mt.OCI_MANIFEST, mdata, manifest, cfg_digest,
                     cfg, cdoc, tuple(_manifest.Layer(d, i) for d, i in zip(layers, diff_ids)))


def open_archive(path: str, kind: str) -> Source:
    archive = TarArchive(path)
    try:
        if kind == "oci-archive" or (kind == "" and archive.has("index.json")):
            if not archive.has("index.json"):
                raise ImageError(f"{path}: not an OCI archive (no index.json)")
            return OCIArchive(path, archive)
        if not archive.has("manifest.json"):
            raise ImageError(f"{path}: not a Docker archive (no manifest.json)")
        return DockerArchive(path, archive)
    except BaseException:
        archive.close()
        raise
