"""File data operations on open handles beyond read and write: fallocate(2),
SEEK_DATA/SEEK_HOLE and copy_file_range(2), forwarded to the backing files.

They act on the fd of a handle. A handle that may change data was opened on the upper file
(open copies the file up first, as the kernel's overlay does before a write-open), and a
read-only handle reads the layer that holds the data (the lower file, or the lower data of
a metacopy file), so these need no copy-up of their own. They run in a worker thread: on
some file systems a preallocation or a copy takes a while.
"""
from __future__ import annotations

import ctypes
import os

import trio

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20


def fallocate_fd(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


async def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    await trio.to_thread.run_sync(fallocate_fd, fd, mode, offset, length)


def seek(fd: int, offset: int, whence: int) -> int:
    """SEEK_DATA / SEEK_HOLE on the backing file (the file offset of our fd is never used:
    reads and writes are positioned)."""
    return os.lseek(fd, offset, whence)


async def copy_range(fd_in: int, off_in: int, fd_out: int, off_out: int, length: int) -> int:
    """copy_file_range(2) between the backing files: on one file system with reflinks
    (xfs, btrfs) the kernel shares the extents. EXDEV/EOPNOTSUPP go back to the kernel,
    which then copies through read and write (splice) itself."""
    return await trio.to_thread.run_sync(os.copy_file_range, fd_in, fd_out, length, off_in,
                                         off_out)
