"""Commit an upper layer as a new image layer, like ``docker commit``: the upper becomes an OCI
layer tar (gzip, zstd or uncompressed), and a new config (``diff_ids`` extended, a history
entry added) and manifest are written, with the base image's layers, into an OCI layout.

The layer, from the overlay's format to the OCI one:
- a whiteout (a 0/0 char device, a ``.wh.X`` file, an xattr whiteout) becomes an empty file
  ``.wh.NAME``; an opaque directory gets a ``.wh..wh..opq`` entry first thing inside it;
- hard links within the upper become tar hard links (the first name in the tar's order holds
  the data); a metacopy file takes its data from the base image's layers;
- the overlay's own xattrs are left out; all others go in PAX ``SCHILY.xattr.*`` records.

Deterministic: the same upper gives a byte-identical tar, and so the same digests. Entries
are sorted (per directory: the opaque marker, whiteouts, then everything else, by name
bytes; a directory's entries before its subdirectories' contents), headers are normalized
(PAX format, numeric owners only, whole-second mtimes, no atime/ctime), xattrs are sorted,
gzip headers carry no name or time, and with ``SOURCE_DATE_EPOCH`` set every mtime is
clamped to it and the config's ``created`` times are it, so the whole image is reproducible.

Everything is written crash-safe into the layout (``layout.BlobWriter``; ``index.json``
replaced atomically): an interrupted commit leaves the layout as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from typing import Callable, List, Optional, Tuple

from . import digest as _digest
from . import manifest as _manifest
from . import mediatypes as mt
from . import ondisk
from .compression import CompressingWriter
from .errors import ImageError, NotFound
from .fsutil import O_DIR, proc_path
from .layout import OCILayout
from .manifest import Descriptor, Image, Platform
from .progress import Progress, Task
from .tarstream import BLOCK, header
from .tree import Dir, Entry, LowerView, Parts, show, walk_upper

FLUSH = 1 << 20
DEFAULT_CREATED_BY = "overlayfs-py commit"


def parse_target(to: str) -> Tuple[str, str]:
    """``LAYOUT[:TAG]`` -> (path, tag); the tag defaults to ``latest``. A path that exists is
    taken whole; otherwise a ``:`` after the last ``/`` starts the tag."""
    if to.startswith("oci:"):
        to = to[4:]
    if not to:
        raise ImageError("commit: --to needs a layout directory")
    if os.path.exists(to):
        return to, "latest"
    head, sep, tail = to.rpartition(":")
    if sep and head and "/" not in tail:
        if not tail:
            raise ImageError(f"{to}: empty tag after ':'")
        return head, tail
    return to, "latest"


def source_date_epoch(value: Optional[str] = None) -> Optional[int]:
    value = os.environ.get("SOURCE_DATE_EPOCH") if value is None else value
    if value is None or value == "":
        return None
    try:
        epoch = int(value)
    except ValueError:
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds") \
            from None
    if epoch < 0:
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r} is negative")
    return epoch


def rfc3339(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class TarWriter:
    """Tar headers and data to ``out`` in large pieces; ends with two zero blocks."""

    def __init__(self, out):
        self.out = out
        self.buf = bytearray()
        self.entries = 0
        self.bytes = 0

    def _put(self, b) -> None:
        self.buf += b
        if len(self.buf) >= FLUSH:
            self.out.write(bytes(self.buf))
            self.buf.clear()

    def add(self, hdr: bytes, fd: Optional[int] = None, size: int = 0,
            what: str = "") -> None:
        self._put(hdr)
        self.entries += 1
        if fd is None or not size:
            return
        left = size
        while left:
            # the last read asks for one byte more: one system call finds the end, or that
            # the file grew (a regular file reads short only at its end)
            chunk = os.read(fd, left + 1 if left <= FLUSH else FLUSH)
            if not chunk:
                raise ImageError(f"{what}: the file shrank while it was committed")
            if len(chunk) > left:
                raise ImageError(f"{what}: the file grew while it was committed")
            self._put(chunk)
            left -= len(chunk)
        self.bytes += size
        pad = -size % BLOCK
        if pad:
            self._put(bytes(pad))

    def close(self) -> None:
        self._put(bytes(2 * BLOCK))
        if self.buf:
            self.out.write(bytes(self.buf))
            self.buf.clear()


class _LayerBuilder:
    def __init__(self, tw: TarWriter, clamp: Optional[int], lowers: Callable[[], LowerView],
                 task: Task, warnings: List[str]):
        self.tw = tw
        self.clamp = clamp
        self.lowers = lowers
        self.task = task
        self.warnings = warnings
        self.links = {}

    def _mtime(self, st: os.stat_result) -> int:
        t = int(st.st_mtime)
        return min(t, self.clamp) if self.clamp is not None else t

    def _marker(self, parts: Parts, d: Dir) -> None:
        """An empty regular file, mode 0600, owned by root, with the directory's mtime."""
        self.tw.add(header(b"/".join(parts), b"0", mode=0o600, mtime=self._mtime(d.st)))

    def _xattrs(self, target, names) -> list:
        out = []
        for n in sorted(names):
            if ondisk.is_private_xattr(n):
                continue
            try:
                v = os.getxattr(target, n, follow_symlinks=False) if not isinstance(
                    target, int) else os.getxattr(target, n)
            except OSError:
                continue
            out.append((n, v))
        return out

    def run(self, root_fd: int) -> None:
        for d in walk_upper(root_fd):
            if any(n in d.xattrs for n in ondisk.REDIRECT_XATTRS):
                raise ImageError(f"{show(d.parts)}: a redirected directory (redirect_dir=on) "
                                 "cannot be committed from the upper layer alone")
            if d.opaque and d.parts:
                self._marker(d.parts + (ondisk.OPAQUE_MARKER,), d)
            for name in d.whiteouts:
                self._marker(d.parts + (ondisk.WH_PREFIX + name,), d)
            for e in d.entries:
                self.entry(d, e)
                self.task.advance(self.tw.bytes, self.tw.entries)

    def entry(self, d: Dir, e: Entry) -> None:
        parts = d.parts + (e.name,)
        name = b"/".join(parts)
        st = e.st
        fmt = stat.S_IFMT(st.st_mode)
        common = dict(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime=self._mtime(st))
        if fmt == stat.S_IFREG:
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = self.links.get(key)
                if first is not None:
                    self.tw.add(header(name, b"1", linkname=first, **common))
                    return
                self.links[key] = name
            fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
            try:
                names = os.listxattr(fd)
                xattrs = self._xattrs(fd, names) if names else []
                if any(n in names for n in ondisk.METACOPY_XATTRS):
                    os.close(fd)
                    fd = -1
                    fd = self._lower_data(parts)
                self.tw.add(header(name, b"0", size=st.st_size, xattrs=xattrs, **common),
                            fd, st.st_size, show(parts))
            finally:
                if fd >= 0:
                    os.close(fd)
            return
        if fmt == stat.S_IFSOCK:
            self.warnings.append(f"{show(parts)}: a socket; left out (tar cannot hold one)")
            return
        xattrs = self._xattrs(proc_path(d.fd, e.name), e.xattrs)
        if fmt == stat.S_IFDIR:
            self.tw.add(header(name + b"/", b"5", xattrs=xattrs, **common))
        elif fmt == stat.S_IFLNK:
            self.tw.add(header(name, b"2", linkname=os.readlink(e.name, dir_fd=d.fd),
                               xattrs=xattrs, **common))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            self.tw.add(header(name, b"3" if fmt == stat.S_IFCHR else b"4",
                               devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                               xattrs=xattrs, **common))
        elif fmt == stat.S_IFIFO:
            self.tw.add(header(name, b"6", xattrs=xattrs, **common))

    def _lower_data(self, parts: Parts) -> int:
        view = self.lowers()
        found = view.lookup(parts) if view else None
        if found is None or not stat.S_ISREG(found[1].st_mode):
            raise ImageError(f"{show(parts)}: a metacopy file whose data is in no lower layer "
                             "(commit it --from the image it was mounted on)")
        return view.open_file(found[0], parts)


