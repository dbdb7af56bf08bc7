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


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _id_map(kind: str):
    """This process's /proc/self/{uid,gid}_map: (first id inside, count) ranges."""
    try:
        with open(f"/proc/self/{kind}_map") as f:
            return [(int(a), int(n)) for a, _, n in (l.split() for l in f if l.strip())]
    except (OSError, ValueError):
        return [(0, 4294967295)]


def _unmapped_shows_as(kind: str, overflow: int):
    """The id that stands for "no id here" (the overflow id), unless that id is also a
    real, mapped one (podman maps 65534): then unmapped owners cannot be told apart."""
    ranges = _id_map(kind)
    if ranges == [(0, 4294967295)] or any(a <= overflow < a + n for a, n in ranges):
        return None
    return overflow


_UNMAPPED_UID = _unmapped_shows_as("uid", _read_int("/proc/sys/kernel/overflowuid", 65534))
_UNMAPPED_GID = _unmapped_shows_as("gid", _read_int("/proc/sys/kernel/overflowgid", 65534))


def can_give_owner(uid: int, gid: int) -> bool:
    """Whether a copy-up may give its copy this owner. The kernel overlay refuses to copy
    up an object whose owner has no id in the caller's user namespace (EOVERFLOW, in
    ovl_copy_up_one), which for a mount by a user in a namespace is every owner but the
    mapped ones. Here: root gives any owner it can see (root of a user namespace sees an
    unmapped one as the overflow id); a plain user only its own uid and groups."""
    if _IS_ROOT:
        return uid != _UNMAPPED_UID and gid != _UNMAPPED_GID
    return uid == os.geteuid() and (gid == os.getegid() or gid in os.getgroups())
