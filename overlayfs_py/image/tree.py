"""Reading overlay layer directories: an upper layer entry by entry (``walk_upper``), and the
merged view of a stack of lower layers (``LowerView``), both through held directory fds.

``walk_upper`` classifies what an upper directory holds, whatever wrote it (overlayfs-py, the
kernel, fuse-overlayfs): objects, whiteouts (char 0/0 devices, ``.wh.X`` files, kernel >= 6.7
xattr whiteouts) and opaque directories (``overlay.opaque=y`` in any namespace, or a
``.wh..wh..opq`` file). It yields one directory at a time, its entries in a fixed order
(whiteouts first, then objects, each sorted by name bytes), depth first: the order a
deterministic layer tar needs.

``LowerView`` answers "what did the image have at this path?" with the overlay's rules:
the topmost layer wins, only directories merge, whiteouts and opaque directories hide what
is below them. Layers may be in the kernel's format or keep OCI markers.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import stat
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import ondisk
from .fsutil import O_DIR

Parts = Tuple[bytes, ...]


def lstat_at(dir_fd: int, name: bytes) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def show(parts: Parts) -> str:
    """``("etc", "motd")`` -> ``/etc/motd`` (undecodable bytes kept as surrogates)."""
    return "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in parts)


def type_name(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "unknown")


class Entry:
    """One object of an upper directory (not a whiteout). ``xattrs`` (the names) are listed
    when first asked for, while the walk is at this directory."""

    __slots__ = ("name", "st", "dir_fd", "_xattrs")

    def __init__(self, name: bytes, st: os.stat_result, dir_fd: int,
                 xattrs: Optional[Tuple[str, ...]] = None):
        self.name, self.st, self.dir_fd, self._xattrs = name, st, dir_fd, xattrs

    @property
    def xattrs(self) -> Tuple[str, ...]:
        if self._xattrs is None:
            self._xattrs = _xattr_names(self.dir_fd, self.name)
        return self._xattrs

    def has(self, candidates) -> Optional[str]:
        for n in candidates:
            if n in self.xattrs:
                return n
        return None


@dataclasses.dataclass
class Dir:
    """One directory of an upper layer, as ``walk_upper`` yields it."""
    parts: Parts
    fd: int                          # valid while the walk is at this directory
    st: os.stat_result
    opaque: bool
    whiteouts: List[bytes]           # names deleted here (sorted)
    entries: List[Entry]             # objects here (sorted)
    xattrs: Tuple[str, ...] = ()     # the directory's own xattr names


def _xattr_names(dir_fd: int, name: bytes) -> Tuple[str, ...]:
    from .fsutil import proc_path
    try:
        return tuple(os.listxattr(proc_path(dir_fd, name), follow_symlinks=False))
    except OSError:
        return ()


def read_dir(fd: int, parts: Parts, st: os.stat_result) -> Dir:
    names = sorted(os.fsencode(n) for n in os.listdir(fd))
    try:
        dir_xattrs = tuple(os.listxattr(fd))
    except OSError:
        dir_xattrs = ()
    opaque_val = ondisk.opaque_value(fd, dir_xattrs)
    opaque = opaque_val is not None and opaque_val[:1] == b"y"
    xwhiteouts = opaque_val is not None and opaque_val[:1] == b"x"
    whiteouts = set()
    entries = []
    for name in names:
        if name == ondisk.OPAQUE_MARKER:
            opaque = True
            continue
        if name.startswith(ondisk.AUFS_META_PREFIX):
            continue
        target = ondisk.oci_whiteout_target(name)
        if target is not None:
            whiteouts.add(target)
            continue
        est = lstat_at(fd, name)
        if est is None:
            continue
        if ondisk.is_whiteout(est):
            whiteouts.add(name)
            continue
        xa = None
        if xwhiteouts and stat.S_ISREG(est.st_mode) and est.st_size == 0:
            xa = _xattr_names(fd, name)
            if any(n in xa for n in ondisk.WHITEOUT_XATTRS):
                whiteouts.add(name)
                continue
        entries.append(Entry(name, est, fd, xa))
    # A whiteout next to an object of the same name (OCI allows it: a whiteout applies to
    # the layers below only) is kept: the object shows, and the whiteout still hides the
    # lowers' namesake (a directory then does not merge with it).
    return Dir(parts, fd, st, opaque, sorted(whiteouts), entries, dir_xattrs)


def walk_upper(root_fd: int) -> Iterator[Dir]:
    """Depth first, parents before children, siblings in name order."""
    stack: List[Tuple[int, Parts, os.stat_result, bool]] = [
        (root_fd, (), os.fstat(root_fd), False)]
    while stack:
        fd, parts, st, owned = stack.pop()
        try:
            d = read_dir(fd, parts, st)
            children = []
            for e in d.entries:
                if stat.S_ISDIR(e.st.st_mode):
                    children.append(e)
            yield d
            for e in reversed(children):
                cfd = os.open(e.name, O_DIR, dir_fd=fd)
                stack.append((cfd, parts + (e.name,), e.st, True))
        finally:
            if owned:
                os.close(fd)


class LowerView:
    """The merged view of lower layers (top first), read through held dir fds."""

    MAX_CACHED = 256

    def __init__(self, paths: Sequence[str]):
        self.paths = [os.fspath(p) for p in paths]
        self.roots: List[int] = []
        try:
            for p in self.paths:
                self.roots.append(os.open(p, O_DIR))
        except BaseException:
            self.close()
            raise
        self.cache: "collections.OrderedDict[Tuple[int, Parts], Optional[int]]" = \
            collections.OrderedDict()

    def close(self) -> None:
        for fd in self.cache.values():
            if fd is not None:
                os.close(fd)
        self.cache.clear()
        for fd in self.roots:
            os.close(fd)
        self.roots = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __bool__(self) -> bool:
        return bool(self.roots)

    def _dir_fd(self, i: int, parts: Parts) -> Optional[int]:
        if not parts:
            return self.roots[i]
        key = (i, parts)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        parent = self._dir_fd(i, parts[:-1])
        fd = None
        if parent is not None:
            try:
                fd = os.open(parts[-1], O_DIR, dir_fd=parent)
            except OSError:
                fd = None
        self.cache[key] = fd
        while len(self.cache) > self.MAX_CACHED:
            _, old = self.cache.popitem(last=False)
            if old is not None:
                os.close(old)
        return fd

    def _hidden_in(self, i: int, dir_parts: Parts, name: bytes) -> bool:
        """Does layer i delete ``name`` in that directory (any whiteout format)?"""
        fd = self._dir_fd(i, dir_parts)
        if fd is None:
            return False
        st = lstat_at(fd, name)
        if st is not None:
            if ondisk.is_whiteout(st):
                return True
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and \
                    ondisk.dir_has_xwhiteouts(fd) and \
                    any(n in _xattr_names(fd, name) for n in ondisk.WHITEOUT_XATTRS):
                return True
            return False
        return lstat_at(fd, ondisk.WH_PREFIX + name) is not None

    def _step(self, layers: List[int], dir_parts: Parts, name: bytes):
        """One lookup step: (layers holding ``name`` as a merged directory, or the
        (layer, stat) of the non-directory that ``name`` is, or neither)."""
        dirs: List[int] = []
        for i in layers:
            fd = self._dir_fd(i, dir_parts)
            if fd is None:
                continue
            st = lstat_at(fd, name)
            if st is None:
                if lstat_at(fd, ondisk.WH_PREFIX + name) is not None:
                    break
                continue
            if self._hidden_in(i, dir_parts, name):
                break
            if stat.S_ISDIR(st.st_mode):
                dirs.append(i)
                cfd = self._dir_fd(i, dir_parts + (name,))
                if cfd is not None and ondisk.dir_is_opaque(cfd):
                    break
                continue
            if not dirs:
                return [], (i, st)
            break                      # a non-directory below a directory: hidden
        return dirs, None

    def lookup(self, parts: Parts) -> Optional[Tuple[int, os.stat_result]]:
        """(layer index, lstat) of what the lowers show at ``parts``; None if nothing."""
        if any(p.startswith(ondisk.WH_PREFIX) for p in parts):
            return None
        layers = list(range(len(self.roots)))
        if not parts:
            return (0, os.fstat(self.roots[0])) if self.roots else None
        for depth, name in enumerate(parts):
            dirs, obj = self._step(layers, parts[:depth], name)
            if depth == len(parts) - 1:
                if obj is not None:
                    return obj
                if dirs:
                    fd = self._dir_fd(dirs[0], parts)
                    return (dirs[0], os.fstat(fd)) if fd is not None else None
                return None
            if not dirs:
                return None
            layers = dirs
        return None

    def dir_layers(self, parts: Parts) -> List[int]:
        """The layers that make up the merged directory ``parts`` (top first)."""
        layers = list(range(len(self.roots)))
        for depth, name in enumerate(parts):
            layers, obj = self._step(layers, parts[:depth], name)
            if not layers:
                return []
        return layers

    def listdir(self, parts: Parts) -> Dict[bytes, Tuple[int, os.stat_result]]:
        """The merged listing of the directory ``parts``: name -> (layer, lstat)."""
        out: Dict[bytes, Tuple[int, os.stat_result]] = {}
        hidden: set = set()
        for i in self.dir_layers(parts):
            fd = self._dir_fd(i, parts)
            if fd is None:
                continue
            layer_hidden = set()
            xw = ondisk.dir_has_xwhiteouts(fd)
            for n in sorted(os.fsencode(x) for x in os.listdir(fd)):
                if n == ondisk.OPAQUE_MARKER or n.startswith(ondisk.AUFS_META_PREFIX):
                    continue
                t = ondisk.oci_whiteout_target(n)
                if t is not None:
                    layer_hidden.add(t)
                    continue
                st = lstat_at(fd, n)
                if st is None:
                    continue
                if ondisk.is_whiteout(st) or (
                        xw and stat.S_ISREG(st.st_mode) and st.st_size == 0 and
                        any(x in _xattr_names(fd, n) for x in ondisk.WHITEOUT_XATTRS)):
                    layer_hidden.add(n)
                    continue
                if n not in hidden and n not in out:
                    out[n] = (i, st)
            hidden |= layer_hidden
        return out

    def open_file(self, i: int, parts: Parts) -> int:
        """An O_RDONLY fd of the regular file ``parts`` in layer ``i``."""
        fd = self._dir_fd(i, parts[:-1])
        if fd is None:
            raise FileNotFoundError(show(parts))
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def dir_fd(self, i: int, parts: Parts) -> Optional[int]:
        return self._dir_fd(i, parts)
