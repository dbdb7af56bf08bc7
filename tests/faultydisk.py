"""A one-file FUSE filesystem whose reads fail with EIO in chosen byte ranges.

    python faultydisk.py IMAGE CONTROL.json MOUNTPOINT

Serves IMAGE as MOUNTPOINT/disk (direct I/O, so every read reaches us). CONTROL.json holds
a list of [start, end) byte ranges (end null: to the end of the device); it is re-read
whenever it changes, so a test can make the device fail while it is in use. A loop device
on MOUNTPOINT/disk then stands in for a device-mapper ``error`` target (faultkit.py).
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys

import pyfuse3
import trio

DISK_INO = 2


class Disk(pyfuse3.Operations):
    def __init__(self, image: str, ctl: str):
        super().__init__()
        self.fd = os.open(image, os.O_RDWR)
        self.ctl = ctl
        self.ctl_mtime = None
        self.bad = []

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.ctl).st_mtime_ns
        except OSError:
            return
        if mtime != self.ctl_mtime:
            with open(self.ctl) as f:
                self.bad = [(a, b) for a, b in json.load(f)]
            self.ctl_mtime = mtime

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = os.fstat(self.fd).st_size
        a.attr_timeout = a.entry_timeout = 0
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == b"disk":
            return self._attrs(DISK_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", self._attrs(DISK_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != DISK_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=DISK_INO, direct_io=True)

    async def read(self, fh, off, size):
        self._refresh()
        end = off + size
        for a, b in self.bad:
            if off < (b if b is not None else float("inf")) and end > a:
                raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        os.fsync(self.fd)


def main() -> None:
    image, ctl, mnt = sys.argv[1:4]
    ops = Disk(image, ctl)
    pyfuse3.init(ops, mnt, {"fsname=ovlpy-faultydisk", "subtype=ovlpy-faultydisk"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