@dataclasses.dataclass
class CommitResult:
    layout: str
    tag: str
    layer: Descriptor
    diff_id: str
    tar_size: int
    entries: int
    config: Descriptor
    manifest: Descriptor
    warnings: List[str]

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def to_json(self) -> dict:
        return {"image": self.reference, "layout": self.layout, "tag": self.tag,
                "layer": self.layer.to_json(), "diff_id": self.diff_id,
                "tar_size": self.tar_size, "entries": self.entries,
                "config": self.config.to_json(), "manifest": self.manifest.to_json(),
                "warnings": self.warnings}


def new_config(base: Optional[Image], diff_id: str, created: str, created_by: str,
               comment: Optional[str], author: Optional[str]) -> dict:
    if base is not None:
        config = json.loads(base.config_bytes)
    else:
        host = Platform.host()
        config = {"architecture": host.architecture, "os": host.os}
        if host.variant:
            config["variant"] = host.variant
        config.update({"config": {}, "rootfs": {"type": "layers", "diff_ids": []},
                       "history": []})
    config["created"] = created
    if author:
        config["author"] = author
    rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
    rootfs.setdefault("type", "layers")
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [diff_id]
    config["rootfs"] = rootfs
    history = config.get("history") if isinstance(config.get("history"), list) else []
    entry = {"created": created, "created_by": created_by}
    if author:
        entry["author"] = author
    if comment:
        entry["comment"] = comment
    config["history"] = history + [entry]
    return config


