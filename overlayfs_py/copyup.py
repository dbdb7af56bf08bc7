"""Copy-up: make a lower object exist in the upper layer, atomically.

The copy is built in ``workdir/work`` under a temporary name -- data first, then xattrs (writing
data after xattrs would drop security.capability), then owner, mode and times -- and only then
renamed into place. A crash at any moment leaves either no upper copy or a complete one; stale
temporaries are removed at the next mount. Ancestor directories are copied first, top-down.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from typing import Dict, Optional

import trio

from . import creds, faultpoint, index as xindex, whiteout
from .atime import open_noatime
from .copydata import copy_file_data
from .inodes import Node
from .layers import O_DIR, lstat_at, open_dir_at, open_path_at, proc_path
from .overlay import UPPER, Overlay, fuse_error

log = logging.getLogger("overlayfs_py")

_MUST_COPY_PREFIXES = ("security.", "system.posix_acl")
METACOPY_XATTR = "trusted.overlay.metacopy"


def is_metacopy(node: Node) -> bool:
    """A metadata-only copy-up: upper object first, the layer holding its data last."""
    return not node.is_dir and len(node.layers) > 1


class Workdir:
    """``workdir/work``: the staging area (same layout as the kernel's, which cleans it too).
    It is made if missing and opened at once, so that the mount's xattr probe
    (``xattrform.choose``) can use ``fd`` before the layers are opened; ``prepare`` then
    cleans it. With index=on, ``workdir/index`` is the staging area, as for the kernel
    ("index dir will act also as workdir"): a copy into the index is then one rename."""

    def __init__(self, workdir: str):
        base = os.open(workdir, O_DIR)
        try:
            try:
                os.mkdir("work", 0o700, dir_fd=base)
            except FileExistsError:
                pass
            self.fd = open_dir_at(base, b"work")
        finally:
            os.close(base)
        self._counter = itertools.count(1)

    def prepare(self, index_fd: Optional[int] = None) -> None:
        """Remove what a crash left in ``workdir/work``; with ``index_fd`` (index=on: the
        index, whose temporaries index.setup has removed; the entries stay), stage there
        from now on."""
        self.clean()
        if index_fd is not None:
            os.close(self.fd)
            self.fd = os.dup(index_fd)

    def clean(self) -> None:
        """Remove temporaries left by a crash: they were never renamed into place."""
        for name in os.listdir(self.fd):
            remove_tree_at(self.fd, os.fsencode(name))

    def temp_name(self) -> bytes:
        return b"#%x" % next(self._counter)

    def close(self) -> None:
        os.close(self.fd)


def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """rm -rf of one entry, relative to dir_fd, never following links."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    except PermissionError:
        # unlink of a directory gives EISDIR on Linux, but be tolerant
        pass
    fd = open_dir_at(dir_fd, name)
    try:
        for child in os.listdir(fd):
            remove_tree_at(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def copy_xattrs(src: "int | str", dst: "int | str") -> None:
    """All xattrs except the overlay's own; unsupported ones are skipped unless they matter."""
    try:
        names = os.listxattr(src)       # str sources are /proc/self/fd paths: follow them
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EPERM):
            return
        raise
    for name in names:
        if whiteout.is_private_xattr(name):
            continue
        try:
            value = os.getxattr(src, name)
            os.setxattr(dst, name, value)
        except OSError as e:
            if name.startswith(_MUST_COPY_PREFIXES) and e.errno not in (errno.EOPNOTSUPP,):
                raise
            log.debug("copy-up: xattr %s not copied: %s", name, e)


def _copy_meta(src: "int | str", dst: "int | str", st: os.stat_result) -> None:
    """Owner, mode, xattrs, times -- in that order, and after the data. A user-space chown
    drops security.capability and the setuid bits (the kernel's internal one does not), and
    a write drops the capability too, so xattrs go on last but for the times."""
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    copy_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _restore_times(dir_fd: int, st: os.stat_result) -> None:
    try:
        os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass


def copy_up_removed_dir(ov: Overlay, work: Workdir, node: Node) -> int:
    """A removed directory is about to change (fchmod on an fd still open on it): if only a
    lower layer had it, copy it -- empty, with its metadata -- into the workdir and remove
    it there at once, so that the change lands on an object of our own that is already
    gone, as the upper copy of a removed merged directory is. Returns its fd."""
    fd = ov.removed_dir_fd(node)
    st = os.fstat(fd)
    if st.st_nlink == 0:
        return fd                         # an upper directory, removed
    tmp = work.temp_name()
    os.mkdir(tmp, 0o700, dir_fd=work.fd)
    try:
        new = open_dir_at(work.fd, tmp)
        try:
            _copy_meta(fd, new, st)
        except BaseException:
            os.close(new)
            raise
    finally:
        os.rmdir(tmp, dir_fd=work.fd)
    ov.keep_removed(node, new)
    return new


def ensure_upper_dir(ov: Overlay, work: Workdir, node: Node) -> int:
    """The upper fd of directory ``node``, copying it (and its ancestors) up if needed."""
    if node.unlinked:
        raise fuse_error(errno.ENOENT)        # nothing can be made in a removed directory
    if node.layer == UPPER:
        return ov.dirfd(node, UPPER)
    parent = node.parent
    parent_fd = ensure_upper_dir(ov, work, parent)
    parent_st = os.fstat(parent_fd)
    src_fd = ov.dirfd(node, node.layer)
    st = os.fstat(src_fd)
    if not creds.can_give_owner(st.st_uid, st.st_gid):
        raise OSError(errno.EOVERFLOW, "copy-up: the owner cannot be given to the copy")
    tmp = work.temp_name()
    os.mkdir(tmp, 0o700, dir_fd=work.fd)
    try:
        tfd = open_dir_at(work.fd, tmp)
        try:
            _copy_meta(src_fd, tfd, st)
        finally:
            os.close(tfd)
        os.rename(tmp, node.name, src_dir_fd=work.fd, dst_dir_fd=parent_fd)
    except BaseException:
        remove_tree_at(work.fd, tmp)
        raise
    _restore_times(parent_fd, parent_st)
    node.layers = (UPPER,) + tuple(node.layers)
    ov.changed(node)
    # the kernel cached the lower directory's attributes; now merged, it shows nlink 1 and
    # the upper directory's size, as on the kernel overlay
    ov.stale_attrs.append(node.ino)
    ov.refresh_entry(parent, node.name)
    fd = ov.dirfd(node, UPPER)
    # found by its upper copy from now on (a lookup after a rename must not make a second
    # node for it)
    st = os.fstat(fd)
    ov.table.rekey(node, (UPPER, st.st_dev, st.st_ino))
    return fd


class CopyUp:
    """Copy-up of non-directories, with one copy per node even under concurrent first writes."""

    def __init__(self, ov: Overlay, work: Workdir, fsync: bool, metacopy: bool = False):
        self.ov = ov
        self.work = work
        self.fsync = fsync
        self.metacopy = metacopy
        self.metacopy_xattr = METACOPY_XATTR
        self.origin_xattr = "user.overlay.origin" if ov.config.userxattr \
            else "trusted.overlay.origin"
        self._locks: Dict[int, trio.Lock] = {}

    async def settle(self, node: Node) -> None:
        """Wait for a copy-up of ``node`` that is under way, if any."""
        lock = self._locks.get(node.ino)
        if lock is not None:
            async with lock:
                pass

    async def copy_up(self, node: Node, data: bool = True, meta_only: bool = False) -> None:
        """Make ``node`` an upper object. ``data=False``: its contents are about to be
        truncated away. ``meta_only``: only metadata will change, so with metacopy=on a
        regular file gets a metadata-only copy (data stays in the lower layer)."""
        if node.is_dir and node.unlinked:
            copy_up_removed_dir(self.ov, self.work, node)
            return
        if node.layer == UPPER and not is_metacopy(node):
            return
        if node.is_dir:
            ensure_upper_dir(self.ov, self.work, node)
            return
        if meta_only and is_metacopy(node):
            return
        lock = self._locks.setdefault(node.ino, trio.Lock())
        try:
            async with lock:
                if is_metacopy(node):
                    if not meta_only:
                        await self._complete_metacopy(node, data)
                elif node.layer != UPPER:
                    await self._copy_up_file(node, data, meta_only and self.metacopy)
        finally:
            if self._locks.get(node.ino) is lock and not lock.statistics().tasks_waiting:
                del self._locks[node.ino]

    async def _complete_metacopy(self, node: Node, data: bool) -> None:
        """First data change of a metadata-only copy: fill the upper file in place, then drop
        the metacopy xattr. Until the xattr is gone the data is read from the lower file, so
        a crash half way leaves the old, complete contents visible (as in the kernel)."""
        ov = self.ov
        parent, name = node.paths[0]
        up_fd = ov.dirfd(parent, UPPER)
        lo_fd = ov.dirfd(parent, node.layers[-1])
        dst = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=up_fd)
        try:
            if data:
                src = open_noatime(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, lo_fd)
                try:
                    size = os.fstat(dst).st_size
                    await trio.to_thread.run_sync(self._copy_data, src, dst, size)
                finally:
                    os.close(src)
            faultpoint.hit("metacopy.filled")
            os.removexattr(dst, self.metacopy_xattr)
            faultpoint.hit("metacopy.done")
        finally:
            os.close(dst)
        node.layers = (UPPER,)
        ov.changed(node)
        if node.handles:
            for h in list(node.handles):
                h.reopen_after_copy_up(ov, parent, name)

    async def _copy_up_file(self, node: Node, data: bool, meta_only: bool = False) -> None:
        ov, work = self.ov, self.work
        parent, name = node.paths[0]
        parent_fd = ensure_upper_dir(ov, work, parent)
        parent_st = os.fstat(parent_fd)
        src_dir = ov.dirfd(parent, node.layer)
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        if not creds.can_give_owner(st.st_uid, st.st_gid):
            raise OSError(errno.EOVERFLOW, "copy-up: the owner cannot be given to the copy")
        if ov.xindex is not None and st.st_nlink > 1:
            await self._copy_up_indexed(node, parent, name, src_dir, st, data)
            return
        tmp = work.temp_name()
        try:
            metacopy = meta_only and stat.S_ISREG(st.st_mode) and st.st_size > 0
            if metacopy:
                self._copy_metadata_only(src_dir, name, tmp, st)
            else:
                await self._stage(src_dir, name, tmp, st, data)
            faultpoint.hit("copyup.staged")
            os.rename(tmp, name, src_dir_fd=work.fd, dst_dir_fd=parent_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=work.fd)
            except OSError:
                pass
            raise
        _restore_times(parent_fd, parent_st)
        new = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        lower = node.layer
        self._install(node, parent, name, new)
        if metacopy:
            node.layers = (UPPER, lower)

    async def _stage(self, src_dir: int, name: bytes, tmp: bytes, st: os.stat_result,
                     data: bool, origin: bytes = b"") -> None:
        """A full copy of ``name`` as ``tmp`` in the staging dir, marked with ``origin``."""
        work = self.work
        if stat.S_ISREG(st.st_mode):
            await self._copy_regular(src_dir, name, tmp, st, data, origin)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=src_dir)
            os.symlink(target, tmp, dir_fd=work.fd)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work.fd, follow_symlinks=False)
            if origin:
                dst = open_path_at(work.fd, tmp)
                try:
                    self._mark_origin_link(dst, origin)
                finally:
                    os.close(dst)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work.fd,
                     follow_symlinks=False)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work.fd)
            src = open_path_at(src_dir, name)
            dst = open_path_at(work.fd, tmp)
            try:
                _copy_meta(proc_path(src), proc_path(dst), st)
                self._mark_origin(proc_path(dst), origin)
            finally:
                os.close(src)
                os.close(dst)

    def _mark_origin_link(self, path_fd: int, origin: bytes) -> None:
        """overlay.origin on a symlink (trusted.* xattrs can be set on one)."""
        try:
            os.setxattr(proc_path(path_fd), self.origin_xattr, origin, follow_symlinks=False)
        except OSError as e:
            log.debug("origin not set on a symlink: %s", e)

    # ------------------------------------------------------------------ index=on
    async def _copy_up_indexed(self, node: Node, parent: Node, name: bytes, src_dir: int,
                               st: os.stat_result, data: bool) -> None:
        """index=on, a lower hard link: copy it into workdir/index under the hex of its
        handle (overlay.origin = that handle, overlay.nlink = the overlay's count relative
        to the copy's), then link the name used into the upper layer (the kernel's
        ovl_do_copy_up with to_index, then ovl_link_up). Other names of the link find the
        entry when they are looked up (Overlay._indexed_child)."""
        ov, ix = self.ov, self.ov.xindex
        fh = ix.fh(node.layer, src_dir, name)
        iname = xindex.index_name(fh)
        if ix.lstat(iname) is None:
            tmp = self.work.temp_name()          # (the staging dir is the index dir)
            try:
                await self._stage(src_dir, name, tmp, st, data, fh)
                faultpoint.hit("copyup.staged")
                os.rename(tmp, iname, src_dir_fd=self.work.fd, dst_dir_fd=ix.fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=self.work.fd)
                except OSError:
                    pass
                raise
            ix.set_nlink(iname, st.st_nlink)
        node.layers = (UPPER,)
        ov.indexed[node.ino] = iname
        ov.by_index[iname] = node
        ov.changed(node)
        self._link_up(node, parent, name)
        if node.handles:
            for h in list(node.handles):
                h.reopen_after_copy_up(ov, parent, name)

    def _link_up(self, node: Node, parent: Node, name: bytes) -> None:
        """Link the index entry of ``node`` into the upper layer as ``parent/name``."""
        ov, ix = self.ov, self.ov.xindex
        iname = ov.indexed[node.ino]
        parent_fd = ensure_upper_dir(ov, self.work, parent)
        ist = ix.lstat(iname)
        cur = lstat_at(parent_fd, name)
        if cur is not None and (cur.st_dev, cur.st_ino) == (ist.st_dev, ist.st_ino):
            return
        parent_st = os.fstat(parent_fd)
        overlay_nlink = ix.nlink(iname, ist.st_nlink)
        self._set_impure(parent_fd)
        os.link(iname, name, src_dir_fd=ix.fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        ix.set_nlink(iname, overlay_nlink)
        _restore_times(parent_fd, parent_st)
        ov.refresh_entry(parent, name)
        ov.changed(node)

    async def link_up(self, node: Node, parent: Node, name: bytes) -> None:
        """Before a change of the name ``parent/name`` of an indexed file (unlink, rename,
        link): make it an upper name of the index entry, as the kernel copies the name up
        (ovl_nlink_start), so that overlay.nlink stays right. A lower hard link not yet
        indexed is copied up into the index through that name first."""
        ov = self.ov
        if ov.xindex is None or node.is_dir:
            return
        if node.ino not in ov.indexed and node.layer != UPPER:
            try:
                lst = os.stat(name, dir_fd=ov.dirfd(parent, node.layer),
                              follow_symlinks=False)
            except OSError:
                return
            if lst.st_nlink < 2:
                return
            if (parent, name) in node.paths:
                node.put_path_first(parent, name)
            await self.copy_up(node)
        if node.ino not in ov.indexed:
            return
        await self.settle(node)
        self._link_up(node, parent, name)

    def index_unlinked(self, node: Node) -> None:
        """After a name of an indexed file went: once the overlay's count is zero, remove
        the index entry (ovl_cleanup_index)."""
        ov, ix = self.ov, self.ov.xindex
        iname = ov.indexed.get(node.ino) if ix is not None else None
        if iname is None:
            return
        ist = ix.lstat(iname)
        if ist is None:
            ov.index_entry_gone(node)
            return
        n = ix.raw_nlink(iname, ist.st_nlink)
        if n is None or n > 0:
            return
        if ist.st_nlink != 1:
            # names left in the upper layer: keep it, counting them (as the kernel does)
            ix.set_nlink(iname, ist.st_nlink - 1)
            return
        os.unlink(iname, dir_fd=ix.fd)
        ov.index_entry_gone(node)

    def _set_impure(self, dir_fd: int) -> None:
        """overlay.impure on a directory that holds a copied-up object (ovl_set_impure)."""
        x = self.origin_xattr.replace("origin", "impure")
        try:
            os.getxattr(dir_fd, x)
        except OSError:
            try:
                os.setxattr(dir_fd, x, b"y")
            except OSError as e:
                log.debug("impure mark not set: %s", e)

    def _copy_metadata_only(self, src_dir: int, name: bytes, tmp: bytes,
                            st: os.stat_result) -> None:
        """The kernel's metacopy format: a sparse upper file of the right size with all the
        metadata and an empty ``trusted.overlay.metacopy`` xattr."""
        src = open_noatime(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, src_dir)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=self.work.fd)
            try:
                os.ftruncate(dst, st.st_size)
                _copy_meta(src, dst, st)
                os.setxattr(dst, self.metacopy_xattr, b"")
                self._mark_origin(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    async def _copy_regular(self, src_dir: int, name: bytes, tmp: bytes,
                            st: os.stat_result, data: bool, origin: bytes = b"") -> None:
        work = self.work
        src = open_noatime(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, src_dir)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=work.fd)
            try:
                if data and st.st_size:
                    await trio.to_thread.run_sync(self._copy_data, src, dst, st.st_size)
                _copy_meta(src, dst, st)
                self._mark_origin(dst, origin)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _mark_origin(self, target: "int | str", origin: bytes = b"") -> None:
        """overlay.origin: the origin's handle (index.py), or empty, the kernel's own mark
        for "copied up, origin handle unknown". We read it back to keep the copy's inode
        number across remounts."""
        try:
            os.setxattr(target, self.origin_xattr, origin)
        except OSError as e:
            log.debug("origin mark not set: %s", e)

    def _copy_data(self, src: int, dst: int, size: int) -> None:
        copy_file_data(src, dst, size)
        if self.fsync:
            os.fsync(dst)

    def _install(self, node: Node, parent: Node, name: bytes, new: os.stat_result) -> None:
        """The node is now the upper object; it keeps its inode number."""
        ov = self.ov
        node.layers = (UPPER,)
        ov.changed(node)
        others = node.paths[1:]
        node.keep_first_path()
        ov.table.rekey(node, (UPPER, new.st_dev, new.st_ino))
        ov.refresh_entry(parent, name)      # upper now, lower occurrences still count
        if node.handles:
            for h in list(node.handles):
                h.reopen_after_copy_up(ov, parent, name)
        # Other lower hard links of the file are separate files from now on (as in the kernel
        # without index=on); the kernel must look them up again.
        for p, n in others:
            if p.kids is not None and p.kids.get(n) is node:
                del p.kids[n]
            ov.pending_invalidations.append((p.ino, n))
