"""File system helpers of the image half, all relative to held directory fds.

Nothing here resolves a path string from ``/`` below a directory it was handed: trees are
walked with ``openat(..., O_NOFOLLOW)`` one component at a time, and removed the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from typing import List, Tuple

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1

# the C library is in the process already: dlopen(NULL) finds it without find_library,
# which runs ldconfig in a subprocess (at every command's start-up)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]


def renameat2(src_dir: int, src, dst_dir: int, dst, flags: int = 0) -> None:
    if _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fsdecode(dst))


def syncfs(fd: int) -> None:
    """Flush the whole file system holding ``fd`` (one call instead of an fsync per file)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fsync_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


def proc_path(dir_fd: int, name: bytes = b"") -> bytes:
    """A path reaching ``name`` inside the directory held by ``dir_fd``, for the calls that take
    no dir_fd (``lsetxattr``...). Only ``name`` itself is looked up, and not followed when the
    call is made with follow_symlinks=False."""
    base = f"/proc/self/fd/{dir_fd}".encode()
    return base + b"/" + name if name else base


def rmtree_at(parent_fd: int, name) -> None:
    """Remove ``name`` (any type; a directory with everything below it) from ``parent_fd``.

    Iterative (a hostile tree may be deeper than Python's recursion limit), never follows a
    symlink, and makes directories writable first when we are not root (a layer may hold
    directories of mode 0555)."""
    name = os.fsencode(name)
    try:
        top = os.open(name, O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(name, dir_fd=parent_fd)
            return
        raise
    # stack of (fd, names left to look at, parent fd, own name)
    stack: List[Tuple[int, List[bytes], int, bytes]] = []
    try:
        _writable(top)
        stack.append((top, [os.fsencode(n) for n in os.listdir(top)], parent_fd, name))
        while stack:
            fd, names, pfd, own = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                os.rmdir(own, dir_fd=pfd)
                continue
            n = names.pop()
            try:
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                child = os.open(n, O_DIR, dir_fd=fd)
                _writable(child)
                stack.append((child, [os.fsencode(x) for x in os.listdir(child)], fd, n))
            else:
                os.unlink(n, dir_fd=fd)
    finally:
        for fd, _names, _pfd, _own in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


def _writable(fd: int) -> None:
    if os.geteuid() == 0:
        return
    st = os.fstat(fd)
    if st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)


def write_all(fd: int, data) -> None:
    n = os.write(fd, data)
    if n < len(data):                       # rare: a short write
        mv = memoryview(data)[n:]
        while mv:
            mv = mv[os.write(fd, mv):]


def write_file_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``name`` (O_EXCL, O_NOFOLLOW) holding ``data``, flushed to disk."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file_at(dir_fd: int, name: str, limit: int = 16 << 20) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)
