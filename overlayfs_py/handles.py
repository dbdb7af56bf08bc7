"""Open file and directory handles.

A file handle holds a real fd on the backing file. A read-only handle opened on a lower file is
moved to the upper copy when the file is copied up, so every reader sees the written data (the
kernel's overlay would keep showing the old lower data to such a reader: see the README).
A directory handle (used only when the kernel sends OPENDIR, i.e. with an unpatched pyfuse3)
holds a snapshot of the merged listing taken when the listing starts (readdir.Listing).
"""
from __future__ import annotations

import itertools
import os
from typing import Dict, Optional

from .inodes import Node
from .readdir import Listing


class FileHandle:
    __slots__ = ("fh", "fd", "node", "flags", "writable", "nowait")

    def __init__(self, fh: int, fd: int, node: Node, flags: int, writable: bool):
        self.fh, self.fd, self.node, self.flags, self.writable = fh, fd, node, flags, writable
        self.nowait = True          # the file's filesystem may take RWF_NOWAIT reads

    def reopen_after_copy_up(self, ov, parent: Node, name: bytes) -> None:
        if self.writable:
            return
        from .overlay import UPPER
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=ov.dirfd(parent, UPPER))
        old, self.fd = self.fd, fd
        self.nowait = True
        os.close(old)


class DirHandle:
    __slots__ = ("fh", "node", "listing")

    def __init__(self, fh: int, node: Node):
        self.fh, self.node = fh, node
        self.listing: Optional[Listing] = None


class HandleTable:
    def __init__(self):
        self._next = itertools.count(1)
        self.files: Dict[int, FileHandle] = {}
        self.dirs: Dict[int, DirHandle] = {}

    def open_file(self, fd: int, node: Node, flags: int, writable: bool) -> FileHandle:
        h = FileHandle(next(self._next), fd, node, flags, writable)
        self.files[h.fh] = h
        if node.handles is None:
            node.handles = set()
        node.handles.add(h)
        return h

    def release_file(self, fh: int) -> Optional[FileHandle]:
        h = self.files.pop(fh, None)
        if h is not None:
            os.close(h.fd)
            if h.node.handles:
                h.node.handles.discard(h)
        return h

    def open_dir(self, node: Node) -> DirHandle:
        h = DirHandle(next(self._next), node)
        self.dirs[h.fh] = h
        return h

    def release_dir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def close_all(self) -> None:
        for fh in list(self.files):
            self.release_file(fh)
        self.dirs.clear()
