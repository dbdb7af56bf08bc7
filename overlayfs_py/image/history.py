"""How an image was built, as ``docker history`` shows it: one row per config history entry,
top first, with the instruction that made it, the size of the layer it made (unpacked: the
bytes of its files, each hard-linked file once) and the layer's digest. Entries that made no
layer (``ENV``, ``CMD``... ``empty_layer: true``) show size 0.

Sizes come from the store when the layer is unpacked there, otherwise from reading the
layer's tar (headers only, the blob verified against its digests as it streams).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

from .compression import LayerReader
from .errors import CorruptData
from .manifest import Image, Layer
from .tarstream import members


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    created: Optional[str]
    created_by: str
    comment: str
    author: str
    empty_layer: bool
    size: int
    digest: Optional[str]         # the layer blob's digest (None for an empty entry)
    diff_id: Optional[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def scan_layer_size(stream, layer: Layer, what: str) -> int:
    """Bytes of file data in a layer blob, read (and verified) without unpacking it."""
    reader = LayerReader(stream, layer.compression, blob_digest=layer.blob.digest,
                         diff_id=layer.diff_id, blob_size=layer.blob.size, what=what)
    size = 0
    try:
        for m in members(reader):
            if m.isreg():
                size += m.size
    except CorruptData as e:
        raise CorruptData(f"{what}: {e}") from None
    reader.finish()
    return size


def history(image: Image, layer_size: Callable[[int, Layer], int]) -> List[HistoryEntry]:
    """Rows top first. ``layer_size(index, layer)`` gives a layer's unpacked size."""
    raw = image.config.get("history")
    entries = [h for h in raw if isinstance(h, dict)] if isinstance(raw, list) else []
    rows: List[HistoryEntry] = []
    layers = list(image.layers)
    n = 0

    def text(h, key):
        v = h.get(key)
        return v if isinstance(v, str) else ""

    for h in entries:
        empty = bool(h.get("empty_layer"))
        layer = None
        if not empty and n < len(layers):
            layer = layers[n]
            n += 1
        rows.append(HistoryEntry(
            text(h, "created") or None, text(h, "created_by"), text(h, "comment"),
            text(h, "author"), empty or layer is None,
            layer_size(n - 1, layer) if layer is not None else 0,
            layer.blob.digest if layer is not None else None,
            layer.diff_id if layer is not None else None))
    while n < len(layers):          # layers without a history entry
        layer = layers[n]
        rows.append(HistoryEntry(None, "", "", "", False, layer_size(n, layer),
                                 layer.blob.digest, layer.diff_id))
        n += 1
    rows.reverse()
    return rows


def human_size(n: int) -> str:
    """Decimal units, as docker prints them: 0B, 532B, 12.3kB, 74.8MB, 1.2GB."""
    if n < 1000:
        return f"{n}B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if n < 1000 or unit == "TB":
            return f"{n:.3g}{unit}" if n < 100 else f"{n:.0f}{unit}"
    return f"{n}B"
