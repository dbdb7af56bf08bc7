"""``image pull``: a registry image into the store.

1. The manifest is fetched by tag or digest (OCI and Docker schema 2 manifests and indexes
   are accepted); its digest is computed from the bytes and must be the one asked for (by
   digest) and the one the registry announces (``Docker-Content-Digest``). An index is
   resolved to one platform (this machine's linux/ARCH unless ``platform`` says otherwise),
   and the config is fetched and verified (``manifest.resolve``, shared with the file
   sources).
2. The layers the store lacks are fetched in parallel (``Options.jobs`` threads). Each blob
   streams from the registry through two writers at once: the store's ``blob_writer``
   (verified, then renamed into ``blobs/``) and ``unpack_layer`` (which checks the blob
   digest and the layer's ``diff_id`` while it unpacks, and renames the layer into place
   only when both match). A layer already in the store is not fetched; a layer whose blob
   is stored (but not unpacked) is unpacked from that blob.
3. The image is recorded under its canonical name (``host/repo:tag`` or
   ``host/repo@digest``), last: ``image mount NAME`` then finds it.

An interrupted pull leaves only temporaries (``tmp/``, removed by the next store user) and
whole layers; running it again fetches what is missing. A blob that does not match its
digest is discarded and the pull fails with a ``DigestMismatch``; so does a full disk
(``StoreError``), with nothing of the layer kept.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import threading
from typing import List, Optional, Tuple, Union

from .. import digest as _digest
from .. import manifest as _manifest
from .. import mediatypes as mt
from ..api import open_store
from ..errors import (CorruptData, DigestMismatch, HostileArchive, ImageError, StoreError,
                      UnsupportedMediaType)
from ..manifest import Descriptor, Image, Layer, Platform
from ..progress import Progress
from ..source import Source
from ..store import LayerInfo, Store
from . import reference as _reference
from .client import Cancelled, Options, Registry, RegistryNotFound

ACCEPT = (mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_LIST, mt.DOCKER_MANIFEST)


class RegistrySource(Source):
    """A repository of a registry as an image source: ``select`` fetches the manifest that a
    tag or digest names, ``read_blob`` fetches manifests and configs (verified by
    ``manifest.resolve``), ``open_blob`` streams a layer blob."""

    kind = "registry"

    def __init__(self, registry: Registry, ref: _reference.RegistryRef):
        super().__init__(ref.repo_name)
        self.registry = registry
        self.ref = ref
        self._manifests = {}        # digest -> bytes, fetched and verified

    def _fetch_manifest(self, reference: str) -> Descriptor:
        data, ctype, announced = self.registry.get_manifest(self.ref.repository, reference,
                                                            ACCEPT)
        algo = reference.split(":", 1)[0] if _digest.is_digest(reference) else "sha256"
        got = _digest.of_bytes(data, algo)
        if _digest.is_digest(reference) and got != reference:
            raise DigestMismatch(f"registry {self.registry.host}: {self.ref.repository}: the "
                                 f"manifest sent for {reference} has digest {got}")
        if announced and _digest.is_digest(announced) and announced.startswith(algo + ":") \
                and announced != got:
            raise DigestMismatch(f"registry {self.registry.host}: {self.ref.repository}:"
                                 f"{reference}: the manifest's digest is {got}, the registry "
                                 f"promised {announced}")
        media_type = ctype
        if media_type not in ACCEPT:
            if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
                doc = _manifest.loads(data, f"{self.description}: manifest {reference}")
                if doc.get("schemaVersion") == 1:
                    raise UnsupportedMediaType(
                        f"{self.description}:{reference}: unsupported manifest media type "
                        "(Docker schema 1; only OCI and Docker schema 2 are read)")
                media_type = _manifest.media_type_of(doc, None)
            else:
                raise UnsupportedMediaType(f"{self.description}:{reference}: unsupported "
                                           f"manifest media type {media_type!r}")
        self._manifests[got] = data
        return Descriptor(media_type, got, len(data))

    def entries(self) -> List[Descriptor]:
        return [self._fetch_manifest(self.ref.reference)]

    def select(self, tag, digest) -> Descriptor:
        return self._fetch_manifest(digest or tag or _reference.DEFAULT_TAG)

    def read_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        if desc.digest in self._manifests:
            return self._manifests[desc.digest]
        if desc.media_type in mt.MANIFESTS + mt.INDEXES:
            self._fetch_manifest(desc.digest)
            return self._manifests[desc.digest]
        data = self.registry.get_blob_bytes(self.ref.repository, desc.digest,
                                            _manifest.MAX_JSON)
        got = _digest.of_bytes(data[:desc.size + 1], desc.digest.split(":", 1)[0])
        if got != desc.digest:
            raise DigestMismatch(f"registry {self.registry.host}: {self.ref.repository}: "
                                 f"{what} {desc.digest}: the registry sent different content "
                                 f"({len(data)} bytes, digest {got}); nothing stored")
        return data

    def open_blob(self, desc: Descriptor):
        return self.registry.open_blob(self.ref.repository, desc.digest, desc.size)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.registry.has_blob(self.ref.repository, desc.digest)

    def close(self) -> None:
        self.registry.close()


@dataclasses.dataclass
class Pulled:
    name: str                       # the name it is recorded under
    image: Image
    layers: List[LayerInfo]         # bottom first
    fetched: List[str]              # blob digests downloaded by this pull
    unpacked: List[str]             # diff_ids unpacked by this pull
    downloaded: int                 # bytes
    store: str

    def lowers(self) -> List[str]:
        return [l.root for l in reversed(self.layers)]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "manifest": self.image.manifest_digest,
            "mediaType": self.image.manifest_media_type,
            "config": self.image.config_digest,
            "store": self.store,
            "layers": [{"digest": l.blob.digest, "diff_id": l.diff_id, "size": l.blob.size,
                        "fetched": l.blob.digest in self.fetched,
                        "unpacked_now": l.diff_id in self.unpacked}
                       for l in self.image.layers],
            "downloaded": self.downloaded,
        }


class _Tee:
    """Reads the registry's stream, hands every byte to the blob writer as well, and hashes
    it (to tell a registry that sent other bytes from a layer that is bad in itself)."""

    def __init__(self, stream, writer, algo: str):
        self.stream = stream
        self.writer = writer
        self.hasher = _digest.new_hasher(algo)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.stream.read(n if n and n > 0 else 1 << 20)
        if b:
            self.writer.write(b)
            self.hasher.update(b)
            self.count += len(b)
        return b

    def drain(self, limit: int) -> None:
        while self.count <= limit:
            if not self.read(1 << 20):
                break

    def digest(self) -> str:
        return f"{self.hasher.name}:{self.hasher.hexdigest()}"


class _AlreadyThere(Exception):
    """Another process unpacked the layer while we waited for its lock."""


def _is_enospc(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


class _Puller:
    def __init__(self, src: RegistrySource, image: Image, store: Store, progress: Progress,
                 oci_markers: bool, jobs: int):
        self.src = src
        self.registry = src.registry
        self.image = image
        self.store = store
        self.progress = progress
        self.oci_markers = oci_markers
        self.jobs = max(1, jobs)
        self.cancel = threading.Event()
        self.fetched: List[str] = []
        self.unpacked: List[str] = []
        self.downloaded = 0
        self._lock = threading.Lock()

    def run(self) -> List[LayerInfo]:
        layers = self.image.layers
        infos: List[Optional[LayerInfo]] = [None] * len(layers)
        todo = []
        for i, layer in enumerate(layers):
            info = self.store.layer_info(layer.diff_id, self.oci_markers)
            if info is None:
                todo.append(i)
            else:
                infos[i] = info
        if not todo:
            return infos                                    # type: ignore[return-value]
        pool = concurrent.futures.ThreadPoolExecutor(min(self.jobs, len(todo)),
                                                     thread_name_prefix="pull")
        futures = {pool.submit(self._layer, i, layers[i]): i for i in todo}
        try:
            error: Optional[BaseException] = None
            for fut in concurrent.futures.as_completed(futures):
                try:
                    infos[futures[fut]] = fut.result()
                except Cancelled:
                    pass
                except BaseException as e:              # first real error wins
                    if error is None:
                        error = e
                    self.cancel.set()
            if error is not None:
                raise error
        except BaseException:
            self.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return infos                                        # type: ignore[return-value]

    def _what(self, i: int, layer: Layer) -> str:
        return (f"{self.src.description}: layer {i + 1}/{len(self.image.layers)} "
                f"({_digest.short(layer.blob.digest)})")

    def _layer(self, i: int, layer: Layer) -> LayerInfo:
        what = self._what(i, layer)
        try:
            return self._layer_inner(i, layer, what)
        except Cancelled:
            raise
        except (OSError, ImageError) as e:
            if _is_enospc(e):
                raise StoreError(f"store {self.store.path}: disk full while pulling {what}; "
                                 "nothing of the layer was kept") from None
            if isinstance(e, OSError):
                raise StoreError(f"{what}: {e.strerror or e}") from None
            raise

    def _layer_inner(self, i: int, layer: Layer, what: str) -> LayerInfo:
        if self.cancel.is_set():
            raise Cancelled()
        desc = f"layer {i + 1}/{len(self.image.layers)} {_digest.short(layer.blob.digest)}"
        kw = dict(diff_id=layer.diff_id, media_type=layer.blob.media_type,
                  blob_digest=layer.blob.digest, blob_size=layer.blob.size,
                  oci_markers=self.oci_markers, what=what)
        if self.store.has_blob(layer.blob.digest):
            with self.store.open_blob(layer.blob.digest) as f, \
                    self.progress.task(desc, total=layer.blob.size) as task:
                info = self.store.unpack_layer(f, task=task, **kw)
            self._note(unpacked=layer.diff_id)
            return info
        try:
            with self.progress.task(desc, total=layer.blob.size) as task, \
                    self.registry.open_blob(self.src.ref.repository, layer.blob.digest,
                                            layer.blob.size, self.cancel) as stream, \
                    self.store.blob_writer(layer.blob.digest, layer.blob.size) as w:
                tee = _Tee(stream, w, layer.blob.digest.split(":", 1)[0])
                try:
                    info = self.store.unpack_layer(tee, task=task, **kw)
                except (CorruptData, HostileArchive, DigestMismatch, StoreError) as e:
                    if isinstance(e, StoreError) and _is_enospc(e):
                        raise
                    self._blame_registry(tee, layer, e)
                    raise
                if tee.count == 0:
                    raise _AlreadyThere()
                self._note(fetched=layer.blob.digest, unpacked=layer.diff_id, n=tee.count)
        except _AlreadyThere:
            got = self.store.layer_info(layer.diff_id, self.oci_markers)
            if got is None:
                raise StoreError(f"{what}: the layer vanished from the store") from None
            return got
        except RegistryNotFound:
            raise RegistryNotFound(f"registry {self.registry.host}: {self.src.ref.repository}: "
                                   f"blob {layer.blob.digest} not found (layer "
                                   f"{i + 1}/{len(self.image.layers)})") from None
        return info

    def _blame_registry(self, tee: _Tee, layer: Layer, e: BaseException) -> None:
        """If the bytes the registry sent are not the blob it promised, say that (and not
        "corrupt gzip stream"): read the rest of the blob and compare digests."""
        try:
            tee.drain(layer.blob.size)
        except (ImageError, OSError, Cancelled):
            return
        got = tee.digest()
        if got != layer.blob.digest or tee.count != layer.blob.size:
            raise DigestMismatch(
                f"registry {self.registry.host}: {self.src.ref.repository}: blob "
                f"{layer.blob.digest}: the registry sent different content ({tee.count} bytes, "
                f"digest {got}); discarded, nothing stored") from None

    def _note(self, fetched: Optional[str] = None, unpacked: Optional[str] = None,
              n: int = 0) -> None:
        with self._lock:
            if fetched:
                self.fetched.append(fetched)
            if unpacked:
                self.unpacked.append(unpacked)
            self.downloaded += n


def pull(reference: str, *, store: Union[None, str, Store] = None,
         platform: Union[None, str, Platform] = None, options: Optional[Options] = None,
         progress: Optional[Progress] = None, oci_markers: bool = False) -> Pulled:
    """Pull ``reference`` (``[HOST[:PORT]/]REPO[:TAG|@DIGEST]``) into the store; see the
    module docstring. Returns what was pulled."""
    ref = _reference.parse(reference)
    options = options or Options()
    progress = progress or Progress()
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    registry = Registry(ref.host, ref.api_host, options)
    with RegistrySource(registry, ref) as src, open_store(store) as s:
        image = src.resolve(ref.tag if not ref.digest else None, ref.digest, platform)
        with s.adding():
            puller = _Puller(src, image, s, progress, oci_markers, options.jobs)
            infos = puller.run()
            s.record_image(ref.name, image)
        return Pulled(ref.name, image, infos, puller.fetched, puller.unpacked,
                      puller.downloaded, s.path)


def resolve(reference: str, *, platform: Union[None, str, Platform] = None,
            options: Optional[Options] = None) -> Tuple[_reference.RegistryRef, Image]:
    """The verified manifest and config of a registry image (no layer is fetched)."""
    ref = _reference.parse(reference)
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    registry = Registry(ref.host, ref.api_host, options or Options())
    with RegistrySource(registry, ref) as src:
        return ref, src.resolve(ref.tag if not ref.digest else None, ref.digest, platform)
