"""The inodes index (``index=on``), in the kernel overlay's on-disk format.

What the kernel does (Documentation/filesystems/overlayfs.rst, "Inode index"; fs/overlayfs
namei.c, copy_up.c, util.c, super.c), and so what we do:

- A *file handle* of an object is the kernel's ``struct ovl_fb``: version 0, magic 0xfb, the
  total length, flags (byte order; 4 = "an upper object"), the handle type of
  name_to_handle_at(2), the 16-byte UUID of the object's filesystem, then the handle itself.
  ``overlay.origin`` of a copied-up object holds the handle of its lower origin (empty where
  the lower filesystem has no handles: "copied up, origin unknown").
- At mount the upper root's ``overlay.origin`` must be the handle of the top lower layer's
  root (set if missing): an upper layer belongs to its lower layers. ``workdir/index`` is
  made (mode 0, as the kernel makes it) and its ``overlay.upper`` must be the handle of the
  upper root (set if missing). Leftover temporaries (``#...``) in it are removed, and so are
  stale entries (their origin is not their name) and orphans (no name left in the overlay).
- A lower non-directory with several hard links is copied up *into the index*: the copy is
  named by the hex of its origin's handle, then linked into the upper directory under the
  name used. Every other name of the lower hard link then shows that copy (lookup finds the
  index entry by the handle of the lower file); a name is linked into the upper layer when
  it is used for a change of names (unlink, rename, link), as the kernel links it at its
  copy-up.
- ``overlay.nlink`` on the copy keeps the overlay's link count: ``U+N`` / ``U-N`` relative
  to the upper inode's count (which includes the index entry), ``L+N`` relative to the lower
  origin's.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from typing import Dict, Optional, Tuple

from . import fhandle
from .layers import O_DIR, open_dir_at

log = logging.getLogger("overlayfs_py")

FH_VERSION = 0
FH_MAGIC = 0xFB
FLAG_BIG_ENDIAN = 1 << 0
FLAG_ANY_ENDIAN = 1 << 1
FLAG_PATH_UPPER = 1 << 2
FLAG_ALL = FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER
FLAG_CPU_ENDIAN = FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
FB_HEADER = 21                       # version, magic, len, flags, type, uuid[16]
INDEX_DIR = b"index"
NULL_UUID = b"\0" * 16


class IndexError_(Exception):
    """The index cannot be used: the mount fails with this message (as the kernel's)."""


def xattr_names(userxattr: bool) -> Tuple[str, str, str]:
    """(origin, upper, nlink) xattr names."""
    p = "user.overlay." if userxattr else "trusted.overlay."
    return p + "origin", p + "upper", p + "nlink"


def make_fh(handle: fhandle.Handle, uuid: bytes, upper: bool = False) -> bytes:
    """The kernel's ovl_fb of a name_to_handle_at handle."""
    flags = FLAG_CPU_ENDIAN | (FLAG_PATH_UPPER if upper else 0)
    return bytes((FH_VERSION, FH_MAGIC, FB_HEADER + len(handle.data), flags,
                  handle.type & 0xFF)) + uuid + handle.data


def check_fh(raw: bytes) -> Optional[bool]:
    """ovl_check_fh_len: True for a handle we can use, None for "origin unknown" (empty, a
    newer version, unknown flags, another byte order), False for an invalid one."""
    if not raw:
        return None
    if len(raw) < FB_HEADER or len(raw) < raw[2] or raw[1] != FH_MAGIC:
        return False
    if raw[0] > FH_VERSION or raw[3] & ~FLAG_ALL:
        return None
    if not raw[3] & FLAG_ANY_ENDIAN and (raw[3] & FLAG_BIG_ENDIAN) != FLAG_CPU_ENDIAN:
        return None
    return True


def fh_handle(raw: bytes) -> fhandle.Handle:
    return fhandle.Handle(raw[4], bytes(raw[FB_HEADER:raw[2]]))


def fh_uuid(raw: bytes) -> bytes:
    return bytes(raw[5:FB_HEADER])


def index_name(fh: bytes) -> bytes:
    """The index entry of an origin: the hex of its handle (ovl_get_index_name)."""
    return fh.hex().encode()


def parse_nlink(raw: bytes) -> Optional[Tuple[str, int]]:
    """``overlay.nlink`` ("U+1", "L-2") -> ("U", 1); None if malformed."""
    if len(raw) < 3 or raw[:1] not in (b"U", b"L") or raw[1:2] not in (b"+", b"-"):
        return None
    try:
        return raw[:1].decode(), int(raw[1:])
    except ValueError:
        return None


def _getxattr(target, name: str) -> Optional[bytes]:
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


class Index:
    """``workdir/index`` of a mount with index=on, and the handles of the layers' objects."""

    def __init__(self, dir_fd: int, layers, userxattr: bool):
        self.fd = dir_fd
        self.layers = layers
        self.origin_xattr, self.upper_xattr, self.nlink_xattr = xattr_names(userxattr)
        self._uuids: Dict[int, bytes] = {}

    def close(self) -> None:
        os.close(self.fd)

    # ------------------------------------------------------------------ handles
    def uuid(self, layer: int) -> bytes:
        lay = self.layers[layer]
        u = self._uuids.get(lay.st_dev)
        if u is None:
            u = fhandle.fs_uuid(lay.root_fd) or NULL_UUID
            self._uuids[lay.st_dev] = u
        return u

    def fh(self, layer: int, dir_fd: int, name: bytes = b"", upper: bool = False) -> bytes:
        """The ovl_fb of ``name`` in ``dir_fd`` (an object of ``layer``)."""
        return make_fh(fhandle.encode(dir_fd, name), self.uuid(layer), upper)

    def decode(self, fh: bytes) -> Optional[Tuple[int, os.stat_result]]:
        """(lower layer, stat) of the object a lower handle names, or None where it cannot
        be found (stale, another filesystem, or no CAP_DAC_READ_SEARCH to open handles)."""
        if check_fh(fh) is not True:
            return None
        uuid = fh_uuid(fh)
        for layer in range(1, len(self.layers)):
            if self.uuid(layer) != uuid:
                continue
            try:
                fd = fhandle.open_by_handle(self.layers[layer].root_fd, fh_handle(fh),
                                            os.O_PATH)
            except OSError:
                continue
            try:
                return layer, os.fstat(fd)
            finally:
                os.close(fd)
        return None

    # ------------------------------------------------------------------ entries
    def lstat(self, name: bytes) -> Optional[os.stat_result]:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def path(self, name: bytes) -> bytes:
        return b"/proc/self/fd/%d/%s" % (self.fd, name)

    def nlink(self, name: bytes, upper_nlink: int, lower_nlink: Optional[int] = None) -> int:
        """The overlay's link count of an indexed file (ovl_get_nlink)."""
        try:
            raw = _getxattr(self.path(name), self.nlink_xattr)
        except OSError:
            raw = None
        parsed = parse_nlink(raw) if raw is not None else None
        if parsed is None:
            return upper_nlink
        base, diff = parsed
        if base == "L":
            if lower_nlink is None:
                return upper_nlink
            n = lower_nlink + diff
        else:
            n = upper_nlink + diff
        return n if n > 0 else upper_nlink

    def raw_nlink(self, name: bytes, upper_nlink: int) -> Optional[int]:
        """The count overlay.nlink gives relative to the upper inode ("U" form), even
        when it is zero or less (the last name went); None without one."""
        try:
            raw = _getxattr(self.path(name), self.nlink_xattr)
        except OSError:
            return None
        parsed = parse_nlink(raw) if raw is not None else None
        if parsed is None or parsed[0] != "U":
            return None
        return upper_nlink + parsed[1]

    def set_nlink(self, name: bytes, overlay_nlink: int) -> None:
        """Record the overlay's count relative to the upper inode's (ovl_set_nlink_upper)."""
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        os.setxattr(self.path(name), self.nlink_xattr,
                    b"U%+d" % (overlay_nlink - st.st_nlink), follow_symlinks=False)


# ---------------------------------------------------------------------- mount time
def _verify_set(target, xattr: str, fh: bytes, what: str) -> None:
    """ovl_verify_set_fh: ``xattr`` of ``target`` must be ``fh``; set if missing or empty."""
    cur = _getxattr(target, xattr)
    if cur is None or check_fh(cur) is None:
        os.setxattr(target, xattr, fh)
        return
    if cur != fh:
        raise IndexError_(f"failed to verify {what}")


def setup(config, layers, workdir: str) -> Optional[Index]:
    """Check and prepare the index of a writable mount with index=on, as the kernel's
    ovl_get_indexdir. Returns None where the kernel falls back to index=off (a layer
    without file handles, a lower filesystem of null or clashing UUID), with its warning.
    Raises IndexError_ where the kernel fails the mount."""
    upper = layers[0]
    origin_x, upper_x, _ = xattr_names(config.userxattr)
    probe = Index(-1, layers, config.userxattr)
    try:
        upper_root_fh = probe.fh(0, upper.root_fd, upper=True)
    except OSError:
        log.warning("upper fs does not support file handles, falling back to index=off.")
        return None
    seen: Dict[int, bytes] = {}
    for i, lay in enumerate(layers[1:], 1):
        try:
            fhandle.encode(lay.root_fd)
        except OSError:
            log.warning("fs on '%s' does not support file handles, falling back to "
                        "index=off,nfs_export=off.", lay.path)
            return None
        if lay.st_dev == upper.st_dev or lay.st_dev in seen:
            seen.setdefault(lay.st_dev, probe.uuid(i))
            continue
        u = probe.uuid(i)
        if u == NULL_UUID or u in seen.values():
            log.warning("%s uuid detected in lower fs '%s', falling back to "
                        "xino=off,index=off,nfs_export=off.",
                        "null" if u == NULL_UUID else "conflicting", lay.path)
            return None
        seen[lay.st_dev] = u
    lower_root_fh = probe.fh(1, layers[1].root_fd)
    hint = "; try deleting index dir or mounting with '-o index=off' to disable inodes index"
    try:
        _verify_set(upper.root_fd, origin_x, lower_root_fh, "upper root origin")
    except IndexError_ as e:
        raise IndexError_(f"{e} (the upper layer was used over other lower layers){hint}")
    base = os.open(workdir, O_DIR)
    try:
        try:
            os.mkdir(INDEX_DIR, 0, dir_fd=base)
        except FileExistsError:
            pass
        fd = open_dir_at(base, INDEX_DIR)
    finally:
        os.close(base)
    try:
        if _getxattr(fd, origin_x) is not None:       # what kernels before 4.13 stored
            _verify_set(fd, origin_x, upper_root_fh, "index dir 'origin' xattr")
        _verify_set(fd, upper_x, upper_root_fh, "index dir 'upper' xattr")
        index = Index(fd, layers, config.userxattr)
        cleanup(index)
    except IndexError_ as e:
        os.close(fd)
        raise IndexError_(f"{e}{hint}")
    except BaseException:
        os.close(fd)
        raise
    return index


def cleanup(index: Index) -> None:
    """ovl_indexdir_cleanup: remove temporaries, stale entries and orphans; an entry that is
    not an index entry at all fails the mount."""
    from .copyup import remove_tree_at
    for entry in os.listdir(index.fd):
        name = os.fsencode(entry)
        if name.startswith(b"#"):
            remove_tree_at(index.fd, name)
            continue
        try:
            raw = bytes.fromhex(entry) if len(name) >= 2 * FB_HEADER else b""
        except ValueError:
            raw = b""
        if check_fh(raw) is not True or raw[2] != len(raw):
            raise IndexError_(f"failed to verify index ({entry}, err=-22)")
        st = index.lstat(name)
        if st is None or stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            continue                       # a whiteout: kept (exported handles only)
        if stat.S_ISDIR(st.st_mode):
            continue                       # directory entries: only with nfs_export
        origin = _getxattr(index.path(name), index.origin_xattr)
        if origin is None:
            raise IndexError_(f"failed to verify index ({entry}, err=-61)")
        if origin != raw:
            log.info("removing stale index entry %s", entry)
            os.unlink(name, dir_fd=index.fd)
            continue
        if st.st_nlink == 1:
            found = index.decode(raw)
            if found is None:
                continue                   # cannot tell: kept
            if _nlink_says_zero(index, name, found[1].st_nlink):
                log.info("removing orphan index entry %s", entry)
                os.unlink(name, dir_fd=index.fd)


def _nlink_says_zero(index: Index, name: bytes, lower_nlink: int) -> bool:
    """ovl_get_nlink(origin, index, 0) == 0 for an entry with no upper alias."""
    if lower_nlink == 1:
        return True
    try:
        raw = _getxattr(index.path(name), index.nlink_xattr)
    except OSError:
        return True
    parsed = parse_nlink(raw) if raw is not None else None
    if parsed is None:
        return True
    base, diff = parsed
    n = (lower_nlink if base == "L" else 1) + diff
    return n <= 0
