"""Create objects as the calling user, as the kernel's overlay does.

The kernel's overlay creates upper objects with the caller's fsuid/fsgid but the mounter's
capabilities. We do the same on the trio thread (credentials are per-thread in Linux, and all
namespace handlers run on that one thread): setfsuid/setfsgid, then put back the effective
capabilities that setfsuid drops, so the create is not refused by the real upper directory's
permissions (the kernel already checked them on the merged view with default_permissions).
The new object has its final owner, and the group of a setgid parent, from its first instant.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)     # libc is loaded: no ldconfig run (find_library)
_IS_ROOT = os.geteuid() == 0
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _raise_effective_caps() -> None:
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        return
    for d in data:
        d.effective = d.permitted
    _libc.capset(ctypes.byref(hdr), data)


@contextlib.contextmanager
def as_user(uid: int, gid: int):
    if not _IS_ROOT or (uid == 0 and gid == 0):
        yield
        return
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    _raise_effective_caps()
    try:
        yield
    finally:
        _libc.setfsuid(0)            # going back to fsuid 0 restores the fs capabilities
        _libc.setfsgid(0)


CAP_SYS_ADMIN = 21


def caller_has_cap(pid: int, uid: int, cap: int) -> bool:
    """Whether the process ``pid`` (a request's caller) has capability ``cap`` in effect,
    read from /proc; if it is gone or unknown (pid 0), whether it is root."""
    if pid:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"CapEff:"):
                        return bool(int(line.split()[1], 16) >> cap & 1)
        except (OSError, ValueError, IndexError):
            pass
    return uid == 0
