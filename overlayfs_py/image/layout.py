"""OCI image layout directories: read images from them, write blobs, manifests and tags.

A layout (image-spec ``image-layout.md``) is ``oci-layout`` (the version), ``index.json`` (the
top-level descriptors, a tag in ``org.opencontainers.image.ref.name``) and
``blobs/<alg>/<hex>``. Blobs are opened relative to the layout's held directory fd, each
component with ``O_NOFOLLOW``.

Writing is crash safe: a blob is written to a temporary file in the layout directory
(``.overlayfs-py-tmp-*``, flock'ed by its writer) and renamed into ``blobs/`` once its digest is
verified; ``index.json`` is rewritten as a temporary file and renamed over the old one, under
an flock of the layout directory. Stale temporaries (their writer died) are removed by the
next writer.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from typing import BinaryIO, Iterator, List, Optional

from . import digest as _digest
from . import mediatypes as mt
from .errors import CorruptData, DigestMismatch, ImageError, NotFound
from .manifest import Descriptor, index_entries, loads
from .source import Source

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_PREFIX = ".overlayfs-py-tmp-"


def fsync_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


class OCILayout(Source):
    kind = "oci"

    def __init__(self, path: str, *, create: bool = False):
        super().__init__(f"oci:{path}")
        self.path = os.path.abspath(path)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o755)
        try:
            self.fd = os.open(self.path, O_DIR)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such directory") from None
        except NotADirectoryError:
            raise ImageError(f"{path}: not a directory") from None
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
        try:
            if create:
                self._init_layout()
            self._check_layout()
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ reading
    def _read_small(self, name: str, limit: int = 8 << 20) -> Optional[bytes]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageError(f"{self.path}/{name}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CorruptData(f"{self.path}/{name}: too large")
        return data

    def _check_layout(self) -> None:
        data = self._read_small("oci-layout")
        if data is not None:
            doc = loads(data, f"{self.path}/oci-layout")
            version = doc.get("imageLayoutVersion")
            if not isinstance(version, str) or not version.startswith("1."):
                raise ImageError(f"{self.path}: unsupported imageLayoutVersion {version!r}")
        if self._read_small("index.json") is None:
            raise NotFound(f"{self.path}: no index.json (not an OCI image layout)")

    def index(self) -> dict:
        data = self._read_small("index.json")
        if data is None:
            raise NotFound(f"{self.path}: no index.json")
        return loads(data, f"{self.path}/index.json")

    def entries(self) -> List[Descriptor]:
        return index_entries(self.index(), f"{self.path}/index.json")

    def _blob_dir(self, algo: str) -> int:
        try:
            blobs = os.open("blobs", O_DIR, dir_fd=self.fd)
        except FileNotFoundError:
            raise NotFound(f"{self.path}: no blobs directory") from None
        try:
            return os.open(algo, O_DIR, dir_fd=blobs)
        except FileNotFoundError:
            raise NotFound(f"{self.path}: no blobs/{algo} directory") from None
        finally:
            os.close(blobs)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        algo, hexd = _digest.split(desc.digest)
        d = self._blob_dir(algo)
        try:
            fd = os.open(hexd, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError:
            raise NotFound(f"{self.path}: blob {desc.digest} is missing") from None
        except OSError as e:
            raise ImageError(f"{self.path}: blob {desc.digest}: {e.strerror}") from None
        finally:
            os.close(d)
        return os.fdopen(fd, "rb", buffering=0)      # no lock: see LayerReader.close

    def has_blob(self, desc_or_digest) -> bool:
        dg = desc_or_digest if isinstance(desc_or_digest, str) else desc_or_digest.digest
        algo, hexd = _digest.split(dg)
        try:
            os.stat(f"blobs/{algo}/{hexd}", dir_fd=self.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ writing
    def _init_layout(self) -> None:
        if self._read_small("oci-layout") is None:
            self._write_atomic("oci-layout", json.dumps(
                {"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}).encode())
        if self._read_small("index.json") is None:
            self._write_atomic("index.json", json.dumps(
                {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []},
                indent=None).encode())
        os.close(self._blob_dir_for_write("sha256"))

    def _write_atomic(self, name: str, data: bytes) -> None:
        tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        fsync_dir(self.fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive flock of the layout directory (for index.json read-modify-write)."""
        fd = os.open(".", O_DIR, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove_stale_temporaries(self) -> None:
        for name in os.listdir(self.fd):
            if not name.startswith(TMP_PREFIX):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(name, dir_fd=self.fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def blob_writer(self, expected: Optional[str] = None,
                    expected_size: Optional[int] = None) -> Iterator["BlobWriter"]:
        """Write a blob: ``with layout.blob_writer() as w: w.write(...)``; on a clean exit the
        digest is checked (when given) and the blob renamed into place; ``w.digest``."""
        w = BlobWriter(self.fd, expected, expected_size, f"{self.path}")
        try:
            yield w
            w.commit(self._blob_dir_for_write("sha256" if expected is None
                                              else expected.split(":", 1)[0]))
        finally:
            w.discard()

    def _blob_dir_for_write(self, algo: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir("blobs", 0o755, dir_fd=self.fd)
        blobs = os.open("blobs", O_DIR, dir_fd=self.fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(algo, 0o755, dir_fd=blobs)
        finally:
            os.close(blobs)
        return self._blob_dir(algo)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        dg = _digest.of_bytes(data)
        if not self.has_blob(dg):
            with self.blob_writer(dg, len(data)) as w:
                w.write(data)
        return Descriptor(media_type, dg, len(data))

    def set_tag(self, tag: Optional[str], desc: Descriptor) -> None:
        """List ``desc`` in index.json, named ``tag`` (which then names nothing else)."""
        with self.locked():
            index = self.index()
            manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
            out = []
            for m in manifests:
                ann = dict(m.get("annotations") or {})
                if tag is not None and ann.get(mt.ANNOTATION_REF_NAME) == tag:
                    continue                     # the tag moves to the new manifest
                if tag is None and m.get("digest") == desc.digest and not ann:
                    continue                     # already listed untagged
                out.append(m)
            entry = desc.to_json()
            if tag is not None:
                entry["annotations"] = {**entry.get("annotations", {}),
                                        mt.ANNOTATION_REF_NAME: tag}
            out.append(entry)
            index["manifests"] = out
            index.setdefault("schemaVersion", 2)
            self._write_atomic("index.json", json.dumps(index).encode())


class BlobWriter:
    """A temporary file that becomes ``blobs/<alg>/<hex>`` once complete and verified."""

    def __init__(self, dir_fd: int, expected: Optional[str], expected_size: Optional[int],
                 where: str):
        self.dir_fd = dir_fd
        self.expected = expected
        self.expected_size = expected_size
        self.where = where
        self.name = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.hasher = _digest.new_hasher(expected or "sha256")
        self.size = 0
        self.digest: Optional[str] = None
        self._done = False

    def write(self, b) -> int:
        mv = memoryview(b)
        self.hasher.update(mv)
        self.size += len(mv)
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]
        return len(b)

    def commit(self, blob_dir_fd: int) -> str:
        try:
            got = f"{self.hasher.name}:{self.hasher.hexdigest()}"
            if self.expected_size is not None and self.size != self.expected_size:
                raise DigestMismatch(f"{self.where}: blob {self.expected}: {self.size} bytes "
                                     f"where {self.expected_size} were promised")
            if self.expected is not None and got != self.expected:
                raise DigestMismatch(f"{self.where}: blob digest mismatch: expected "
                                     f"{self.expected}, got {got}")
            os.fsync(self.fd)
            hexd = got.split(":", 1)[1]
            os.rename(self.name, hexd, src_dir_fd=self.dir_fd, dst_dir_fd=blob_dir_fd)
            fsync_dir(blob_dir_fd)
            self._done = True
            self.digest = got
            return got
        finally:
            os.close(blob_dir_fd)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._done:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.dir_fd)
            self._done = True
