"""What a container changed: the upper layer as ``docker diff`` shows it (``A``dded,
``C``hanged, ``D``eleted paths).

Without the lower layers, the upper alone says what was deleted (whiteouts), and an entry
counts as changed when it carries the overlay's copy-up marks (``overlay.origin`` or
``impure``, which the kernel and overlayfs-py set on copy-up), is a metacopy file or an opaque
directory, or is a directory above a changed or deleted path (it must have been there
before); added otherwise. With the
lower layers (``lowers=`` directories, or an image: ``diff UPPER --image SRC``) every path is
checked against what the image had: present before -> ``C``, not -> ``A``; a whiteout of a
path the image did not have is no change; an opaque directory deletes every name of the
image's directory that the upper does not have again (``D`` each).

``content=True`` (needs the lowers) keeps only real changes: a copied-up file whose type,
mode, owner, mtime, xattrs, link target or data (hashed with xxhash's XXH3-128) are all the
same as the image's is left out, and so is a directory whose own attributes are the same and
below which nothing changed. Directory mtimes are not compared (creating a child changes them).
"""
from __future__ import annotations

import dataclasses
import os
import stat
from typing import Dict, List, Optional, Sequence

import xxhash

from . import ondisk
from .errors import ImageError
from .fsutil import O_DIR, proc_path
from .tree import Dir, Entry, LowerView, Parts, show, type_name, walk_upper

ORIGIN_XATTRS = ("trusted.overlay.origin", "user.overlay.origin",
                 "trusted.overlay.impure", "user.overlay.impure")


@dataclasses.dataclass(frozen=True)
class Change:
    kind: str                 # "A", "C" or "D"
    path: str                 # "/etc/motd"
    type: Optional[str]       # file, dir, symlink, char, block, fifo, socket; None if unknown
    opaque: bool = False      # a directory that hides everything the image had below it

    def to_json(self) -> dict:
        d = {"kind": self.kind, "path": self.path, "type": self.type}
        if self.opaque:
            d["opaque"] = True
        return d

    def line(self) -> str:
        return f"{self.kind} {self.path}"


def _xattrs(path: bytes, names: Sequence[str]) -> Dict[str, bytes]:
    out = {}
    for n in names:
        if ondisk.is_private_xattr(n):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def _hash_fd(fd: int) -> bytes:
    h = xxhash.xxh3_128()
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return h.digest()
        h.update(b)


