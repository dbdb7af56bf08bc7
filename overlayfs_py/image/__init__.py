"""The image half of overlayfs-py: container images in and out.

Read images from OCI layouts, OCI archives and Docker archives (``reference``, ``layout``,
``archive``, ``manifest``), unpack their layers into a content-addressed store in the
kernel's on-disk format (``store``, ``unpack``, ``compression``, ``ondisk``), plan mounts of
them (``api.prepare_mount``), show how they were built (``history``), what a container's
upper layer changed (``diff``, over ``tree``), and commit it as a new layer (``commit``). This package never imports the daemon's modules, and the
daemon never imports it: ``overlayfs_py.cli`` and ``overlayfs_py.image_mount`` join the two.

Public API (all also reachable as ``overlayfs_py.image.<name>``)::

    resolve(source, store=None, platform=None) -> Image
    unpack(source, store=None, platform=None, oci_markers=False, progress=None) -> Unpacked
    prepare_mount(source, ...) -> MountPlan
    history(source, store=None) -> (Image, [HistoryEntry])       top first
    diff(upper, lowers=() | image=SOURCE, content=False) -> [Change]
    commit(upper, to="LAYOUT[:TAG]", from_image=SOURCE, compression="gzip") -> CommitResult
    Store(path=None)                      the content-addressed store
    parse_reference(text) -> SourceRef
"""
from .api import (MountPlan, Unpacked, commit, diff, history, open_image, open_store,
                  prepare_mount, resolve, unpack)
from .commit import CommitResult
from .diff import Change
from .history import HistoryEntry
from .errors import (CorruptData, DigestMismatch, HostileArchive, ImageError, NotFound,
                     StoreError, UnsupportedMediaType)
from .manifest import Descriptor, Image, Layer, Platform
from .progress import make_progress
from .reference import SourceRef
from .reference import parse as parse_reference
from .store import LayerInfo, Lease, Store, default_path

__all__ = [
    "Change", "CommitResult", "HistoryEntry", "commit", "diff", "history",
    "CorruptData", "Descriptor", "DigestMismatch", "HostileArchive", "Image", "ImageError",
    "Layer", "LayerInfo", "Lease", "MountPlan", "NotFound", "Platform", "SourceRef", "Store",
    "StoreError", "Unpacked", "UnsupportedMediaType", "default_path", "make_progress",
    "open_image", "open_store", "parse_reference", "prepare_mount", "resolve", "unpack",
]
