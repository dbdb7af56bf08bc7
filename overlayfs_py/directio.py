"""O_DIRECT I/O on the backing file: the upper filesystem decides what is aligned enough.

A file opened with O_DIRECT through the mount is opened with O_DIRECT in its layer too, so
aligned direct reads and writes bypass the host page cache as they would on the kernel
overlay, and misaligned ones get the upper filesystem's own answer (EINVAL on ext4, xfs...).
The data FUSE hands us sits in a Python bytes object of arbitrary alignment, which O_DIRECT
refuses: it goes through a page-aligned bounce buffer (anonymous mmap) instead.

One exception keeps data safe: with the writeback cache the kernel flushes pages that were
written through the page cache (by another opener of the file, or through a shared mapping)
through *any* writable handle of the file, this one included. Such a flush starts at a page
boundary and is cut at the end of the file, so its length need not be aligned, and a
refused flush would lose the data. So a write at a page-aligned offset that O_DIRECT
refuses goes through the page cache instead when it may be such a flush: when another
handle of the file writes through the page cache, or when it ends exactly at the end of the
file (README: a user's O_DIRECT rewrite of a file's unaligned tail from a page boundary
succeeds where the upper filesystem says EINVAL).
"""
from __future__ import annotations

import errno
import mmap
import os
from typing import Callable

PAGE = mmap.PAGESIZE


def _bounce(size: int) -> mmap.mmap:
    return mmap.mmap(-1, max(size, 1))


def pread(fd: int, size: int, off: int) -> bytes:
    buf = _bounce(size)
    try:
        n = os.preadv(fd, [memoryview(buf)[:size]], off)
        return buf[:n]
    finally:
        buf.close()


def pwrite(fd: int, data, off: int, other_cached_writer: bool,
           buffered_fd: Callable[[], int]) -> int:
    """Write ``data`` at ``off`` with O_DIRECT. ``buffered_fd()`` gives an fd of the same
    file without O_DIRECT, for a page-cache flush that O_DIRECT refuses (see above)."""
    n = len(data)
    buf = _bounce(n)
    try:
        buf[:n] = data
        try:
            return os.pwritev(fd, [memoryview(buf)[:n]], off)
        except OSError as e:
            if e.errno != errno.EINVAL or off % PAGE:
                raise
            if not (other_cached_writer or off + n == os.fstat(fd).st_size):
                raise
    finally:
        buf.close()
    return os.pwrite(buffered_fd(), data, off)
