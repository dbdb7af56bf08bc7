"""The inode table: FUSE inode numbers <-> nodes of the merged view, and lookup counts.

Inode numbers are derived from the backing object, ``(layer + 1) << 48 | st_ino``: unique across
layers, equal for hard links within a layer, and the same across lookups and remounts. A copied-up
object keeps the number it had (the kernel keeps st_ino across copy-up too). If a derived number
is still held by a different live node (ext4 reuses inode numbers of deleted files the kernel may
still reference), a number from a private counter range is used instead, so a FUSE nodeid is never
reused while the kernel knows it.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import pyfuse3

ROOT_INODE = pyfuse3.ROOT_INODE
_LAYER_SHIFT = 48
_FALLBACK_BASE = 1 << 62

Key = Tuple[int, int, int]          # (layer, st_dev, st_ino) of the object that identifies a node


class Node:
    """One object of the merged view.

    ``paths`` holds the (parent node, name) pairs it is known by (several for hard links).
    ``layers`` is the top layer first: one entry for a non-directory, and for a directory every
    layer it merges (None until first needed). ``index`` caches a directory's merged listing
    (name -> occurrences), ``listing`` the same names in readdir order (readdir.Listing).
    ``key`` is given as a (layer, st_dev, st_ino) tuple; the InodeTable keeps it packed.
    """

    __slots__ = ("ino", "paths", "is_dir", "layers", "nlookup", "key", "index", "listing",
                 "handles", "unlinked", "attr", "kids", "backing", "nocap")

    def __init__(self, ino: int, parent: Optional["Node"], name: bytes, is_dir: bool,
                 layers, key: Optional[Key]):
        self.ino = ino
        self.paths: List[Tuple["Node", bytes]] = [(parent, name)] if parent is not None else []
        self.is_dir = is_dir
        self.layers = layers
        self.nlookup = 0
        self.key = key
        self.index = None
        self.listing = None
        self.handles = None          # set of open file handles, created on demand
        # passthrough.Backing while passthrough opens use it; False once they did (the
        # kernel's page cache of the inode may be stale then); None if never
        self.backing = None
        self.nocap = False           # known to have no security.capability (ops.getxattr)
        self.unlinked = False
        # Caches, valid because the layers change only through us (overlayfs.rst: changing
        # them under a mounted overlay is undefined): the reply attributes, and for a
        # directory the child nodes by name. Every operation that changes an object or a
        # name clears the matching entry.
        self.attr = None
        self.kids = None

    @property
    def parent(self) -> Optional["Node"]:
        return self.paths[0][0] if self.paths else None

    @property
    def name(self) -> bytes:
        return self.paths[0][1] if self.paths else b""

    @property
    def layer(self) -> int:
        return self.layers[0]

    def add_path(self, parent: "Node", name: bytes) -> None:
        if (parent, name) not in self.paths:
            self.paths.append((parent, name))

    def remove_path(self, parent: "Node", name: bytes) -> None:
        try:
            self.paths.remove((parent, name))
        except ValueError:
            pass

    def relpath(self) -> bytes:
        parts = []
        node = self
        while node.paths:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<Node {self.ino} /{self.relpath().decode(errors='replace')} layers={self.layers}>"


def derived_ino(layer: int, st_ino: int) -> Optional[int]:
    if st_ino >= 1 << _LAYER_SHIFT:
        return None
    return ((layer + 1) << _LAYER_SHIFT) | st_ino


class InodeTable:
    """ino -> node, and the node backed by an object (its key).

    A key is stored packed into one int (a number for its (layer, st_dev), then st_ino), and
    most nodes need no entry in ``by_key``: a file's inode number is derived from its key, so
    ``nodes[derived_ino(key)]`` finds it. ``by_key`` holds only the others (a merged directory
    numbered after its bottom layer, a copied-up file keeping its number, a fallback number).
    A node whose key was dropped, or taken over by a newer node, has ``key`` None. That is
    ~100 bytes a node less than a (layer, st_dev, st_ino) tuple in a dict."""

    def __init__(self, root: Node):
        self.nodes: Dict[int, Node] = {ROOT_INODE: root}
        self.by_key: Dict[int, Node] = {}
        self._devs: Dict[Tuple[int, int], int] = {}     # (layer, st_dev) -> number
        self._fallback = itertools.count(_FALLBACK_BASE)
        root.nlookup = 1

    def __len__(self) -> int:
        return len(self.nodes)

    def get(self, ino: int) -> Optional[Node]:
        return self.nodes.get(ino)

    def _pack(self, key: Key) -> int:
        layer, dev, st_ino = key
        n = self._devs.get((layer, dev))
        if n is None:
            n = self._devs[(layer, dev)] = len(self._devs) + 1
        return n << 64 | st_ino

    def _holder(self, packed: int, key: Key) -> Optional[Node]:
        node = self.by_key.get(packed)
        if node is not None:
            return node
        node = self.nodes.get(derived_ino(key[0], key[2]))
        return node if node is not None and node.key == packed else None

    def find(self, key: Key) -> Optional[Node]:
        return self._holder(self._pack(key), key)

    def new_ino(self, key: Key) -> int:
        ino = derived_ino(key[0], key[2])
        if ino is None or ino in self.nodes:
            ino = next(self._fallback)
        return ino

    def _bind(self, node: Node, key: Key) -> None:
        packed = self._pack(key)
        old = self._holder(packed, key)
        if old is not None and old is not node:
            self.drop_key(old)                     # the newer node is found by this key now
        node.key = packed
        if node.ino != derived_ino(key[0], key[2]):
            self.by_key[packed] = node

    def add(self, node: Node) -> Node:
        """Add a node built with its key as a tuple (or None)."""
        self.nodes[node.ino] = node
        if node.key is not None:
            self._bind(node, node.key)
        return node

    def rekey(self, node: Node, key: Key) -> None:
        """The node is now backed by another object (copy-up): find it by that one instead.

        The old key is dropped: a lower hard link of the copied file is another file now, as in
        the kernel without index=on."""
        self.drop_key(node)
        self._bind(node, key)

    def drop_key(self, node: Node) -> None:
        """The backing object is gone from the namespace; a new object may reuse its numbers."""
        if node.key is not None:
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
            node.key = None

    def forget(self, ino: int, n: int) -> Optional[Node]:
        """Drop n kernel references; return the node if that removed it from the table."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return None
        node.nlookup -= n
        if node.nlookup > 0:
            return None
        del self.nodes[ino]
        self.drop_key(node)
        return node
