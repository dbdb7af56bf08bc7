"""The image half of overlayfs-py: container images in and out.

Read images from OCI layouts, OCI archives and Docker archives (``reference``, ``layout``,
``archive``, ``manifest``), unpack their layers into a content-addressed store in the
kernel's on-disk format (``store``, ``unpack``, ``compression``, ``ondisk``), plan mounts of
them (``api.prepare_mount``), show how they were built (``history``), what a container's
upper layer changed (``diff``, over ``tree``), and commit it as a new layer (``commit``);
layer tars are read and written by ``tarstream``. This package never imports the daemon's
modules, and the daemon never imports it: ``overlayfs_py.cli`` and
``overlayfs_py.image_mount`` join the two.

Public API (all also reachable as ``overlayfs_py.image.<name>``)::

    resolve(source, store=None, platform=None) -> Image
    unpack(source, store=None, platform=None, oci_markers=False, progress=None) -> Unpacked
    prepare_mount(source, ...) -> MountPlan
    history(source, store=None) -> (Image, [HistoryEntry])       top first
    diff(upper, lowers=() | image=SOURCE, content=False) -> [Change]
    commit(upper, to="LAYOUT[:TAG]", from_image=SOURCE, compression="gzip") -> CommitResult
    Store(path=None)                      the content-addressed store
    parse_reference(text) -> SourceRef
    pull(reference, store=None, platform=None, options=None, progress=None) -> Pulled
    push(source, reference, options=None, progress=None) -> Pushed
    login(host, username, password, authfile=None) -> str
    listing(store) -> dict; remove_images(names, store=None); prune(store=None) -> Removed
"""
from .api import (MountPlan, Unpacked, commit, diff, history, open_image, open_store,
                  prepare_mount, resolve, unpack)
from .history import HistoryEntry
from .errors import (CorruptData, DigestMismatch, HostileArchive, ImageError, NotFound,
                     StoreError, UnsupportedMediaType)
from .manifest import Descriptor, Image, Layer, Platform
from .progress import make_progress
from .reference import SourceRef
from .reference import parse as parse_reference
from .inventory import Removed, listing, prune, remove_images
from .store import LayerInfo, Lease, Store, default_path


def __getattr__(name: str):
    """``CommitResult`` and ``Change`` load their modules (commit, diff, xxhash) on first use,
    so that commands that need neither do not pay for them at start-up."""
    if name == "CommitResult":
        from .commit import CommitResult as value
    elif name == "Change":
        from .diff import Change as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def pull(reference, **kw):
    """Pull a registry image into the store; see ``registry.pull.pull``."""
    from .registry import pull as _pull
    return _pull(reference, **kw)


def push(source, reference, **kw):
    """Push an image (an OCI layout...) to a registry; see ``registry.push.push``."""
    from .registry import push as _push
    return _push(source, reference, **kw)


def login(host, username, password, **kw):
    """Check and store registry credentials; see ``registry.login``."""
    from .registry import login as _login
    return _login(host, username, password, **kw)

__all__ = [
    "Change", "CommitResult", "HistoryEntry", "commit", "diff", "history",
    "CorruptData", "Descriptor", "DigestMismatch", "HostileArchive", "Image", "ImageError",
    "Layer", "LayerInfo", "Lease", "MountPlan", "NotFound", "Platform", "SourceRef", "Store",
    "StoreError", "Unpacked", "UnsupportedMediaType", "default_path", "make_progress",
    "open_image", "open_store", "parse_reference", "prepare_mount", "resolve", "unpack",
    "Removed", "listing", "login", "prune", "pull", "push", "remove_images",
]
