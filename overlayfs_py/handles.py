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

from .atime import open_noatime
from .inodes import Node
from .readdir import Listing


class FileHandle:
    __slots__ = ("fh", "fd", "node", "flags", "writable", "nowait", "direct", "_buffered",
                 "atime_pending", "wrote", "backing_id")

    def __init__(self, fh: int, fd: int, node: Node, flags: int, writable: bool,
                 backing_id: int = 0):
        self.fh, self.fd, self.node, self.flags, self.writable = fh, fd, node, flags, writable
        self.nowait = True          # the file's filesystem may take RWF_NOWAIT reads
        # opened with O_DIRECT (so is self.fd): I/O goes through directio
        self.direct = bool(flags & os.O_DIRECT)
        self._buffered: Optional[int] = None
        self.atime_pending = False  # the first read records an atime (ops.open, atime.py)
        self.wrote = False          # data was written through it
        self.backing_id = backing_id    # > 0: the kernel passes this open through

    def buffered_fd(self) -> int:
        """The same file opened without O_DIRECT (made on first use; see directio)."""
        if self._buffered is None:
            self._buffered = os.open(f"/proc/self/fd/{self.fd}",
                                     os.O_RDWR if self.writable else os.O_RDONLY)
        return self._buffered

    def close(self) -> None:
        os.close(self.fd)
        if self._buffered is not None:
            os.close(self._buffered)
            self._buffered = None

    def reopen_after_copy_up(self, ov, parent: Node, name: bytes) -> None:
        if self.writable:
            return
        from .overlay import UPPER
        fd = open_noatime(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC |
                          (os.O_DIRECT if self.direct else 0), ov.dirfd(parent, UPPER))
        old, self.fd = self.fd, fd
        self.nowait = True
        os.close(old)
        if self._buffered is not None:
            os.close(self._buffered)
            self._buffered = None


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

    def open_file(self, fd: int, node: Node, flags: int, writable: bool,
                  backing_id: int = 0) -> FileHandle:
        h = FileHandle(next(self._next), fd, node, flags, writable, backing_id)
        self.files[h.fh] = h
        if node.handles is None:
            node.handles = set()
        node.handles.add(h)
        return h

    def release_file(self, fh: int) -> Optional[FileHandle]:
        h = self.files.pop(fh, None)
        if h is not None:
            h.close()
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
