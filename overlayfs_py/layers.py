"""One layer = one held root directory fd; every per-layer syscall is relative and NOFOLLOW.

Nothing here resolves a path string from '/': a layer is entered through its root fd and each
component is opened with O_NOFOLLOW, so a hostile symlink inside a layer (``etc -> /``) is only
ever read as a link, never followed by the daemon.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Optional

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


# listxattrat(2) and getxattrat(2) (Linux 6.13): the xattrs of ``name`` in a directory fd in
# one syscall. Before them it took three (an O_PATH open, the call through /proc/self/fd,
# a close): a container engine's diff walk asks for security.capability and the list of
# every file of two trees at each build step. Their numbers are the same on every
# architecture (the unified table from 5.1 on).
_SYS_GETXATTRAT, _SYS_LISTXATTRAT = 464, 465
AT_SYMLINK_NOFOLLOW = 0x100
_listxattrat = _libc["syscall"]      # its own function object: argtypes of its own
_listxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
                         ctypes.c_void_p, ctypes.c_size_t]
_listxattrat.restype = ctypes.c_long
_getxattrat = _libc["syscall"]
_getxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
                        ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_getxattrat.restype = ctypes.c_long


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


_XATTR_ARGS_SIZE = ctypes.sizeof(_XattrArgs)
AT_FDCWD = -100


def _probe_at_calls() -> bool:
    """Whether listxattrat(2) works here: the kernel may predate it (ENOSYS), and a seccomp
    filter that does not know it may refuse it with any errno (EPERM under some container
    runtimes), which must not become the answer for every file."""
    buf = ctypes.create_string_buffer(65536)
    if _listxattrat(_SYS_LISTXATTRAT, AT_FDCWD, b"/", 0, buf, 65536) < 0:
        return False
    args = _XattrArgs(ctypes.addressof(buf), 65536, 0)
    if _getxattrat(_SYS_GETXATTRAT, AT_FDCWD, b"/", 0, b"user.overlayfs-py.probe",
                   ctypes.byref(args), _XATTR_ARGS_SIZE) >= 0:
        return True
    return ctypes.get_errno() in (errno.ENODATA, errno.EOPNOTSUPP)


_at_calls = [None]        # None: not probed yet; then whether the *xattrat calls work


def _xattrat(call, size: int) -> Optional[bytes]:
    """What ``call(buf, size)`` (a listxattrat or getxattrat syscall) writes into a buffer of
    ``size`` bytes, asked again with the largest xattr size (64 KiB) on ERANGE; None where
    the calls do not work, which turns them off for good (the callers then take the
    O_PATH route)."""
    if _at_calls[0] is None:
        _at_calls[0] = _probe_at_calls()
    while _at_calls[0]:
        buf = ctypes.create_string_buffer(size)
        n = call(buf, size)
        if n >= 0:
            return buf.raw[:n]
        e = ctypes.get_errno()
        if e == errno.ERANGE and size < 65536:
            size = 65536
            continue
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e))
        _at_calls[0] = False
    return None


def listxattr_at(dir_fd: int, name: bytes) -> list:
    """The xattr names (str) of ``name`` in ``dir_fd``, not following a symlink."""
    raw = _xattrat(lambda buf, size: _listxattrat(_SYS_LISTXATTRAT, dir_fd, name,
                                                  AT_SYMLINK_NOFOLLOW, buf, size), 1024)
    if raw is not None:
        return [os.fsdecode(x) for x in raw.split(b"\0") if x]
    fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)
    try:
        return os.listxattr(proc_path(fd))
    finally:
        os.close(fd)


def getxattr_at(dir_fd: int, name: bytes, attr: str) -> bytes:
    """The value of xattr ``attr`` of ``name`` in ``dir_fd``, not following a symlink."""
    battr = os.fsencode(attr)

    def call(buf, size):
        args = _XattrArgs(ctypes.addressof(buf), size, 0)
        return _getxattrat(_SYS_GETXATTRAT, dir_fd, name, AT_SYMLINK_NOFOLLOW, battr,
                           ctypes.byref(args), _XATTR_ARGS_SIZE)
    raw = _xattrat(call, 4096)
    if raw is not None:
        return raw
    fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)
    try:
        return os.getxattr(proc_path(fd), attr)
    finally:
        os.close(fd)


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

