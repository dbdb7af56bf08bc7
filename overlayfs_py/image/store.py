"""The content-addressed store: verified blobs, unpacked layers and image records.

Where: ``--store DIR``, else ``$OVERLAYFS_PY_STORE``, else ``/var/lib/overlayfs-py`` for root
and ``$XDG_DATA_HOME/overlayfs-py`` (``~/.local/share/overlayfs-py``) for other users.

Layout (``version`` 1)::

    store.json                      {"version": 1, "overlay_xattrs": "trusted" | "user"}
    lock                            flock: shared while adding, exclusive for removing
    blobs/sha256/<hex>              verified blobs (manifests, configs, layer blobs)
    layers/sha256/<hex>/            one unpacked layer, named by its diff_id, kernel format
        root/                         the tree: a lowerdir for overlayfs-py or the kernel
        layer.json                    what it is (diff_id, sizes, blobs it came from, ...)
    layers-oci/sha256/<hex>/        the same, with the OCI markers kept (``oci_markers``)
    images/<sha256 of name>.json    image records: name -> manifest, config, layers
    locks/<key>.lock                one flock per layer being unpacked (no double work)
    tmp/                            staging: blobs and layers are built here, then renamed
    empty/                          an empty lower for images without layers

Rules that keep it consistent:
- Nothing is ever written in place. A blob is written to ``tmp/``, verified against its
  digest and renamed into ``blobs/``; a layer is unpacked into ``tmp/layer-*``, verified
  (blob digest and diff_id, while it streams), flushed (``syncfs``) and renamed into
  ``layers/`` with ``RENAME_NOREPLACE``. So whatever exists under ``blobs/`` and ``layers/``
  is complete, after a crash, a ``kill -9`` or Ctrl-C alike; ``tmp/`` is emptied by the next
  process that finds nobody adding (it takes the ``lock`` exclusively, without waiting).
- Layers are keyed by ``diff_id`` (the digest of the uncompressed tar), so the same layer
  shipped gzip'ed by one image and zstd'ed by another is unpacked once.
- The overlay xattr namespace (``ondisk``) is chosen when the store is created: ``trusted``
  for root, ``user`` otherwise; mounts of a ``user`` store use the ``userxattr`` option.
- A mount holds a *lease* on each layer it uses: a shared flock on the layer's directory,
  inherited by the daemon and released when it exits (even by ``kill -9``).
  ``layer_in_use()`` tests for one; whoever removes layers must take the store ``lock``
  exclusively and skip layers in use.

For a registry client (see ``Store`` methods): stream a blob in with ``blob_writer`` /
``put_blob`` (verified, atomic, skipped by ``has_blob``), unpack a layer straight from any
stream with ``unpack_layer`` (skipped by ``has_layer``), and record the image with
``record_image``; ``image mount NAME`` then finds it (``source(NAME)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence

from . import digest as _digest
from . import mediatypes as mt
from . import ondisk
from .compression import LayerReader
from .errors import NotFound, StoreError
from .fsutil import (O_DIR, RENAME_NOREPLACE, fsync_quietly, read_file_at, renameat2, rmtree_at,
                     syncfs, write_file_at)
from .manifest import Descriptor, Image
from .source import Source
from .unpack import Warnings, default_threads, unpack_tar

STORE_VERSION = 1
ENV = "OVERLAYFS_PY_STORE"


def default_path() -> str:
    env = os.environ.get(ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/overlayfs-py"
    xdg = os.environ.get("XDG_DATA_HOME")
    if not xdg or not os.path.isabs(xdg):
        xdg = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "overlayfs-py")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    diff_id: str
    format: str                 # "kernel" or "oci"
    path: str                   # the layer's directory (root/ and layer.json)
    size: int                   # bytes of file data (each hard-linked file once)
    entries: int
    tar_size: int
    blobs: Dict[str, str]       # blob digest -> media type it was unpacked from
    warnings: List[str]
    stats: Dict[str, int]
    fresh: bool = False         # unpacked by this call (not found in the store)

    @property
    def root(self) -> str:
        return os.path.join(self.path, "root")

    @classmethod
    def from_json(cls, path: str, doc: dict) -> "LayerInfo":
        return cls(doc["diff_id"], doc.get("format", "kernel"), path, int(doc.get("size", 0)),
                   int(doc.get("entries", 0)), int(doc.get("tar_size", 0)),
                   dict(doc.get("blobs") or {}), list(doc.get("warnings") or []),
                   dict(doc.get("stats") or {}))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d.pop("fresh")
        return d


class Lease:
    """Shared flocks on layer directories: while any process holds one (a daemon inherits
    them), ``Store.layer_in_use`` says so and no removal may take the layer."""

    def __init__(self, fds: List[int]):
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Store:
    def __init__(self, path: Optional[str] = None):
        self.path = os.path.abspath(path or default_path())
        try:
            os.makedirs(self.path, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
            self.fd = os.open(self.path, O_DIR)
        except OSError as e:
            raise StoreError(f"store {self.path}: {e.strerror}") from None
        try:
            self._init()
        except OSError as e:
            os.close(self.fd)
            raise StoreError(f"store {self.path}: {e.strerror or e}") from None
        except BaseException:
            os.close(self.fd)
            raise

    # ------------------------------------------------------------------ setup
    def _init(self) -> None:
        lockfd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644,
                         dir_fd=self.fd)
        self._lock_fd = lockfd
        try:
            meta = read_file_at(self.fd, "store.json")
        except FileNotFoundError:
            meta = None
        if meta is None:
            with self._flock(fcntl.LOCK_EX):
                try:
                    meta = read_file_at(self.fd, "store.json")
                except FileNotFoundError:
                    doc = {"version": STORE_VERSION,
                           "overlay_xattrs": ondisk.default_namespace()}
                    self._write_json_atomic(self.fd, "store.json", doc)
                    meta = json.dumps(doc).encode()
        try:
            doc = json.loads(meta)
        except ValueError:
            raise StoreError(f"store {self.path}: store.json is damaged") from None
        if doc.get("version") != STORE_VERSION:
            raise StoreError(f"store {self.path}: version {doc.get('version')!r} is not "
                             f"supported (this is version {STORE_VERSION})")
        self.namespace = doc.get("overlay_xattrs", "trusted")
        if self.namespace not in ondisk.XATTR_NAMESPACES:
            raise StoreError(f"store {self.path}: unknown overlay_xattrs {self.namespace!r}")
        for d in ("blobs", "blobs/sha256", "layers", "layers/sha256", "layers-oci",
                  "layers-oci/sha256", "images", "locks", "tmp", "empty"):
            self._mkdir_at(d)
        self.remove_stale_temporaries()

    def _mkdir_at(self, rel: str) -> int:
        """Make ``rel`` (components walked with O_NOFOLLOW); return nothing useful."""
        fd = self.fd
        opened = []
        try:
            for part in rel.split("/"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                fd = os.open(part, O_DIR, dir_fd=fd)
                opened.append(fd)
        finally:
            for f in opened:
                os.close(f)
        return 0

    def _open_dir(self, rel: str) -> int:
        fd = self.fd
        opened = []
        try:
            for part in rel.split("/"):
                fd = os.open(part, O_DIR, dir_fd=fd)
                opened.append(fd)
            result = opened.pop()
            return result
        finally:
            for f in opened:
                os.close(f)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self._lock_fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def userxattr(self) -> bool:
        """Mounts of this store need the ``userxattr`` option."""
        return self.namespace == "user"

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def _flock(self, how: int) -> Iterator[None]:
        fd = os.open("lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def adding(self):
        """Shared store lock: held while anything is added (blobs, layers, records)."""
        return self._flock(fcntl.LOCK_SH)

    def exclusive(self, wait: bool = True):
        """Exclusive store lock: for removing things (``image rm``/``prune``)."""
        return self._flock(fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        locks = self._open_dir("locks")
        try:
            fd = os.open(f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644, dir_fd=locks)
        finally:
            os.close(locks)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove_stale_temporaries(self) -> int:
        """Empty ``tmp/`` if nobody is adding to the store right now; return how many
        leftovers were removed."""
        removed = 0
        try:
            with self.exclusive(wait=False):
                tmp = self._open_dir("tmp")
                try:
                    for name in os.listdir(tmp):
                        rmtree_at(tmp, name)
                        removed += 1
                finally:
                    os.close(tmp)
        except BlockingIOError:
            pass
        return removed

    @contextlib.contextmanager
    def _tempdir(self, prefix: str) -> Iterator[tuple]:
        """A fresh directory in tmp/ -> (tmp dir fd, name, dir fd); removed unless renamed
        away (the caller then sets ``moved[0]``)."""
        tmp = self._open_dir("tmp")
        name = f"{prefix}{secrets.token_hex(8)}"
        os.mkdir(name, 0o700, dir_fd=tmp)
        fd = os.open(name, O_DIR, dir_fd=tmp)
        try:
            yield tmp, name, fd
        finally:
            os.close(fd)
            try:
                rmtree_at(tmp, name)
            finally:
                os.close(tmp)

    @staticmethod
    def _write_json_atomic(dir_fd: int, name: str, doc: dict) -> None:
        tmp = f".{name}.{secrets.token_hex(6)}"
        write_file_at(dir_fd, tmp, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        fsync_quietly(dir_fd)

    # ------------------------------------------------------------------ blobs
    def blob_path(self, dg: str) -> str:
        algo, hexd = _digest.split(dg)
        return os.path.join(self.path, "blobs", algo, hexd)

    def has_blob(self, dg: str) -> bool:
        algo, hexd = _digest.split(dg)
        try:
            os.stat(f"blobs/{algo}/{hexd}", dir_fd=self.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def open_blob(self, dg: str) -> BinaryIO:
        algo, hexd = _digest.split(dg)
        try:
            d = self._open_dir(f"blobs/{algo}")
        except FileNotFoundError:
            raise NotFound(f"store: blob {dg} is not stored") from None
        try:
            fd = os.open(hexd, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError:
            raise NotFound(f"store: blob {dg} is not stored") from None
        finally:
            os.close(d)
        return os.fdopen(fd, "rb", buffering=0)      # no lock: see LayerReader.close

    @contextlib.contextmanager
    def blob_writer(self, expected: str, expected_size: Optional[int] = None):
        """``with store.blob_writer(digest, size) as w: w.write(chunk)...``: the blob is
        written to tmp/, and on a clean exit verified and renamed to blobs/ (a mismatch
        raises DigestMismatch and stores nothing). Holds the shared store lock."""
        from .layout import BlobWriter
        algo, _ = _digest.split(expected)
        with self.adding(), self._tempdir("blob-") as (_tmp, _name, dfd):
            w = BlobWriter(dfd, expected, expected_size, f"store {self.path}")
            try:
                yield w
                self._mkdir_at(f"blobs/{algo}")
                w.commit(self._open_dir(f"blobs/{algo}"))
            finally:
                w.discard()

    def put_blob(self, stream, expected: str, expected_size: Optional[int] = None,
                 task=None) -> str:
        """Copy ``stream`` into the store as blob ``expected`` (verified); a no-op when the
        blob is already there. Returns the blob's path."""
        if self.has_blob(expected):
            return self.blob_path(expected)
        with self.blob_writer(expected, expected_size) as w:
            while True:
                b = stream.read(1 << 20)
                if not b:
                    break
                w.write(b)
                if task is not None:
                    task.advance(w.size)
        return self.blob_path(expected)

    def put_bytes(self, data: bytes) -> str:
        dg = _digest.of_bytes(data)
        if not self.has_blob(dg):
            with self.blob_writer(dg, len(data)) as w:
                w.write(data)
        return dg

    # ------------------------------------------------------------------ layers
    @staticmethod
    def _layers_dir(oci_markers: bool) -> str:
        return "layers-oci" if oci_markers else "layers"

    def layer_path(self, diff_id: str, oci_markers: bool = False) -> str:
        algo, hexd = _digest.split(diff_id)
        return os.path.join(self.path, self._layers_dir(oci_markers), algo, hexd)

    def has_layer(self, diff_id: str, oci_markers: bool = False) -> bool:
        algo, hexd = _digest.split(diff_id)
        try:
            os.stat(f"{self._layers_dir(oci_markers)}/{algo}/{hexd}", dir_fd=self.fd,
                    follow_symlinks=False)
            return True
        except OSError:
            return False

    def layer_info(self, diff_id: str, oci_markers: bool = False) -> Optional[LayerInfo]:
        algo, hexd = _digest.split(diff_id)
        try:
            d = self._open_dir(f"{self._layers_dir(oci_markers)}/{algo}/{hexd}")
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(read_file_at(d, "layer.json"))
        except (OSError, ValueError):
            raise StoreError(f"store {self.path}: layer {diff_id}: layer.json is damaged") \
                from None
        finally:
            os.close(d)
        return LayerInfo.from_json(self.layer_path(diff_id, oci_markers), doc)

    def layers(self, oci_markers: bool = False) -> List[LayerInfo]:
        out = []
        base = self._layers_dir(oci_markers)
        for algo in ("sha256", "sha512"):
            try:
                d = self._open_dir(f"{base}/{algo}")
            except FileNotFoundError:
                continue
            try:
                names = sorted(os.listdir(d))
            finally:
                os.close(d)
            for hexd in names:
                info = self.layer_info(f"{algo}:{hexd}", oci_markers)
                if info is not None:
                    out.append(info)
        return out

    def unpack_layer(self, stream, *, diff_id: str, media_type: str,
                     blob_digest: Optional[str] = None, blob_size: Optional[int] = None,
                     oci_markers: bool = False, task=None, what: Optional[str] = None,
                     threads: Optional[int] = None) -> LayerInfo:
        """Unpack the layer blob that ``stream`` yields, verifying its digest (when given)
        and its ``diff_id`` while it streams; atomic. Returns the stored layer (at once,
        without reading, when it is already there). ``media_type`` "auto" sniffs the
        compression. ``threads``: writer threads (0: all in this thread; default a few)."""
        algo, hexd = _digest.split(diff_id)
        compression = "auto" if media_type == "auto" else mt.layer_compression(media_type)
        what = what or f"layer {_digest.short(diff_id)}"
        if self.namespace == "trusted" and os.geteuid() != 0:
            raise StoreError(f"store {self.path} keeps overlay xattrs in trusted.* (it was "
                             "made by root); as another user, use a store of your own "
                             "(--store DIR)")
        with self.adding():
            info = self.layer_info(diff_id, oci_markers)
            if info is not None:
                return info
            with self._key_lock(f"layer-{algo}-{hexd}{'-oci' if oci_markers else ''}"):
                info = self.layer_info(diff_id, oci_markers)
                if info is not None:
                    return info
                return self._unpack_new(stream, diff_id, compression, media_type, blob_digest,
                                        blob_size, oci_markers, task, what, threads)

    def _unpack_new(self, stream, diff_id, compression, media_type, blob_digest, blob_size,
                    oci_markers, task, what, threads) -> LayerInfo:
        threads = default_threads() if threads is None else threads
        algo, hexd = _digest.split(diff_id)
        with self._tempdir("layer-") as (tmp, name, dfd):
            os.mkdir("root", 0o700, dir_fd=dfd)
            root = os.open("root", O_DIR, dir_fd=dfd)
            warnings = Warnings()
            try:
                reader = LayerReader(stream, compression, blob_digest=blob_digest,
                                     diff_id=diff_id, blob_size=blob_size, what=what)
                if threads:
                    reader.start_prefetch()
                try:
                    stats = unpack_tar(reader, root, namespace=self.namespace,
                                       keep_markers=oci_markers, warnings=warnings, task=task,
                                       what=what, threads=threads)
                    blob, _ = reader.finish()
                finally:
                    reader.close()
                syncfs(root)
            finally:
                os.close(root)
            info = LayerInfo(diff_id, "oci" if oci_markers else "kernel",
                             self.layer_path(diff_id, oci_markers), stats.bytes, stats.entries,
                             reader.tar_size,
                             {blob: media_type if media_type != "auto"
                              else mt.oci_layer_type(reader.compression)},
                             warnings.lines(), stats.as_dict())
            doc = info.to_json()
            doc["unpacked"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_file_at(dfd, "layer.json", json.dumps(doc, indent=1, sort_keys=True).encode())
            os.fchmod(dfd, 0o755)
            fsync_quietly(dfd)
            base = self._layers_dir(oci_markers)
            self._mkdir_at(f"{base}/{algo}")
            dest = self._open_dir(f"{base}/{algo}")
            try:
                try:
                    renameat2(tmp, name, dest, hexd, RENAME_NOREPLACE)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # somebody else finished it first (outside our key lock: another store
                    # version?); theirs is as good as ours
                fsync_quietly(dest)
            finally:
                os.close(dest)
        got = self.layer_info(diff_id, oci_markers)
        if got is None:
            raise StoreError(f"store {self.path}: layer {diff_id} vanished after unpacking")
        return dataclasses.replace(got, fresh=True)

    def lease(self, diff_ids: Sequence[str], oci_markers: bool = False) -> Lease:
        """Shared flocks on these layers' directories (see the module docstring). The fds are
        inheritable, so that a daemon started from this process keeps them."""
        fds: List[int] = []
        try:
            for d in diff_ids:
                path = self.layer_path(d, oci_markers)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise NotFound(f"store: layer {d} is not unpacked") from None
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
                st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    raise StoreError(f"store: layer {d} was removed while it was being leased")
                os.set_inheritable(fd, True)
        except BaseException:
            Lease(fds).close()
            raise
        return Lease(fds)

    def layer_in_use(self, diff_id: str, oci_markers: bool = False) -> bool:
        try:
            fd = os.open(self.layer_path(diff_id, oci_markers),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def empty_dir(self) -> str:
        return os.path.join(self.path, "empty")

    # ------------------------------------------------------------------ images
    @staticmethod
    def _record_name(name: str) -> str:
        return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest() + ".json"

    def record_image(self, name: str, image: Image) -> dict:
        """Remember ``image`` under ``name`` (its manifest and config are stored as blobs),
        replacing what the name pointed to before."""
        with self.adding():
            self.put_bytes(image.manifest_bytes)
            self.put_bytes(image.config_bytes)
            doc = {
                "name": name,
                "source": image.source,
                "manifest": {"mediaType": image.manifest_media_type,
                             "digest": image.manifest_digest,
                             "size": len(image.manifest_bytes)},
                "config": image.config_digest,
                "layers": [{"digest": l.blob.digest, "mediaType": l.blob.media_type,
                            "size": l.blob.size, "diff_id": l.diff_id} for l in image.layers],
                "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            d = self._open_dir("images")
            try:
                self._write_json_atomic(d, self._record_name(name), doc)
            finally:
                os.close(d)
        return doc

    def images(self) -> List[dict]:
        d = self._open_dir("images")
        out = []
        try:
            for fname in sorted(os.listdir(d)):
                if not fname.endswith(".json") or fname.startswith("."):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    out.append(json.loads(read_file_at(d, fname)))
        finally:
            os.close(d)
        return sorted(out, key=lambda r: r.get("name", ""))

    def find_image(self, name: str, digest: Optional[str] = None) -> Optional[dict]:
        if name:
            d = self._open_dir("images")
            try:
                doc = json.loads(read_file_at(d, self._record_name(name)))
            except FileNotFoundError:
                doc = None
            except ValueError:
                raise StoreError(f"store {self.path}: the record of {name!r} is damaged") \
                    from None
            finally:
                os.close(d)
            if doc is not None and (digest is None or doc["manifest"]["digest"] == digest):
                return doc
            if digest is None:
                return None
        for doc in self.images():
            if doc["manifest"]["digest"] == (digest or name):
                return doc
        return None

    def remove_image_record(self, name: str) -> bool:
        d = self._open_dir("images")
        try:
            os.unlink(self._record_name(name), dir_fd=d)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(d)

    def source(self, name: str) -> "StoreSource":
        return StoreSource(self, name)


class StoreSource(Source):
    """An image recorded in the store, as a source (``image mount NAME``)."""

    kind = "store"

    def __init__(self, store: Store, name: str):
        super().__init__(name)
        self.store = store
        self.name = name

    def _record(self, digest: Optional[str]) -> dict:
        doc = self.store.find_image(self.name, digest)
        if doc is None:
            # A registry image is recorded under its canonical name (image pull):
            # "localhost:5000/app" finds "localhost:5000/app:latest", "debian" finds
            # "docker.io/library/debian:latest".
            from .registry.reference import normalize
            alt = normalize(self.name)
            if alt and alt != self.name:
                doc = self.store.find_image(alt, digest)
        if doc is None:
            raise NotFound(f"no image {self.name!r}: not a file or directory, and not in the "
                           f"store {self.store.path}")
        return doc

    def entries(self) -> List[Descriptor]:
        doc = self._record(None)
        m = doc["manifest"]
        return [Descriptor(m["mediaType"], m["digest"], m["size"],
                           ((mt.ANNOTATION_REF_NAME, doc["name"]),))]

    def select(self, tag, digest) -> Descriptor:
        doc = self._record(digest)
        m = doc["manifest"]
        return Descriptor(m["mediaType"], m["digest"], m["size"])

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.store.open_blob(desc.digest)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.store.has_blob(desc.digest)
