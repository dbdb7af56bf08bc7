"""Whiteout and opaque markers: every format found in real layers, decoded in one place.

Formats read (see shared/research/overlay-semantics.md, section 0):
- kernel whiteout: a character device with rdev 0/0 (any permission bits);
- OCI/AUFS/fuse-overlayfs whiteout: an empty file ``.wh.NAME`` hiding NAME in the layers below;
- opaque directory: xattr ``trusted.overlay.opaque`` / ``user.overlay.opaque`` (or fuse-overlayfs'
  ``user.fuseoverlayfs.opaque``) whose first byte is ``y``, or a ``.wh..wh..opq`` file inside it;
- AUFS internals ``.wh..wh.*`` (``.wh..wh.aufs``, ``.wh..wh.plnk``...) are never shown.
Format written to the upper layer: kernel char 0/0 whiteouts and the ``overlay.opaque`` xattr.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")

# Private xattr namespaces: never shown through the mount, never copied up.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def is_kernel_whiteout(st: os.stat_result) -> bool:
    """The kernel's test (IS_WHITEOUT): a char device numbered 0/0, whatever its mode."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_marker_name(name: bytes) -> bool:
    """Names that are markers in a layer and can never be real entries of the merged view."""
    return name.startswith(WH_PREFIX)


def oci_whiteout_target(name: bytes) -> Optional[bytes]:
    """For ``.wh.X`` return X; None for other names, the opaque marker and AUFS internals."""
    if not name.startswith(WH_PREFIX) or name.startswith(AUFS_META_PREFIX):
        return None
    target = name[len(WH_PREFIX):]
    return target or None


# The kernel (6.7 and later) lets a client of the mount use the overlay's own namespace,
# stored escaped: a client's ``trusted.overlay.X`` is ``trusted.overlay.overlay.X`` in the
# layer (``user.overlay.*`` with userxattr), so an overlay nested on this one keeps its
# xattrs (overlayfs.rst, "Nesting overlayfs mounts"). Escaped names are data, not markers.
ESCAPE = "overlay."
XATTR_NAME_MAX = 255


def own_prefix(userxattr: bool) -> str:
    return "user.overlay." if userxattr else "trusted.overlay."


def is_escaped_xattr(name: str) -> bool:
    return name.startswith(("trusted.overlay." + ESCAPE, "user.overlay." + ESCAPE))


def is_private_xattr(name: str) -> bool:
    """An overlay marker in a layer: never shown as it is, never copied up."""
    return name.startswith(PRIVATE_XATTR_PREFIXES) and not is_escaped_xattr(name)


def layer_xattr_name(name: str, userxattr: bool) -> Optional[str]:
    """The name a client's xattr ``name`` has in the layers, or None if a client may not
    use it: the other form's overlay namespace and fuse-overlayfs' (the daemon reads
    markers of every form in the layers, so a client must not write one). Raises OSError
    EOPNOTSUPP when the escaped name is too long, as the kernel does."""
    own = own_prefix(userxattr)
    if name.startswith(own):
        escaped = own + ESCAPE + name[len(own):]
        if len(os.fsencode(escaped)) > XATTR_NAME_MAX:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return escaped
    if name.startswith(PRIVATE_XATTR_PREFIXES):
        return None
    return name


def client_xattr_name(name: str, userxattr: bool) -> Optional[str]:
    """How a layer's xattr ``name`` is listed through the mount: unescaped if escaped in
    the mount's own form, None (not listed) for markers and the other forms."""
    own = own_prefix(userxattr)
    if name.startswith(own + ESCAPE):
        return own + name[len(own) + len(ESCAPE):]
    if name.startswith(PRIVATE_XATTR_PREFIXES):
        return None
    return name


def opaque_value(get_xattr) -> Optional[bytes]:
    """First opaque xattr value found, via ``get_xattr(name) -> bytes`` (raises OSError if absent)."""
    for name in OPAQUE_XATTRS:
        try:
            return get_xattr(name)
        except OSError:
            continue
    return None


def xattr_says_opaque(value: Optional[bytes]) -> bool:
    """Only the first byte counts, as in the kernel (util.c ovl_check_dir_xattr)."""
    return bool(value) and value[:1] == b"y"


def dir_is_opaque(dir_fd: int) -> bool:
    """Is the directory open at dir_fd opaque, in any format? (One listxattr answers the
    common case, a plain directory, where three getxattr calls would all fail.)"""
    try:
        names = os.listxattr(dir_fd)
    except OSError:
        names = ()
    for name in OPAQUE_XATTRS:
        if name in names:
            try:
                if xattr_says_opaque(os.getxattr(dir_fd, name)):
                    return True
            except OSError:
                pass
            break                    # the first one present decides, as in the readers'
                                     # order (kernel trusted, then user, then fuse-overlayfs)
    try:
        os.stat(OPAQUE_MARKER, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def dir_has_xwhiteouts(dir_fd: int) -> bool:
    """Kernel >= 6.7 xattr whiteouts are only honoured inside dirs marked opaque='x'."""
    value = opaque_value(lambda n: os.getxattr(dir_fd, n))
    return bool(value) and value[:1] == b"x"


XWHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")


def is_xwhiteout(path: str) -> bool:
    """A zero-size regular file carrying overlay.whiteout (checked by the caller for size)."""
    for name in XWHITEOUT_XATTRS:
        try:
            os.getxattr(path, name, follow_symlinks=False)
            return True
        except OSError:
            continue
    return False


# Redirects (redirect_dir): a directory renamed away from where its lower layers have it
# carries overlay.redirect: a name (moved within its parent) or a path from the root of
# the layers (moved elsewhere), which lookups in the layers below follow instead of the
# directory's own name. Only the mount's own namespace is read (kernel: ovl_check_redirect).
REDIRECT_XATTR = "trusted.overlay.redirect"
USER_REDIRECT_XATTR = "user.overlay.redirect"
REDIRECT_MAX = 256          # the kernel's redirect_max: longer absolute redirects -> EXDEV


def redirect_xattr(userxattr: bool) -> str:
    return USER_REDIRECT_XATTR if userxattr else REDIRECT_XATTR


def parse_redirect(value: bytes):
    """``(absolute, components)`` of a redirect, or None if it is not one the kernel
    follows (empty, ``//``, a trailing ``/``, a ``/`` in a relative one) -- nor ``.``,
    ``..`` or a NUL, which would lead out of the layer."""
    if not value or b"\0" in value:
        return None
    if value.startswith(b"/"):
        comps = value[1:].split(b"/")
        absolute = True
    else:
        comps = [value]
        absolute = False
    if any(c in (b"", b".", b"..") for c in comps):
        return None
    return absolute, tuple(comps)
