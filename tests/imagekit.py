"""Build small images for the image tests: layer tars from a spec, OCI layouts, OCI archives and
Docker archives, written the way the real tools write them (independently of the code under
test: plain ``tarfile``, ``hashlib``, ``gzip``/``zstd``, ``json``).

A layer spec is a list of entries, in tar order::

    F("etc/motd", b"hi", mode=0o644, uid=0, gid=0, mtime=..., xattrs={...})
    D("etc", mode=0o755)        L("bin/sh", "busybox")       H("bin/ls", "bin/busybox")
    C("dev/null", 1, 3)         B("dev/sda", 8, 0)           P("run/fifo")
    W("etc/gone")               -> a ".wh.gone" entry          O("var/cache") -> ".wh..wh..opq"
    raw(TarInfo, data)          anything else (hostile names...)
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

try:
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd as _zstd  # type: ignore[no-redef]

MTIME = 1_700_000_000


@dataclasses.dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def _info(name: str, type_, mode: int, uid: int, gid: int, mtime: int,
          xattrs: Optional[Dict[str, bytes]]) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = mtime
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                          for k, v in xattrs.items()}
    return ti


def F(name, data=b"", mode=0o644, uid=0, gid=0, mtime=MTIME, xattrs=None) -> Entry:
    data = data.encode() if isinstance(data, str) else data
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs)
    ti.size = len(data)
    return Entry(ti, data)


def D(name, mode=0o755, uid=0, gid=0, mtime=MTIME, xattrs=None) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs))


def L(name, target, uid=0, gid=0, mtime=MTIME, xattrs=None) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, xattrs)
    ti.linkname = target
    return Entry(ti)


def H(name, target, mode=0o644, uid=0, gid=0, mtime=MTIME) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, mode, uid, gid, mtime, None)
    ti.linkname = target
    return Entry(ti)


def C(name, major, minor, mode=0o666, uid=0, gid=0, mtime=MTIME) -> Entry:
    ti = _info(name, tarfile.CHRTYPE, mode, uid, gid, mtime, None)
    ti.devmajor, ti.devminor = major, minor
    return Entry(ti)


def B(name, major, minor, mode=0o660, uid=0, gid=0, mtime=MTIME) -> Entry:
    ti = _info(name, tarfile.BLKTYPE, mode, uid, gid, mtime, None)
    ti.devmajor, ti.devminor = major, minor
    return Entry(ti)


def P(name, mode=0o644, uid=0, gid=0, mtime=MTIME) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, mode, uid, gid, mtime, None))


def W(path) -> Entry:
    d, _, base = path.rpartition("/")
    return F((d + "/" if d else "") + ".wh." + base, b"", mode=0o600)


def O(dirpath) -> Entry:
    return F(dirpath.rstrip("/") + "/.wh..wh..opq", b"", mode=0o600)


def raw(ti: tarfile.TarInfo, data: bytes = b"") -> Entry:
    ti.size = len(data)
    return Entry(ti, data)


def make_tar(entries: Sequence[Entry], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            t.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return _zstd.compress(data)
    assert how == "none"
    return data


MEDIA = {"none": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class Built:
    """What write_image wrote: digests to check against."""
    manifest: str
    config: str
    layers: List[str]           # blob digests
    diff_ids: List[str]
    manifest_bytes: bytes
    config_bytes: bytes


class Layout:
    """An OCI layout directory written by hand."""

    def __init__(self, root):
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": []}
        self.save()

    def blob(self, data: bytes) -> str:
        d = sha(data)
        (self.root / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return d

    def save(self) -> None:
        (self.root / "index.json").write_text(json.dumps(self.index))

    def add(self, desc: dict, tag: Optional[str]) -> None:
        if tag is not None:
            desc = dict(desc, annotations={"org.opencontainers.image.ref.name": tag})
        self.index["manifests"].append(desc)
        self.save()

    def write_image(self, layers: Sequence[bytes], tag: Optional[str] = "latest",
                    compression: str = "gzip", history: Optional[list] = None,
                    config_extra: Optional[dict] = None, architecture: str = "amd64",
                    diff_ids: Optional[List[str]] = None, add: bool = True,
                    media_types: Optional[List[str]] = None) -> Built:
        blobs, ids, descs = [], [], []
        for i, tar in enumerate(layers):
            comp = compress(tar, compression)
            d = self.blob(comp)
            blobs.append(d)
            ids.append(sha(tar))
            mt = media_types[i] if media_types else MEDIA[compression]
            descs.append({"mediaType": mt, "digest": d, "size": len(comp)})
        config = {
            "architecture": architecture, "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or ids},
            "history": history if history is not None else
            [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"}
             for i in range(len(layers))],
        }
        config.update(config_extra or {})
        cbytes = json.dumps(config).encode()
        cd = self.blob(cbytes)
        manifest = {"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cd, "size": len(cbytes)},
                    "layers": descs}
        mbytes = json.dumps(manifest).encode()
        md = self.blob(mbytes)
        if add:
            self.add({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                      "size": len(mbytes)}, tag)
        return Built(md, cd, blobs, ids, mbytes, cbytes)

    def write_raw_layer_image(self, blob: bytes, media_type: str, diff_id: str,
                              tag: str = "t") -> Built:
        """An image of one layer given as its blob's bytes, media type and diff_id (for
        layers that are damaged on purpose)."""
        d = self.blob(blob)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
        cd = self.blob(config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                       "size": len(config)},
            "layers": [{"mediaType": media_type, "digest": d, "size": len(blob)}]}).encode()
        md = self.blob(manifest)
        self.add({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                  "size": len(manifest)}, tag)
        return Built(md, cd, [d], [diff_id], manifest, config)

    def write_index(self, manifests: List[Tuple[Built, dict]], tag: Optional[str]) -> str:
        """A multi-platform index of already written manifests; returns its digest."""
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "digest": b.manifest, "size": len(b.manifest_bytes),
                              "platform": plat} for b, plat in manifests]}
        data = json.dumps(idx).encode()
        d = self.blob(data)
        self.add({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d,
                  "size": len(data)}, tag)
        return d


def tar_directory(src, dest) -> None:
    """A tar of a directory's contents (an OCI archive from a layout)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(src)):
            t.add(os.path.join(src, name), arcname=name)


