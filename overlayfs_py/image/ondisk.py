"""The overlay's on-disk format as the image half reads and writes it: whiteouts, opaque
directories and the overlay's private xattrs. The image half keeps its own copy of these
rules (it never imports the daemon); this module is the only place in it that knows them.

Written into the store (``unpack``), the kernel's format, so that the kernel overlay can
mount the same layers:
- a deleted name ``X`` is a character device 0/0 named ``X`` (mode 0, as the kernel's own);
- an opaque directory carries the xattr ``<ns>.overlay.opaque = "y"``.
``<ns>`` is ``trusted`` for root and ``user`` otherwise: without root the ``trusted.*``
namespace cannot be written, and the kernel overlay reads ``user.overlay.*`` when mounted with
``userxattr`` (as the daemon's ``userxattr`` option does). A store records its choice once,
when it is created (see ``store.py``), and every layer in it uses that one.

With "keep OCI markers", layers keep the tar's own ``.wh.X`` files and ``.wh..wh..opq``
markers untouched; the daemon reads those too (the kernel does not).

Read from an upper directory (``diff``, ``commit``), every format the daemon, the kernel and
fuse-overlayfs write: char 0/0 whiteouts, ``.wh.X`` files, kernel >= 6.7 xattr whiteouts
(zero-size files carrying ``overlay.whiteout`` in a directory whose ``overlay.opaque`` is
``x``), opaque xattrs in any namespace (``y``), and ``.wh..wh..opq`` files.
"""
from __future__ import annotations

import os
import stat
from typing import Optional

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."

XATTR_NAMESPACES = ("trusted", "user")

# Read in this order (the kernel's trusted first, then user, then fuse-overlayfs').
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
METACOPY_XATTRS = ("trusted.overlay.metacopy", "user.overlay.metacopy")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")

# The overlay's own xattrs: never taken from a layer tar into the store, never put in a tar.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")

WHITEOUT_MODE = stat.S_IFCHR | 0o000
WHITEOUT_DEV = 0


def default_namespace() -> str:
    """``trusted`` for root, ``user`` for everybody else."""
    return "trusted" if os.geteuid() == 0 else "user"


def opaque_xattr(namespace: str) -> str:
    if namespace not in XATTR_NAMESPACES:
        raise ValueError(f"unknown overlay xattr namespace {namespace!r}")
    return f"{namespace}.overlay.opaque"


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def is_whiteout(st: os.stat_result) -> bool:
    """The kernel's test: a character device numbered 0/0, whatever its mode."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def oci_whiteout_target(name: bytes) -> Optional[bytes]:
    """``.wh.X`` -> X; None for other names, the opaque marker and AUFS internals."""
    if not name.startswith(WH_PREFIX) or name.startswith(AUFS_META_PREFIX):
        return None
    return name[len(WH_PREFIX):] or None


def _xattr_names(target) -> tuple:
    try:
        return tuple(os.listxattr(target, follow_symlinks=False)) \
            if not isinstance(target, int) else tuple(os.listxattr(target))
    except OSError:
        return ()


def opaque_value(dir_fd: int, names: Optional[tuple] = None) -> Optional[bytes]:
    """The first opaque xattr found on the directory open at ``dir_fd`` (None: none)."""
    names = _xattr_names(dir_fd) if names is None else names
    for name in OPAQUE_XATTRS:
        if name in names:
            try:
                return os.getxattr(dir_fd, name)
            except OSError:
                return None
    return None


def dir_is_opaque(dir_fd: int, names: Optional[tuple] = None) -> bool:
    """Opaque by xattr (first byte ``y``, as the kernel checks) or by a ``.wh..wh..opq`` file."""
    value = opaque_value(dir_fd, names)
    if value is not None and value[:1] == b"y":
        return True
    try:
        os.stat(OPAQUE_MARKER, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def dir_has_xwhiteouts(dir_fd: int, names: Optional[tuple] = None) -> bool:
    value = opaque_value(dir_fd, names)
    return value is not None and value[:1] == b"x"


def is_xwhiteout(path: bytes, st: os.stat_result) -> bool:
    """A zero-size regular file carrying ``overlay.whiteout`` (only meaningful inside a
    directory for which ``dir_has_xwhiteouts`` holds)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    names = _xattr_names(path)
    return any(n in names for n in WHITEOUT_XATTRS)


def has_any(path, candidates) -> Optional[str]:
    """The first of ``candidates`` present as an xattr on ``path`` (not followed)."""
    names = _xattr_names(path)
    for n in candidates:
        if n in names:
            return n
    return None
