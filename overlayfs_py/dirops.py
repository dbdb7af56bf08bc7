"""Namespace operations on the merged view, with the kernel overlay's whiteout rules.

- Removing a name that a lower layer still shows leaves a whiteout (char 0/0) in the upper layer,
  put in place atomically: built in the workdir and renamed over the upper entry (exchanged with
  it for a directory, which is then deleted in the workdir).
- A directory created where a whiteout hides a lower one is made opaque, so the old contents never
  come back. A plain mkdir in a merged parent is opaque only with redirect_dir=on, as in the
  kernel (which skips that otherwise).
- Renaming a lower or merged directory fails with EXDEV (so mv(1) copies), unless
  redirect_dir=on: then it records an overlay.redirect (see rename), as the kernel does.
- Names starting with ``.wh.`` cannot be created (EINVAL): they would be read as whiteouts.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Callable, Optional, Tuple

from . import faultpoint, whiteout
from .copyup import CopyUp, Workdir, ensure_upper_dir, remove_tree_at
from .creds import as_user
from .inodes import Node
from .layers import (RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, has_default_acl,
                     lstat_at, open_path_at, proc_path, renameat2)
from .lookup import needs_whiteout
from .overlay import UPPER, Overlay, fuse_error

log = logging.getLogger("overlayfs_py")


def _err(code: int):
    return fuse_error(code)


class Namespace:
    def __init__(self, ov: Overlay, work: Workdir, cu: CopyUp, userxattr: bool = False):
        self.ov = ov
        self.work = work
        self.cu = cu
        self.opaque_xattr = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
        self.can_mknod = True
        self._wh_template: Optional[bytes] = None

    # ------------------------------------------------------------------ helpers
    def resolve(self, parent: Node, name: bytes) -> Tuple[tuple, Node]:
        occ = self.ov.index(parent).get(name)
        if occ is None:
            raise _err(errno.ENOENT)
        node = self.ov.child(parent, name)
        if node is None:
            raise _err(errno.ENOENT)
        return occ, node

    def check_new_name(self, name: bytes) -> None:
        if len(name) > self.ov.namelen:
            raise _err(errno.ENAMETOOLONG)
        if whiteout.is_marker_name(name):
            raise _err(errno.EINVAL)

    @staticmethod
    def after_commit(what: str, fn, *args, **kwargs) -> None:
        """Cleanup after the step that made an operation visible (a rename into place):
        the operation has happened, so a failure here is logged, not reported -- an error
        reply would tell the caller that nothing changed."""
        try:
            fn(*args, **kwargs)
        except OSError as e:
            log.warning("%s: %s (the operation itself succeeded)", what, e)

    def _whiteout_template(self) -> Optional[bytes]:
        """The workdir's shared whiteout, made on first use; None if mknod is refused.

        One 0/0 device per mount, hard-linked for every whiteout, as the kernel does since 5.8
        (``ovl_whiteout``): a link costs ~12 us here against 50-550 us for ext4 to allocate a
        device inode, and deleting lower files is mostly that."""
        if self._wh_template is None and self.can_mknod:
            tmp = self.work.temp_name()
            try:
                os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=self.work.fd)
            except PermissionError:
                log.warning("mknod of whiteouts not permitted: falling back to .wh. files")
                self.can_mknod = False
                return None
            self._wh_template = tmp
        return self._wh_template

    def _link_whiteout(self, dir_fd: int, name: bytes) -> bool:
        """Hard-link the shared whiteout as ``dir_fd/name`` (which must not exist). False if
        whiteouts cannot be made here. A template at its link limit (EMLINK) is replaced."""
        retried = False
        while True:
            tmpl = self._whiteout_template()
            if tmpl is None:
                return False
            try:
                os.link(tmpl, name, src_dir_fd=self.work.fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
                return True
            except OSError as e:
                if retried or e.errno not in (errno.EMLINK, errno.ENOENT):
                    raise
            # full, or removed under us: start a new one; the old links stay valid
            self._drop_whiteout_template()
            retried = True

    def _drop_whiteout_template(self) -> None:
        if self._wh_template is not None:
            try:
                os.unlink(self._wh_template, dir_fd=self.work.fd)
            except FileNotFoundError:
                pass
            self._wh_template = None

    def close(self) -> None:
        """At unmount: the template is a workdir temporary like any other."""
        self._drop_whiteout_template()

    def whiteout(self, parent_fd: int, name: bytes, existing: Optional[os.stat_result]) -> None:
        """Replace ``name`` in the upper dir (absent, non-dir or dir) by a whiteout, atomically.

        With nothing in the way the link lands in place in one step; otherwise it is made in
        the workdir and renamed (or exchanged, for a directory) over the old entry."""
        if existing is None:
            if self._link_whiteout(parent_fd, name):
                return
        else:
            tmp = self.work.temp_name()
            if self._link_whiteout(self.work.fd, tmp):
                faultpoint.hit("whiteout.staged")
                try:
                    if stat.S_ISDIR(existing.st_mode):
                        renameat2(self.work.fd, tmp, parent_fd, name, RENAME_EXCHANGE)
                    else:
                        os.rename(tmp, name, src_dir_fd=self.work.fd, dst_dir_fd=parent_fd)
                except BaseException:
                    self.after_commit("whiteout: staged link not removed",
                                      os.unlink, tmp, dir_fd=self.work.fd)
                    raise
                if stat.S_ISDIR(existing.st_mode):
                    faultpoint.hit("whiteout.exchanged")
                    self.after_commit("whiteout: old directory not removed from the workdir",
                                      remove_tree_at, self.work.fd, tmp)
                return
        self.oci_whiteout(parent_fd, name)
        if existing is not None:
            self._discard_upper(parent_fd, name, existing)

    @staticmethod
    def oci_whiteout(parent_fd: int, name: bytes) -> None:
        """The fallback whiteout where mknod is not allowed: an empty ``.wh.NAME`` (it hides
        NAME in the layers below only, so it may be made before NAME leaves the upper)."""
        fd = os.open(whiteout.WH_PREFIX + name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC,
                     0o700, dir_fd=parent_fd)
        os.close(fd)

    def _discard_upper(self, parent_fd: int, name: bytes, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            tmp = self.work.temp_name()
            os.rename(name, tmp, src_dir_fd=parent_fd, dst_dir_fd=self.work.fd)
            self.after_commit("removed directory not deleted from the workdir",
                              remove_tree_at, self.work.fd, tmp)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def set_opaque(self, target: "int | str") -> None:
        os.setxattr(target, self.opaque_xattr, b"y")

    def _forget_name(self, parent: Node, name: bytes, node: Node,
                     upper_st: Optional[os.stat_result], gone: bool = True) -> None:
        """Bookkeeping after ``name`` stopped naming ``node``. ``gone``: the name shows
        nothing now (unlink, rmdir); otherwise the caller refreshes it (rename)."""
        if gone:
            self.ov.name_removed(parent, name)
        last_attr = node.attr
        self.ov.changed(node)
        node.remove_path(parent, name)
        if not node.paths:
            node.unlinked = True
            if last_attr is not None and not node.is_dir:
                # what the kernel's late SETATTR (writeback of times at close) gets back
                last_attr.st_nlink = 0
                node.attr = last_attr
            if node.is_dir:
                self.ov.drop_dir_state(node)
            if not (upper_st is not None and upper_st.st_nlink > 1 and not node.is_dir):
                self.ov.table.drop_key(node)

    # ------------------------------------------------------------------ removal
    async def unlink(self, parent: Node, name: bytes) -> None:
        occ, node = self.resolve(parent, name)
        if node.is_dir:
            raise _err(errno.EISDIR)
        await self.cu.settle(node)
        if self.ov.xindex is not None and occ[0][0] != UPPER:
            await self.cu.link_up(node, parent, name)
            occ = self.ov.index(parent)[name]
        parent_fd = ensure_upper_dir(self.ov, self.work, parent)
        upper_st = lstat_at(parent_fd, name) if occ[0][0] == UPPER else None
        if needs_whiteout(occ, UPPER):
            self.whiteout(parent_fd, name, upper_st)
        else:
            os.unlink(name, dir_fd=parent_fd)
        self._forget_name(parent, name, node, upper_st)
        self.cu.index_unlinked(node)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        occ, node = self.resolve(parent, name)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if self.ov.index(node):
            raise _err(errno.ENOTEMPTY)
        parent_fd = ensure_upper_dir(self.ov, self.work, parent)
        upper_st = lstat_at(parent_fd, name) if node.layer == UPPER else None
        held = self.ov.hold_dir(node)          # for whoever still has it open
        try:
            if needs_whiteout(occ, UPPER):
                self.whiteout(parent_fd, name, upper_st)
            else:
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        raise
                    self._discard_upper(parent_fd, name, upper_st)   # only markers left
        except BaseException:
            os.close(held)
            raise
        self._forget_name(parent, name, node, None)
        self.ov.keep_removed(node, held)

    # ------------------------------------------------------------------ creation
    def _prepare_create(self, parent: Node, name: bytes):
        self.check_new_name(name)
        if name in self.ov.index(parent):
            raise _err(errno.EEXIST)
        parent_fd = ensure_upper_dir(self.ov, self.work, parent)
        upper_st = lstat_at(parent_fd, name)
        if upper_st is not None and not whiteout.is_kernel_whiteout(upper_st):
            raise _err(errno.EEXIST)
        oci = lstat_at(parent_fd, whiteout.WH_PREFIX + name) is not None
        return parent_fd, upper_st is not None, oci

    def _owner(self, parent_fd: int, uid: int, gid: int) -> Tuple[int, int, bool]:
        """Owner of a new object in the layers, and whether the parent is setgid."""
        pst = os.fstat(parent_fd)
        sgid = bool(pst.st_mode & stat.S_ISGID)
        lgid = pst.st_gid if sgid else self.ov.gidmap.to_layer(gid)
        return self.ov.uidmap.to_layer(uid), lgid, sgid

    def make(self, parent: Node, name: bytes, uid: int, gid: int, is_dir: bool,
             maker: Callable[[int, bytes, int], Optional[int]], mode: int = 0, umask: int = 0):
        """Create ``name`` with ``maker(dir_fd, name, mode)``; returns (node, maker's result).

        ``umask`` is the caller's, when the kernel did not apply it (DONT_MASK): as on a local
        filesystem it applies unless the parent has a default ACL, which then decides the
        mode (the upper filesystem applies it, as it does under the kernel's overlay)."""
        parent_fd, over_whiteout, oci = self._prepare_create(parent, name)
        if umask and not has_default_acl(parent_fd):
            mode &= ~umask
        luid, lgid, sgid = self._owner(parent_fd, uid, gid)
        # with redirects (or metacopy) on, the kernel makes every new directory of a merged
        # parent opaque (ovl_create_upper: no offline changes to lower layers are allowed)
        opaque_dir = is_dir and self.ov.config.redirect_create and len(parent.layers) > 1
        if over_whiteout or (is_dir and (oci or opaque_dir)):
            # built in the workdir: a directory must be opaque before it shows
            result = self._make_staged(parent_fd, name, luid, lgid, sgid, is_dir, maker,
                                       mode, over_whiteout)
        else:
            with as_user(luid, lgid):
                result = maker(parent_fd, name, mode)
        if oci:
            self.after_commit("create: OCI whiteout not removed", os.unlink,
                              whiteout.WH_PREFIX + name, dir_fd=parent_fd)
        self.ov.name_changed(parent, name)
        node = self.ov.child(parent, name)
        if node is None:
            raise _err(errno.EIO)
        return node, result

    def _make_staged(self, parent_fd, name, uid, gid, sgid, is_dir, maker, mode,
                     over_whiteout: bool):
        """Build in the workdir, then move into place: swapped with the whiteout it replaces
        (the kernel's create-over-whiteout) or, with none there, renamed without replacing."""
        work = self.work
        tmp = work.temp_name()
        result = maker(work.fd, tmp, mode)
        try:
            if is_dir:
                faultpoint.hit("mkdir.staged")
            pfd = open_path_at(work.fd, tmp)
            try:
                p = proc_path(pfd)
                st = os.fstat(pfd)
                os.chown(tmp, uid, gid, dir_fd=work.fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    perm = stat.S_IMODE(mode) if mode else stat.S_IMODE(st.st_mode)
                    if is_dir and sgid:
                        perm |= stat.S_ISGID
                    os.chmod(p, perm)
                if is_dir:
                    self.set_opaque(p)
            finally:
                os.close(pfd)
            if is_dir:
                faultpoint.hit("mkdir.opaque")
            if not over_whiteout:
                renameat2(work.fd, tmp, parent_fd, name, RENAME_NOREPLACE)
            elif is_dir:
                renameat2(work.fd, tmp, parent_fd, name, RENAME_EXCHANGE)
            else:
                os.rename(tmp, name, src_dir_fd=work.fd, dst_dir_fd=parent_fd)
        except BaseException:
            if isinstance(result, int) and not is_dir:
                os.close(result)
            remove_tree_at(work.fd, tmp)
            raise
        if is_dir and over_whiteout:
            faultpoint.hit("mkdir.exchanged")
            self.after_commit("mkdir: replaced whiteout not removed from the workdir",
                              os.unlink, tmp, dir_fd=work.fd)
        return result

    def tmpfile(self, parent: Node, uid: int, gid: int, mode: int, umask: int,
                oflags: int) -> Tuple[Node, int]:
        """An O_TMPFILE file in the upper copy of ``parent`` (copied up first, as the
        kernel's overlay does): owned by the caller, umask as for create. It has no name
        until ``link`` gives it one; until then the node is known by its open fds only."""
        parent_fd = ensure_upper_dir(self.ov, self.work, parent)
        if umask and not has_default_acl(parent_fd):
            mode &= ~umask
        luid, lgid, _ = self._owner(parent_fd, uid, gid)
        oflags = (oflags & ~os.O_DIRECTORY) | os.O_TMPFILE
        with as_user(luid, lgid):
            fd = os.open(".", oflags, stat.S_IMODE(mode), dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            node = self.ov.unnamed_node(st)
        except BaseException:
            os.close(fd)
            raise
        return node, fd

    async def link(self, node: Node, new_parent: Node, new_name: bytes) -> Node:
        if node.is_dir:
            raise _err(errno.EPERM)
        self.check_new_name(new_name)
        if new_name in self.ov.index(new_parent):
            raise _err(errno.EEXIST)
        if not node.paths:
            # an O_TMPFILE file (the kernel refuses links to other unlinked files): link
            # it through one of its open fds, as linkat(AT_EMPTY_PATH) would
            h = next(iter(node.handles or ()), None)
            if h is None:
                raise _err(errno.ENOENT)
            src_fd, src_name = None, b"/proc/self/fd/%d" % h.fd
        else:
            await self.cu.copy_up(node)
            if node.ino in self.ov.indexed:      # the kernel copies the old name up too
                await self.cu.link_up(node, *node.paths[0])
            src_fd, src_name = self.ov.parent_fd(node, UPPER)

        def maker(dir_fd: int, name: bytes) -> None:
            if src_fd is None:
                os.link(src_name, name, dst_dir_fd=dir_fd, follow_symlinks=True)
            else:
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)

        parent_fd, over_whiteout, oci = self._prepare_create(new_parent, new_name)
        if over_whiteout:
            tmp = self.work.temp_name()
            maker(self.work.fd, tmp)
            try:
                os.rename(tmp, new_name, src_dir_fd=self.work.fd, dst_dir_fd=parent_fd)
            except BaseException:
                self.after_commit("link: staged link not removed", os.unlink, tmp,
                                  dir_fd=self.work.fd)
                raise
        else:
            maker(parent_fd, new_name)
        if oci:
            self.after_commit("link: OCI whiteout not removed", os.unlink,
                              whiteout.WH_PREFIX + new_name, dir_fd=parent_fd)
        self.ov.name_changed(new_parent, new_name)
        self.ov.changed(node)
        node.add_path(new_parent, new_name)
        node.unlinked = False
        if new_parent.kids is not None:
            new_parent.kids[new_name] = node
        return node

    # ------------------------------------------------------------------ rename
    @staticmethod
    def _pure_upper_dir(node: Node) -> bool:
        return node.layers == (UPPER,)

    async def rename(self, p_old: Node, n_old: bytes, p_new: Node, n_new: bytes,
                     exchange: bool, noreplace: bool) -> Tuple[Node, ...]:
        """Returns the nodes that moved (none for a rename of a name onto itself)."""
        ov = self.ov
        self.check_new_name(n_new)
        occ_old, src = self.resolve(p_old, n_old)
        occ_new = ov.index(p_new).get(n_new)
        dst = ov.child(p_new, n_new) if occ_new is not None else None
        if dst is None and occ_new is not None:
            occ_new = None
        if noreplace and dst is not None:
            raise _err(errno.EEXIST)
        if exchange and dst is None:
            raise _err(errno.ENOENT)
        if dst is src:
            return ()
        redirect = self.ov.config.redirect_create
        if src.is_dir and not self._pure_upper_dir(src) and not redirect:
            raise _err(errno.EXDEV)
        if dst is not None:
            if exchange and dst.is_dir and not self._pure_upper_dir(dst) and not redirect:
                raise _err(errno.EXDEV)
            if not exchange:
                if dst.is_dir and not src.is_dir:
                    raise _err(errno.EISDIR)
                if src.is_dir and not dst.is_dir:
                    raise _err(errno.ENOTDIR)
                if dst.is_dir and ov.index(dst):
                    raise _err(errno.ENOTEMPTY)
        # directories whose lower layers have them elsewhere after this: they get a redirect
        moving = [n for n in (src, dst if exchange else None)
                  if n is not None and n.is_dir and not self._pure_upper_dir(n)]
        await self.cu.settle(src)
        if dst is not None:
            await self.cu.settle(dst)
        if not src.is_dir and src.paths and src.paths[0] != (p_old, n_old):
            # several names of one lower hard link share this node (README): copy up the
            # name being renamed, not whichever name was looked up first
            src.put_path_first(p_old, n_old)
        await self.cu.copy_up(src)
        if exchange:
            await self.cu.copy_up(dst)
        # index=on: names of an indexed file are linked up before they change (the kernel's
        # copy-up of the dentry, ovl_nlink_start), so that overlay.nlink stays right
        if ov.xindex is not None:
            await self.cu.link_up(src, p_old, n_old)
            occ_old = ov.index(p_old).get(n_old, occ_old)
            if dst is not None:
                await self.cu.link_up(dst, p_new, n_new)
        # the awaits above may have let other requests run: check the names still hold
        if ov.child(p_old, n_old) is not src or (
                dst is not None and ov.child(p_new, n_new) is not dst):
            raise _err(errno.ENOENT)
        old_fd = ensure_upper_dir(ov, self.work, p_old)
        new_fd = ensure_upper_dir(ov, self.work, p_new)
        redirects = self._set_redirects(moving, p_old is p_new)
        try:
            moved = await self._rename_upper(src, dst, occ_old, p_old, n_old, p_new, n_new,
                                             old_fd, new_fd, exchange)
        except BaseException:
            self._undo_redirects(redirects)
            raise
        for node, _old, value, where in redirects:
            ov.redirects[node.ino] = {**ov.redirects.get(node.ino, {}), **where}
            ov.redirect_value[node.ino] = value
            ov.drop_fds(node)                 # (reopened at the recorded places)
        return moved

    def _set_redirects(self, nodes, samedir: bool):
        """Record where the lower layers have each directory about to move: an
        overlay.redirect on its upper copy (the kernel's ovl_set_redirect: its old name if it
        stays in its parent, else its path from the root, built from the ancestors' own
        redirects; an existing one is kept if it still holds), and {layer: path} for us.
        Returns [(node, previous value, value, {layer: path})] for _undo_redirects."""
        ov = self.ov
        done = []
        try:
            for node in nodes:
                where = {layer: ov.layer_components(node, layer)
                         for layer in node.layers if layer != UPPER}
                old = ov.redirect_value.get(node.ino)
                if old is not None and (samedir or old.startswith(b"/")):
                    done.append((node, old, old, where))
                    continue
                value = node.name if samedir else self._absolute_redirect(node)
                os.setxattr(ov.dirfd(node, UPPER), ov.redirect_xattr, value)
                done.append((node, old, value, where))
        except BaseException:
            self._undo_redirects(done)
            raise
        return done

    def _absolute_redirect(self, node: Node) -> bytes:
        parts = []
        d = node
        while d.parent is not None:
            seg = self.ov.redirect_value.get(d.ino, d.name)
            if seg.startswith(b"/"):
                parts.append(seg[1:])
                break
            parts.append(seg)
            d = d.parent
        value = b"/" + b"/".join(reversed(parts))
        if len(value) > whiteout.REDIRECT_MAX:
            raise _err(errno.EXDEV)           # as the kernel: mv(1) copies it instead
        return value

    def _undo_redirects(self, done) -> None:
        for node, old, value, _ in done:
            if old == value:
                continue
            try:
                fd = self.ov.dirfd(node, UPPER)
                if old is None:
                    os.removexattr(fd, self.ov.redirect_xattr)
                else:
                    os.setxattr(fd, self.ov.redirect_xattr, old)
            except OSError as e:
                log.warning("rename failed: redirect not taken back: %s", e)

    async def _rename_upper(self, src, dst, occ_old, p_old, n_old, p_new, n_new, old_fd,
                            new_fd, exchange):
        ov = self.ov
        if exchange:
            # a directory landing in a merged parent must not merge with a lower namesake
            marked = [self._opaque_if_moved_into_merged(src, p_new),
                      self._opaque_if_moved_into_merged(dst, p_old)]
            try:
                renameat2(old_fd, n_old, new_fd, n_new, RENAME_EXCHANGE)
            except BaseException:
                self._unmark_opaque(marked)
                raise
            for node, pa, na, pb, nb in ((src, p_old, n_old, p_new, n_new),
                                         (dst, p_new, n_new, p_old, n_old)):
                node.remove_path(pa, na)
                node.put_path_first(pb, nb)
            ov.name_changed(p_old, n_old)
            ov.name_changed(p_new, n_new)
            ov.changed(src)
            ov.changed(dst)
            return src, dst

        upper_new = lstat_at(new_fd, n_new)
        held = None
        if dst is not None and dst.is_dir:
            held = ov.hold_dir(dst)            # for whoever still has it open
        try:
            self._rename_over(src, occ_old, p_old, n_old, p_new, n_new, old_fd, new_fd,
                              dst, upper_new)
        except BaseException:
            if held is not None:
                os.close(held)
            raise
        if dst is not None:
            self._forget_name(p_new, n_new, dst, None, gone=False)
            self.cu.index_unlinked(dst)
            if held is not None:
                if dst.unlinked:
                    ov.keep_removed(dst, held)
                else:
                    os.close(held)
        src.remove_path(p_old, n_old)
        src.put_path_first(p_new, n_new)
        ov.name_changed(p_old, n_old)
        ov.name_changed(p_new, n_new)
        ov.changed(src)
        return (src,)

    def _rename_over(self, src, occ_old, p_old, n_old, p_new, n_new, old_fd, new_fd, dst,
                     upper_new) -> None:
        """The upper-layer part of a rename that is not an exchange."""
        if dst is not None and dst.is_dir and upper_new is not None and \
                stat.S_ISDIR(upper_new.st_mode):
            self._empty_dir(new_fd, n_new, upper_new)
        new_is_whiteout = upper_new is not None and whiteout.is_kernel_whiteout(upper_new)
        flags = 0
        cleanup_whiteout = False
        if needs_whiteout(occ_old, UPPER):
            flags = RENAME_EXCHANGE if new_is_whiteout else RENAME_WHITEOUT
        elif src.is_dir and new_is_whiteout:
            flags = RENAME_EXCHANGE
            cleanup_whiteout = True
        marked = [self._opaque_if_moved_into_merged(src, p_new)]
        try:
            if flags == RENAME_WHITEOUT and not self.can_mknod:
                # the .wh. file first: it fails (a 252+ byte name) before anything moved,
                # and it hides only the lower n_old, which the upper one still covers
                self.oci_whiteout(old_fd, n_old)
                try:
                    os.rename(n_old, n_new, src_dir_fd=old_fd, dst_dir_fd=new_fd)
                except BaseException:
                    os.unlink(whiteout.WH_PREFIX + n_old, dir_fd=old_fd)
                    raise
            else:
                faultpoint.hit("rename.before")
                renameat2(old_fd, n_old, new_fd, n_new, flags)
                faultpoint.hit("rename.after")
        except BaseException:
            self._unmark_opaque(marked)
            raise
        if cleanup_whiteout:
            self.after_commit("rename: swapped whiteout not removed", os.unlink, n_old,
                              dir_fd=old_fd)
        if lstat_at(new_fd, whiteout.WH_PREFIX + n_new) is not None:
            self.after_commit("rename: OCI whiteout not removed", os.unlink,
                              whiteout.WH_PREFIX + n_new, dir_fd=new_fd)

    def _opaque_if_moved_into_merged(self, node: Node, new_parent: Node) -> Optional[int]:
        """The kernel marks a (pure upper) directory opaque when it moves into a merged
        parent, so a lower directory of the same name there never shows through it.
        Returns the directory's fd if it was marked here (see _unmark_opaque)."""
        if node.is_dir and len(new_parent.layers) > 1 and self._pure_upper_dir(node):
            fd = self.ov.dirfd(node, UPPER)
            if not whiteout.dir_is_opaque(fd):
                self.set_opaque(fd)
                return fd
        return None

    def _unmark_opaque(self, fds) -> None:
        """The rename failed: take back the opaque marks made for it."""
        for fd in fds:
            if fd is not None:
                self.after_commit("rename failed: opaque mark not taken back",
                                  os.removexattr, fd, self.opaque_xattr)

    def _empty_dir(self, parent_fd: int, name: bytes, st: os.stat_result) -> None:
        """Make an (only-markers) upper dir truly empty and opaque, atomically, so that a
        directory can be renamed over it (the kernel's ovl_clear_empty)."""
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            if not os.listdir(fd):
                return
        finally:
            os.close(fd)
        work = self.work
        tmp = work.temp_name()
        os.mkdir(tmp, 0o700, dir_fd=work.fd)
        tfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=work.fd)
        try:
            os.fchown(tfd, st.st_uid, st.st_gid)
            os.fchmod(tfd, stat.S_IMODE(st.st_mode))
            self.set_opaque(tfd)
        finally:
            os.close(tfd)
        renameat2(work.fd, tmp, parent_fd, name, RENAME_EXCHANGE)
        remove_tree_at(work.fd, tmp)
