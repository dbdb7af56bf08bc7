"""File handles and detached mounts through ctypes: Python has no wrapper for these.

- ``encode(dir_fd, name)``: name_to_handle_at(2), the filesystem's own persistent handle of
  an object, which the kernel overlay stores (with the filesystem's UUID) as
  ``overlay.origin`` and uses to name ``workdir/index`` entries;
- ``open_by_handle(mount_fd, handle)``: open_by_handle_at(2) (needs CAP_DAC_READ_SEARCH);
- ``fs_uuid(fd)``: the filesystem's UUID (FS_IOC_GETFSUUID, the kernel's ``s_uuid``);
- ``strictatime_clone(dir_fd)``: a detached copy of the mount behind ``dir_fd`` (open_tree
  with OPEN_TREE_CLONE) set to strictatime (mount_setattr), as the kernel overlay keeps a
  private clone of its upper mount. It is in no mount namespace; nobody else sees it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from typing import NamedTuple, Optional

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


class Handle(NamedTuple):
    type: int
    data: bytes


def _err() -> OSError:
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


def encode(dir_fd: int, name: bytes = b"") -> Handle:
    """The handle of ``name`` in ``dir_fd`` (not followed if a symlink), or of ``dir_fd``
    itself when ``name`` is empty. OSError(EOPNOTSUPP) where the filesystem has none."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH if not name else 0
    if _libc.name_to_handle_at(dir_fd, name, ctypes.byref(fh), ctypes.byref(mount_id),
                               flags) != 0:
        raise _err()
    return Handle(fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]))


def open_by_handle(mount_fd: int, handle: Handle, flags: int) -> int:
    fh = _FileHandle()
    fh.handle_bytes = len(handle.data)
    fh.handle_type = handle.type
    ctypes.memmove(fh.f_handle, handle.data, len(handle.data))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        raise _err()
    return fd


_FS_IOC_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8) | 0     # _IOR(0x15, 0, fsuuid2)


def fs_uuid(fd: int) -> Optional[bytes]:
    """The 16-byte UUID of the filesystem behind ``fd`` (all zeros if it has none), or None
    where the kernel cannot tell (FS_IOC_GETFSUUID needs Linux 6.5)."""
    buf = bytearray(17)
    buf[0] = 16
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    n = buf[0]
    return bytes(buf[1:1 + n]).ljust(16, b"\0")[:16]


# open_tree(2) and mount_setattr(2) (x86_64 and aarch64 share these numbers, as all
# architectures do for syscalls added after 5.0)
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_MOUNT_ATTR__ATIME = 0x70
_MOUNT_ATTR_STRICTATIME = 0x20


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def strictatime_clone(dir_fd: int) -> Optional[int]:
    """A detached strictatime clone of the mount, rooted at ``dir_fd``; None if the kernel
    or our privileges do not allow it."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    fd = syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dir_fd), ctypes.c_char_p(b""),
                 ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH))
    if fd < 0:
        return None
    attr = _MountAttr(_MOUNT_ATTR_STRICTATIME, _MOUNT_ATTR__ATIME, 0, 0)
    rc = syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), ctypes.c_char_p(b""),
                 ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                 ctypes.c_size_t(ctypes.sizeof(attr)))
    try:
        if rc != 0:
            return None
        # open_by_handle_at takes no O_PATH fd (what open_tree gives): open its root
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
