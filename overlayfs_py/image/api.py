"""The image half's Python API: resolve an image, unpack it into the store, plan a mount,
show its history, diff an upper layer, commit it as a new layer.

Everything the command line does is here as a function taking plain arguments; the command
line (``cmdline.py``) only parses argv and prints. Mounting itself belongs to the daemon's
half: ``prepare_mount`` returns a ``MountPlan`` (the lower directories, top first, the mount
options the store needs, and the leases that keep the layers from being removed), and the
caller -- ``overlayfs_py.cli`` or ``overlayfs_py.image_mount`` -- mounts it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple, Union

from . import digest as _digest
from . import history as _history
from . import reference
from .errors import ImageError, NotFound
from .history import HistoryEntry, scan_layer_size
from .manifest import Image, Platform
from .progress import Progress
from .source import Source, open_source
from .store import LayerInfo, Lease, Store, default_path

if TYPE_CHECKING:                 # commit and diff load when used: not at every start-up
    from .commit import CommitResult
    from .diff import Change

StoreArg = Union[None, str, Store]


@contextlib.contextmanager
def open_store(store: StoreArg = None) -> Iterator[Store]:
    """``store`` may be a Store (used as is), a path, or None (the default place)."""
    if isinstance(store, Store):
        yield store
        return
    s = Store(store)
    try:
        yield s
    finally:
        s.close()


def _platform(platform) -> Optional[Platform]:
    if platform is None or isinstance(platform, Platform):
        return platform
    return Platform.parse(platform)


@contextlib.contextmanager
def open_image(source: str, *, store: Optional[Store] = None,
               platform: Union[None, str, Platform] = None
               ) -> Iterator[Tuple[Image, Source, reference.SourceRef]]:
    """Resolve ``source`` (``SOURCE[:TAG]``, ``SOURCE@DIGEST`` or a stored image's name);
    yields (image, the open source to read its blobs from, the parsed reference)."""
    ref = reference.parse(source)
    src = open_source(ref, store)
    try:
        image = src.resolve(ref.tag, ref.digest, _platform(platform))
        yield image, src, ref
    finally:
        src.close()


def resolve(source: str, *, store: StoreArg = None,
            platform: Union[None, str, Platform] = None) -> Image:
    """The verified manifest and config of an image (no layer is read)."""
    ref = reference.parse(source)
    if ref.kind == "store":
        with open_store(store) as s, open_image(source, store=s, platform=platform) as (im, _, _):
            return im
    with open_image(source, platform=platform) as (image, _src, _ref):
        return image


@dataclasses.dataclass
class Unpacked:
    image: Image
    layers: List[LayerInfo]          # bottom first, as in the manifest
    unpacked: List[str]              # diff_ids unpacked by this call (others were stored)
    warnings: List[str]
    store: str

    def lowers(self) -> List[str]:
        """The layer trees as an overlay's lowerdir list wants them: top first."""
        return [l.root for l in reversed(self.layers)]

    def to_json(self) -> dict:
        return {
            "image": self.image.source,
            "manifest": self.image.manifest_digest,
            "config": self.image.config_digest,
            "store": self.store,
            "layers": [{"diff_id": l.diff_id, "path": l.root, "size": l.size,
                        "entries": l.entries, "unpacked_now": l.diff_id in self.unpacked}
                       for l in self.layers],
            "lowerdir": self.lowers(),
            "warnings": self.warnings,
        }


def unpack_layers(image: Image, src: Source, store: Store, *, oci_markers: bool = False,
                  progress: Optional[Progress] = None) -> Unpacked:
    """Unpack every layer of ``image`` that the store lacks (verified, atomic)."""
    progress = progress or Progress()
    infos: List[LayerInfo] = []
    fresh: List[str] = []
    warnings: List[str] = []
    n = len(image.layers)
    for i, layer in enumerate(image.layers, 1):
        info = store.layer_info(layer.diff_id, oci_markers)
        if info is None:
            what = f"{image.source}: layer {i}/{n} ({_digest.short(layer.blob.digest)})"
            try:
                stream = src.open_blob(layer.blob)
            except NotFound:
                raise NotFound(f"{what}: not in the store, and its blob is missing") from None
            with stream, progress.task(f"layer {i}/{n} {_digest.short(layer.diff_id)}",
                                       total=layer.blob.size) as task:
                info = store.unpack_layer(stream, diff_id=layer.diff_id,
                                          media_type=layer.blob.media_type,
                                          blob_digest=layer.blob.digest,
                                          blob_size=layer.blob.size, oci_markers=oci_markers,
                                          task=task, what=what)
            if info.fresh:                   # not made meanwhile by another process
                fresh.append(layer.diff_id)
                warnings += [f"layer {i}/{n}: {w}" for w in info.warnings]
        infos.append(info)
    return Unpacked(image, infos, fresh, warnings, store.path)


def record_name(ref: reference.SourceRef) -> str:
    """The name an image from a file source is recorded under in the store."""
    if ref.kind == "store":
        return ref.path
    return str(dataclasses.replace(ref, path=os.path.abspath(ref.path)))


def unpack(source: str, *, store: StoreArg = None, platform: Union[None, str, Platform] = None,
           oci_markers: bool = False, progress: Optional[Progress] = None,
           record: bool = True) -> Unpacked:
    """Resolve ``source`` and unpack what the store lacks; record the image in the store
    (under ``oci-archive:/abs/path:tag`` and the like) unless ``record`` is false."""
    with open_store(store) as s:
        with s.adding(), open_image(source, store=s, platform=platform) as (image, src, ref):
            result = unpack_layers(image, src, s, oci_markers=oci_markers, progress=progress)
            if record and ref.kind != "store":
                s.record_image(record_name(ref), image)
        return result


@dataclasses.dataclass
class MountPlan:
    """What a mount of an image needs. Close it (or use ``with``) once the daemon runs: the
    daemon keeps its own copy of the leases."""
    unpacked: Unpacked
    lowers: List[str]                # top first
    options: Tuple[str, ...]         # mount options the store needs (userxattr)
    lease: Lease

    @property
    def lease_fds(self) -> List[int]:
        return list(self.lease.fds)

    def close(self) -> None:
        self.lease.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prepare_mount(source: str, *, store: StoreArg = None,
                  platform: Union[None, str, Platform] = None, oci_markers: bool = False,
                  progress: Optional[Progress] = None) -> MountPlan:
    """Unpack what is missing and lease the layers (nothing can remove them in between)."""
    with open_store(store) as s:
        with s.adding():
            result = unpack(source, store=s, platform=platform, oci_markers=oci_markers,
                            progress=progress)
            lease = s.lease(result.image.diff_ids, oci_markers)
        lowers = result.lowers() or [s.empty_dir()]
        options = ("userxattr",) if s.userxattr else ()
        return MountPlan(result, lowers, options, lease)


def _existing_store(store: StoreArg) -> Optional[Store]:
    """The store if it exists (never made just to be read), else None."""
    if isinstance(store, Store):
        return store
    path = store or default_path()
    if os.path.exists(os.path.join(path, "store.json")):
        return Store(path)
    return None


def history(source: str, *, store: StoreArg = None,
            platform: Union[None, str, Platform] = None) -> Tuple[Image, List[HistoryEntry]]:
    """The image and its history rows, top first (see ``history.py``)."""
    s = _existing_store(store)
    try:
        with open_image(source, store=s, platform=platform) as (image, src, _ref):
            def size(i: int, layer) -> int:
                info = s.layer_info(layer.diff_id) if s is not None else None
                if info is not None:
                    return info.size
                with src.open_blob(layer.blob) as f:
                    return scan_layer_size(f, layer, f"{image.source}: layer {i + 1}")
            return image, _history.history(image, size)
    finally:
        if s is not None and s is not store:
            s.close()


def diff(upper: str, *, lowers: Sequence[str] = (), image: Optional[str] = None,
         store: StoreArg = None, platform: Union[None, str, Platform] = None,
         content: bool = False, progress: Optional[Progress] = None) -> List[Change]:
    """What ``upper`` changed (see ``diff.py``). The lower layers are ``lowers`` (top first)
    or those of ``image``, unpacked into the store as needed."""
    if image is not None:
        if lowers:
            raise ImageError("give the lower layers either as directories or as an image")
        lowers = unpack(image, store=store, platform=platform, progress=progress).lowers()
    from .diff import diff as diff_upper       # (the package's ``diff`` is this function)
    return diff_upper(upper, lowers, content=content)


def commit(upper: str, to: str, *, from_image: Optional[str] = None, store: StoreArg = None,
           platform: Union[None, str, Platform] = None, compression: str = "gzip",
           created_by: Optional[str] = None, comment: Optional[str] = None,
           author: Optional[str] = None, source_date_epoch: Optional[str] = None,
           progress: Optional[Progress] = None) -> CommitResult:
    """Write ``upper`` as a new layer on ``from_image`` into the layout ``to``
    (``LAYOUT[:TAG]``); see ``commit.py``. ``source_date_epoch`` defaults to
    ``$SOURCE_DATE_EPOCH``."""
    from .commit import commit as commit_upper
    from .commit import source_date_epoch as epoch_of
    epoch = epoch_of(source_date_epoch)
    if from_image is None:
        return commit_upper(upper, to, compression=compression, created_by=created_by,
                            comment=comment, author=author, epoch=epoch, progress=progress)
    ref = reference.parse(from_image)
    opened: List[Store] = []

    def the_store() -> Store:
        if isinstance(store, Store):
            return store
        if not opened:
            opened.append(Store(store))
        return opened[0]

    try:
        with open_image(from_image, store=the_store() if ref.kind == "store" else None,
                        platform=platform) as (image, src, _ref):
            def base_lowers() -> List[str]:
                return unpack_layers(image, src, the_store(), progress=progress).lowers()
            return commit_upper(upper, to, base=image, base_source=src,
                                base_lowers=base_lowers, compression=compression,
                                created_by=created_by, comment=comment, author=author,
                                epoch=epoch, progress=progress)
    finally:
        for s in opened:
            s.close()
