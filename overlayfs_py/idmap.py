"""uidmapping=/gidmapping= translation, with fuse-overlayfs' semantics.

A triple ``A:B:LEN`` says that id A+i in the layers appears as B+i in the mount. Ids without a
mapping appear as the overflow id (65534), like ids outside a user namespace.
"""
from __future__ import annotations

from typing import Sequence, Tuple

OVERFLOW_ID = 65534


class IdMap:
    __slots__ = ("triples",)

    def __init__(self, triples: Sequence[Tuple[int, int, int]] = ()):
        self.triples = tuple(triples)

    def __bool__(self) -> bool:
        return bool(self.triples)

    def to_mount(self, layer_id: int) -> int:
        if not self.triples:
            return layer_id
        for layer, mount, length in self.triples:
            if layer <= layer_id < layer + length:
                return mount + (layer_id - layer)
        return OVERFLOW_ID

    def to_layer(self, mount_id: int) -> int:
        if not self.triples or mount_id == -1:
            return mount_id
        for layer, mount, length in self.triples:
            if mount <= mount_id < mount + length:
                return layer + (mount_id - mount)
        return OVERFLOW_ID
