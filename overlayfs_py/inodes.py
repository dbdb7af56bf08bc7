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
_INO_MASK = (1 << _LAYER_SHIFT) - 1
_FALLBACK_BASE = 1 << 62

Key = Tuple[int, int, int]          # (layer, st_dev, st_ino) of the object that identifies a node


class Node:
    """One object of the merged view.

    ``paths`` lists the (parent node, name) pairs it is known by (several for hard links):
    the first is kept in ``parent`` and ``name``, any others in ``more``; a node with no
    name has ``parent`` None. ``layers`` is the top layer first: one entry for a
    non-directory, and for a directory every layer it merges. ``key`` is given as a
    (layer, st_dev, st_ino) tuple; the InodeTable keeps it packed.

    A directory is a ``DirNode`` (``Node(..., is_dir=True, ...)`` makes one), which also has
    ``index``, its merged listing (name -> occurrences), ``listing``, the same names in
    readdir order (readdir.Listing), and ``kids``, its child nodes by name. A file has no
    room for them (they read as None): a walk of a big tree makes mostly files, and every
    slot is 8 bytes on each of them.
    """

    __slots__ = ("ino", "parent", "name", "more", "layers", "nlookup", "key",
                 "handles", "unlinked", "attr", "backing", "nocap")

    is_dir = False
    index = listing = kids = None

    def __new__(cls, ino, parent, name, is_dir, layers, key):
        return object.__new__(DirNode if is_dir else Node)

    def __init__(self, ino: int, parent: Optional["Node"], name: bytes, is_dir: bool,
                 layers, key: Optional[Key]):
        self.ino = ino
        self.parent = parent
        self.name = name if parent is not None else b""
        self.more: Optional[List[Tuple["Node", bytes]]] = None
        self.layers = layers
        self.nlookup = 0
        self.key = key
        self.handles = None          # set of open file handles, created on demand
        # passthrough.Backing while passthrough opens use it; False once they did (the
        # kernel's page cache of the inode may be stale then); None if never
        self.backing = None
        self.nocap = False           # known to have no security.capability (ops.getxattr)
        self.unlinked = False
        # Cached reply attributes, valid because the layers change only through us
        # (overlayfs.rst: changing them under a mounted overlay is undefined). Every
        # operation that changes an object clears them.
        self.attr = None

    @property
    def paths(self) -> List[Tuple["Node", bytes]]:
        """The (parent, name) pairs, first one first (a new list: change it with the
        methods below)."""
        if self.parent is None:
            return []
        first = [(self.parent, self.name)]
        return first + self.more if self.more else first

    def _set_paths(self, paths: List[Tuple["Node", bytes]]) -> None:
        if paths:
            self.parent, self.name = paths[0]
            self.more = paths[1:] or None
        else:
            self.parent, self.name, self.more = None, b"", None

    @property
    def layer(self) -> int:
        return self.layers[0]

    def add_path(self, parent: "Node", name: bytes) -> None:
        if self.parent is None:
            self.parent, self.name = parent, name
        elif (parent, name) not in self.paths:
            if self.more is None:
                self.more = []
            self.more.append((parent, name))

    def remove_path(self, parent: "Node", name: bytes) -> None:
        paths = self.paths
        try:
            paths.remove((parent, name))
        except ValueError:
            return
        self._set_paths(paths)

    def put_path_first(self, parent: "Node", name: bytes) -> None:
        """Make (parent, name) the first path, adding it if it is not one yet."""
        paths = self.paths
        if (parent, name) in paths:
            paths.remove((parent, name))
        paths.insert(0, (parent, name))
        self._set_paths(paths)

    def keep_first_path(self) -> None:
        self.more = None

    def relpath(self) -> bytes:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<Node {self.ino} /{self.relpath().decode(errors='replace')} layers={self.layers}>"


class DirNode(Node):
    """A directory: a Node with its merged index, readdir listing and child nodes."""

    __slots__ = ("index", "listing", "kids")

    is_dir = True

    def __init__(self, ino: int, parent: Optional[Node], name: bytes, is_dir: bool,
                 layers, key: Optional[Key]):
        super().__init__(ino, parent, name, is_dir, layers, key)
        self.index = None
        self.listing = None
        self.kids = None


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
    ~100 bytes a node less than a (layer, st_dev, st_ino) tuple in a dict. A node numbered
    after its key keeps only the number of its (layer, st_dev) in ``key`` (a small int,
    which Python shares): st_ino is in its inode number (``_packed`` puts them together).
    That saves the ~40-byte packed int on most nodes."""

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

    @staticmethod
    def _packed(node: Node) -> Optional[int]:
        k = node.key
        if k is None or k >> 64:
            return k
        return k << 64 | (node.ino & _INO_MASK)

    def _holder(self, packed: int, key: Key) -> Optional[Node]:
        node = self.by_key.get(packed)
        if node is not None:
            return node
        node = self.nodes.get(derived_ino(key[0], key[2]))
        return node if node is not None and self._packed(node) == packed else None

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
        if node.ino != derived_ino(key[0], key[2]):
            node.key = packed
            self.by_key[packed] = node
        else:
            node.key = packed >> 64

    def add(self, node: Node) -> Node:
        """Add a node built with its key as a tuple (or None)."""
        key, node.key = node.key, None
        self.nodes[node.ino] = node
        if key is not None:
            self._bind(node, key)
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
            packed = self._packed(node)
            if self.by_key.get(packed) is node:
                del self.by_key[packed]
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