class _Differ:
    def __init__(self, lowers: Optional[LowerView], content: bool):
        self.lowers = lowers
        self.content = content
        self.changes: List[Change] = []
        self.dir_index: Dict[Parts, int] = {}    # reported directories -> index in changes

    # -- comparing one upper object with the image's
    def _same(self, d: Dir, e: Entry, found) -> bool:
        i, lst = found
        ust = e.st
        if stat.S_IFMT(ust.st_mode) != stat.S_IFMT(lst.st_mode):
            return False
        if (stat.S_IMODE(ust.st_mode), ust.st_uid, ust.st_gid) != \
                (stat.S_IMODE(lst.st_mode), lst.st_uid, lst.st_gid):
            return False
        parts = d.parts + (e.name,)
        lfd = self.lowers.dir_fd(i, d.parts)
        if lfd is None:
            return False
        upath, lpath = proc_path(d.fd, e.name), proc_path(lfd, e.name)
        try:
            lnames = tuple(os.listxattr(lpath, follow_symlinks=False))
        except OSError:
            lnames = ()
        if _xattrs(upath, e.xattrs) != _xattrs(lpath, lnames):
            return False
        fmt = stat.S_IFMT(ust.st_mode)
        if fmt == stat.S_IFDIR:
            return True
        if ust.st_mtime_ns != lst.st_mtime_ns:
            return False
        if fmt == stat.S_IFLNK:
            return os.readlink(e.name, dir_fd=d.fd) == os.readlink(e.name, dir_fd=lfd)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            return ust.st_rdev == lst.st_rdev
        if fmt == stat.S_IFREG:
            if ust.st_size != lst.st_size:
                return False
            if e.has(ondisk.METACOPY_XATTRS):
                return True                 # its data is the lower file's
            ufd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
            try:
                lfile = self.lowers.open_file(i, parts)
                try:
                    return _hash_fd(ufd) == _hash_fd(lfile)
                finally:
                    os.close(lfile)
            finally:
                os.close(ufd)
        return True

    # -- the walk
    def run(self, root_fd: int) -> List[Change]:
        # post-order bookkeeping for content mode: a directory is reported if its own
        # attributes changed or anything below it is
        pending: Dict[Parts, Change] = {}       # directories waiting for a changed child
        for d in walk_upper(root_fd):
            if any(n in d.xattrs for n in ondisk.REDIRECT_XATTRS):
                raise ImageError(f"{show(d.parts)}: a redirected directory "
                                 "(redirect_dir=on); not supported")
            lower_names = self.lowers.listdir(d.parts) if self.lowers and d.opaque else {}
            present = {e.name for e in d.entries}
            for name in d.whiteouts:
                parts = d.parts + (name,)
                if name in present:
                    continue
                if self.lowers:
                    found = self.lowers.lookup(parts)
                    if found is None:
                        continue                      # nothing was there: no change
                    self._report(Change("D", show(parts), type_name(found[1].st_mode)),
                                 pending)
                else:
                    self._report(Change("D", show(parts), None), pending)
            if d.opaque and self.lowers:
                for name, (_i, st) in sorted(lower_names.items()):
                    if name not in present and name not in d.whiteouts:
                        self._report(Change("D", show(d.parts + (name,)),
                                            type_name(st.st_mode)), pending)
            for e in d.entries:
                self._entry(d, e, pending)
        self.changes.sort(key=lambda c: c.path)
        return self.changes

    def _report(self, c: Change, pending: Dict[Parts, Change]) -> None:
        own = tuple(os.fsencode(p) for p in c.path.split("/")[1:])
        if c.type == "dir" and c.kind != "D":
            self.dir_index[own] = len(self.changes)
        self.changes.append(c)
        # every directory above a change is changed (docker does the same); without the
        # lowers, one above a changed or deleted path was there before: C, not A
        parts = own[:-1]
        while parts:
            waiting = pending.pop(parts, None)
            if waiting is not None:
                self.dir_index[parts] = len(self.changes)
                self.changes.append(waiting)
            elif not self.lowers and c.kind in ("C", "D"):
                i = self.dir_index.get(parts)
                if i is not None and self.changes[i].kind == "A":
                    self.changes[i] = dataclasses.replace(self.changes[i], kind="C")
            parts = parts[:-1]

    def _entry(self, d: Dir, e: Entry, pending: Dict[Parts, Change]) -> None:
        parts = d.parts + (e.name,)
        is_dir = stat.S_ISDIR(e.st.st_mode)
        opaque = False
        if is_dir:
            cfd = os.open(e.name, O_DIR, dir_fd=d.fd)
            try:
                opaque = ondisk.dir_is_opaque(cfd)
            finally:
                os.close(cfd)
        kind = "A"
        same = False
        if self.lowers:
            found = self.lowers.lookup(parts)
            if found is not None:
                kind = "C"
                if self.content and not opaque:
                    same = self._same(d, e, found)
        elif e.has(ORIGIN_XATTRS) or e.has(ondisk.METACOPY_XATTRS) or opaque:
            kind = "C"
        change = Change(kind, show(parts), type_name(e.st.st_mode), opaque)
        if same:
            if is_dir:
                pending[parts] = change            # reported only if something below is
            return
        self._report(change, pending)


def diff(upper: str, lowers: Sequence[str] = (), *, content: bool = False) -> List[Change]:
    """The changes in ``upper`` (see the module docstring); ``lowers`` top first."""
    if content and not lowers:
        raise ImageError("telling real changes from copy-ups needs the lower layers "
                         "(--lower or --image)")
    try:
        root = os.open(upper, O_DIR)
    except OSError as e:
        raise ImageError(f"{upper}: {e.strerror}") from None
    try:
        with LowerView(lowers) as view:
            return _Differ(view if lowers else None, content).run(root)
    finally:
        os.close(root)