def write_docker_archive(dest, images: Sequence[Tuple[Sequence[str], Sequence[bytes]]],
                         history: Optional[list] = None) -> List[str]:
    """A ``docker save``-style archive: per image (repo tags, uncompressed layer tars).
    Returns the config digests."""
    files: Dict[str, bytes] = {}
    manifest = []
    out = []
    for tags, layers in images:
        paths = []
        ids = []
        for tar in layers:
            h = sha(tar).split(":")[1]
            files[f"{h}/layer.tar"] = tar
            files[f"{h}/VERSION"] = b"1.0"
            paths.append(f"{h}/layer.tar")
            ids.append(sha(tar))
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": ["/bin/sh"]},
                             "rootfs": {"type": "layers", "diff_ids": ids},
                             "history": history or [{"created_by": f"layer {i}"}
                                                    for i in range(len(layers))]}).encode()
        cd = sha(config)
        files[f"{cd.split(':')[1]}.json"] = config
        manifest.append({"Config": f"{cd.split(':')[1]}.json", "RepoTags": list(tags),
                         "Layers": paths})
        out.append(cd)
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return out


def need_tool(cmd: str, package: Optional[str] = None) -> str:
    """The path of ``cmd``, installed with apt-get first if missing (tests/podman/podkit.py);
    skips the calling test with the reason when that cannot be done."""
    import shutil
    import sys as _sys
    import pytest
    _sys.path.insert(0, os.path.join(os.path.dirname(__file__), "podman"))
    import podkit
    try:
        podkit.ensure_tools({cmd: package or cmd})
    except podkit.Unavailable as e:
        pytest.skip(f"{cmd}: {e}")
    path = shutil.which(cmd)
    if path is None:
        pytest.skip(f"{cmd} is not installed")
    return path