def commit(upper: str, to: str, *, base: Optional[Image] = None, base_source=None,
           base_lowers: Optional[Callable[[], List[str]]] = None,
           compression: str = "gzip", created_by: Optional[str] = None,
           comment: Optional[str] = None, author: Optional[str] = None,
           epoch: Optional[int] = None, progress: Optional[Progress] = None) -> CommitResult:
    """Write ``upper`` as a new layer on ``base`` (an Image read from ``base_source``) into
    the layout ``to`` (``LAYOUT[:TAG]``). ``base_lowers()`` gives the base's unpacked layer
    trees (top first), needed only for metacopy files."""
    if compression not in mt.COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r} (gzip, zstd or none)")
    progress = progress or Progress()
    path, tag = parse_target(to)
    try:
        root = os.open(upper, O_DIR)
    except OSError as e:
        raise ImageError(f"{upper}: {e.strerror}") from None
    view: List[Optional[LowerView]] = [None]

    def lowers() -> Optional[LowerView]:
        if view[0] is None and base is not None and base_lowers is not None:
            view[0] = LowerView(base_lowers())
        return view[0]

    warnings: List[str] = []
    try:
        layout = OCILayout(path, create=True)
        try:
            layout.remove_stale_temporaries()
            base_layers = _copy_base_blobs(layout, base, base_source, progress)
            with layout.blob_writer() as w, progress.task("commit", None) as task:
                cw = CompressingWriter(w, compression)
                tw = TarWriter(cw)
                _LayerBuilder(tw, epoch, lowers, task, warnings).run(root)
                tw.close()
                res = cw.finish()
            assert w.digest == res["digest"]
            layer = Descriptor(mt.oci_layer_type(compression), res["digest"], res["size"])
            created = rfc3339(epoch if epoch is not None else int(time.time()))
            config = new_config(base, res["diff_id"], created,
                                created_by or DEFAULT_CREATED_BY, comment, author)
            cdesc = layout.put_bytes(_manifest.dumps(config), mt.OCI_CONFIG)
            manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                        "config": cdesc.to_json(),
                        "layers": [d.to_json() for d in base_layers] + [layer.to_json()]}
            mdesc = layout.put_bytes(_manifest.dumps(manifest), mt.OCI_MANIFEST)
            layout.set_tag(tag, mdesc)
        finally:
            layout.close()
    finally:
        os.close(root)
        if view[0] is not None:
            view[0].close()
    return CommitResult(os.path.abspath(path), tag, layer, res["diff_id"], res["tar_size"],
                        tw.entries, cdesc, mdesc, warnings)


def _copy_base_blobs(layout: OCILayout, base: Optional[Image], source,
                     progress: Progress) -> List[Descriptor]:
    """Every layer blob of the base into the layout (verified); their OCI descriptors."""
    out = []
    if base is None:
        return out
    for i, layer in enumerate(base.layers, 1):
        b = layer.blob
        if not layout.has_blob(b.digest):
            try:
                stream = source.open_blob(b)
            except NotFound:
                raise NotFound(f"{base.source}: the blob of layer {i} ({b.digest}) is not "
                               "available (a store keeps unpacked layers only, unless it "
                               "pulled the blob); commit --from the layout or archive the "
                               "image came from") from None
            with stream, layout.blob_writer(b.digest, b.size) as w, \
                    progress.task(f"copy layer {i} {_digest.short(b.digest)}", b.size) as t:
                while True:
                    chunk = stream.read(1 << 20)
                    if not chunk:
                        break
                    w.write(chunk)
                    t.advance(w.size)
        out.append(Descriptor(mt.to_oci(b.media_type), b.digest, b.size))
    return out
