"""What the store holds, and removing what no image uses: ``image list``, ``rm``, ``prune``.

An image record (``images/``) references its manifest, its config and its layer blobs
(``blobs/``), and its layers by ``diff_id`` (``layers/`` and ``layers-oci/``). Whatever no record
references is garbage: ``prune`` removes all of it, ``rm NAME`` removes the record and then
what only that record used.

A layer that a live mount uses is never removed: a mount holds a lease on each of its layers
(``Store.lease``) and ``Store.layer_in_use`` sees it; such layers are kept and reported.
Removal runs under the store's exclusive lock, so it never races a pull, an unpack or the
lease a new mount takes (those hold the shared lock). A layer is first renamed into ``tmp/``
(atomic: it is either whole in ``layers/`` or gone) and then deleted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from typing import Dict, Iterable, List, Optional, Set

from . import digest as _digest
from .errors import NotFound
from .fsutil import rmtree_at
from .store import Store


@dataclasses.dataclass
class Removed:
    images: List[str] = dataclasses.field(default_factory=list)
    layers: List[str] = dataclasses.field(default_factory=list)     # "diff_id" (+ " (oci)")
    blobs: List[str] = dataclasses.field(default_factory=list)
    kept_in_use: List[str] = dataclasses.field(default_factory=list)
    freed: int = 0                                                  # bytes (approximate)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _blob_size(store: Store, dg: str) -> int:
    try:
        return os.stat(store.blob_path(dg), follow_symlinks=False).st_size
    except OSError:
        return 0


def _stored_blobs(store: Store) -> List[str]:
    out = []
    for algo in ("sha256", "sha512"):
        try:
            names = os.listdir(os.path.join(store.path, "blobs", algo))
        except FileNotFoundError:
            continue
        out += [f"{algo}:{n}" for n in sorted(names) if _digest.is_digest(f"{algo}:{n}")]
    return out


def _references(records: Iterable[dict]):
    blobs: Set[str] = set()
    layers: Set[str] = set()
    for r in records:
        m = r.get("manifest") or {}
        if m.get("digest"):
            blobs.add(m["digest"])
        if r.get("config"):
            blobs.add(r["config"])
        for l in r.get("layers") or []:
            if l.get("digest"):
                blobs.add(l["digest"])
            if l.get("diff_id"):
                layers.add(l["diff_id"])
    return blobs, layers


def listing(store: Store) -> dict:
    """Images (name, manifest, layers, unpacked size) and layers (size, users, in use)."""
    records = store.images()
    layers = {(l.diff_id, l.format): l for l in store.layers(False) + store.layers(True)}
    users: Dict[str, List[str]] = {}
    for r in records:
        for l in r.get("layers") or []:
            users.setdefault(l.get("diff_id"), []).append(r["name"])
    images = []
    for r in records:
        ids = [l.get("diff_id") for l in r.get("layers") or []]
        size = sum(layers[(d, "kernel")].size for d in ids if (d, "kernel") in layers)
        images.append({
            "name": r["name"], "manifest": r["manifest"]["digest"], "config": r.get("config"),
            "layers": len(ids), "size": size,
            "compressed": sum(int(l.get("size") or 0) for l in r.get("layers") or []),
            "complete": all((d, "kernel") in layers or (d, "oci") in layers for d in ids),
            "recorded": r.get("recorded"),
        })
    out_layers = []
    for (diff_id, fmt), l in sorted(layers.items()):
        out_layers.append({
            "diff_id": diff_id, "format": fmt, "size": l.size, "entries": l.entries,
            "images": sorted(set(users.get(diff_id, []))),
            "in_use": store.layer_in_use(diff_id, fmt == "oci"), "path": l.root,
        })
    blobs = _stored_blobs(store)
    return {"store": store.path, "images": images, "layers": out_layers,
            "blobs": {"count": len(blobs), "size": sum(_blob_size(store, b) for b in blobs)}}


def _find_records(store: Store, name: str) -> List[dict]:
    records = store.images()
    hits = [r for r in records if r["name"] == name]
    if not hits:
        from .registry.reference import normalize
        alt = normalize(name)
        hits = [r for r in records if alt and r["name"] == alt]
    if not hits and _digest.is_digest(name):
        hits = [r for r in records if r["manifest"]["digest"] == name]
    if not hits and len(name) >= 6 and all(c in "0123456789abcdef" for c in name):
        hits = [r for r in records if r["manifest"]["digest"].split(":", 1)[1]
                .startswith(name)]
    return hits


def _remove_layer(store: Store, diff_id: str, oci: bool, removed: Removed) -> None:
    info = store.layer_info(diff_id, oci)
    if info is None:
        return
    if store.layer_in_use(diff_id, oci):
        removed.kept_in_use.append(diff_id + (" (oci)" if oci else ""))
        return
    algo, hexd = _digest.split(diff_id)
    base = "layers-oci" if oci else "layers"
    src = os.open(os.path.join(store.path, base, algo), os.O_RDONLY | os.O_DIRECTORY)
    tmp = os.open(os.path.join(store.path, "tmp"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        doomed = f"rm-{hexd[:16]}-{secrets.token_hex(4)}"
        os.rename(hexd, doomed, src_dir_fd=src, dst_dir_fd=tmp)
        with contextlib.suppress(OSError):
            os.fsync(src)
        rmtree_at(tmp, doomed)
    finally:
        os.close(src)
        os.close(tmp)
    removed.layers.append(diff_id + (" (oci)" if oci else ""))
    removed.freed += info.size


def _collect(store: Store, removed: Removed, only: Optional[Set[str]] = None) -> None:
    """Remove layers and blobs no record references (restricted to ``only`` if given)."""
    blobs_used, layers_used = _references(store.images())
    for oci in (False, True):
        for info in store.layers(oci):
            if info.diff_id in layers_used:
                continue
            if only is not None and info.diff_id not in only:
                continue
            _remove_layer(store, info.diff_id, oci, removed)
    for dg in _stored_blobs(store):
        if dg in blobs_used or (only is not None and dg not in only):
            continue
        size = _blob_size(store, dg)
        algo, hexd = _digest.split(dg)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(store.path, "blobs", algo, hexd))
            removed.blobs.append(dg)
            removed.freed += size


def remove_images(names: Iterable[str], *, store=None) -> Removed:
    """Forget the named images (``rm``), then remove what only they used; layers a live
    mount uses stay. NotFound (nothing removed) if a name matches no image."""
    from .api import open_store
    removed = Removed()
    with open_store(store) as s:
        s.remove_stale_temporaries()
        with s.exclusive():
            targets = []
            for name in names:
                hits = _find_records(s, name)
                if not hits:
                    raise NotFound(f"no image {name!r} in the store {s.path}")
                targets += hits
            only: Set[str] = set()
            b, l = _references(targets)
            only |= b | l
            for r in {r["name"]: r for r in targets}.values():
                if s.remove_image_record(r["name"]):
                    removed.images.append(r["name"])
            _collect(s, removed, only)
    return removed


def prune(*, store=None) -> Removed:
    """Remove every layer and blob that no image record references (``prune``); layers a
    live mount uses stay. Stale temporaries go too."""
    from .api import open_store
    removed = Removed()
    with open_store(store) as s:
        s.remove_stale_temporaries()
        with s.exclusive():
            _collect(s, removed)
    return removed
