"""Copy a file's bytes efficiently: reflink, else copy_file_range over data extents only.

Runs in a worker thread (it may take seconds for a large file). Holes stay holes: the copy walks
SEEK_DATA/SEEK_HOLE and only copies data extents, then sets the final size.
"""
from __future__ import annotations

import errno
import fcntl
import os

FICLONE = 0x40049409
CHUNK = 1 << 30


def reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                       errno.EPERM, errno.EBADF):
            return False
        raise


def _extents(fd: int, size: int):
    """(start, end) of the data extents; the whole file if SEEK_DATA is not supported."""
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        if pos < size:
            yield pos, size


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    use_cfr = True
    while off < end:
        n = min(CHUNK, end - off)
        if use_cfr:
            try:
                done = os.copy_file_range(src, dst, n, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src, min(n, 1 << 20), off)
            done = os.pwrite(dst, buf, off) if buf else 0
        if done == 0:
            break                    # source shrank under us
        off += done


def copy_file_data(src_fd: int, dst_fd: int, size: int) -> None:
    if size == 0 or reflink(src_fd, dst_fd):
        return
    for start, end in _extents(src_fd, size):
        _copy_range(src_fd, dst_fd, start, min(end, size))
    os.ftruncate(dst_fd, size)
