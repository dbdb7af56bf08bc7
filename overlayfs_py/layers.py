"""One layer = one held root directory fd; every per-layer syscall is relative and NOFOLLOW.

Nothing here resolves a path string from '/': a layer is entered through its root fd and each
component is opened with O_NOFOLLOW, so a hostile symlink inside a layer (``etc -> /``) is only
ever read as a link, never followed by the daemon.
"""
from __future__ import annotations

import ctypes
import errno
import os

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)     # libc is loaded: no ldconfig run (find_library)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int = 0) -> None:
    """renameat2(2): Python has no wrapper, and the flags are what make whiteouts atomic."""
    if _libc.renameat2(src_dir, src, dst_dir, dst, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def proc_path(fd: int) -> str:
    """Path that reaches the object behind an O_PATH fd, for calls that take no dir_fd."""
    return f"/proc/self/fd/{fd}"


def has_default_acl(dir_fd: int) -> bool:
    """Whether the directory behind ``dir_fd`` carries a default POSIX ACL."""
    try:
        os.getxattr(proc_path(dir_fd), "system.posix_acl_default")
        return True
    except OSError:                 # ENODATA: none; EOPNOTSUPP: no ACLs on this filesystem
        return False


class Layer:
    """A layer directory, held open. ``index`` 0 is the top of the stack."""

    __slots__ = ("index", "path", "root_fd", "st_dev", "writable")

    def __init__(self, index: int, path: str, writable: bool):
        self.index = index
        self.path = path
        self.writable = writable
        self.root_fd = os.open(path, O_DIR)
        self.st_dev = os.fstat(self.root_fd).st_dev

    def close(self) -> None:
        os.close(self.root_fd)

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r}, writable={self.writable})"


def lstat_at(dir_fd: int, name: bytes):
    """lstat of name in dir_fd; None when absent (absence is not an error in a layer).

    A name longer than the layer's NAME_MAX cannot exist in it: the ``.wh.`` marker of a
    255-byte name, for one, is absent, not an error."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return None
        raise


def open_dir_at(dir_fd: int, name: bytes) -> int:
    return os.open(name, O_DIR, dir_fd=dir_fd)


def open_path_at(dir_fd: int, name: bytes) -> int:
    return os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)

