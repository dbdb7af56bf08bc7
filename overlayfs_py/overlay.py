"""The union state: layers, the node table, directory fds, merged indexes and attributes.

Every object is reached from a layer root fd by opening one component at a time with
O_NOFOLLOW (``dir_fd``), so no path is resolved from '/' and no link in a layer is followed.
Directory fds are kept in a bounded LRU cache (the open-file limit is 20000 and cannot be raised)
and can always be reopened from their parent.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from typing import Dict, List, Optional, Set, Tuple

import pyfuse3

from . import dirindex, index as xindex, lookup, whiteout
from .config import Config
from .idmap import IdMap
from .inodes import ROOT_INODE, InodeTable, Node
from .layers import Layer, getxattr_at, listxattr_at, lstat_at, open_dir_at, open_path_at
from .readdir import Listing

log = logging.getLogger("overlayfs_py")

FD_CACHE_SIZE = 4096
UPPER = 0                  # index of the upper layer when the mount is writable


ORIGIN_XATTRS = ("trusted.overlay.origin", "user.overlay.origin")


def _has_xattr(path: bytes, name: str) -> bool:
    try:
        os.getxattr(path, name, follow_symlinks=False)
        return True
    except OSError:
        return False


def fuse_error(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


# A non-directory's layers tuple (one layer): one shared tuple per layer instead of one
# per node.
_SHARED: dict = {}


def _shared(value):
    return _SHARED.setdefault(value, value)


class Overlay:
    def __init__(self, config: Config):
        self.config = config
        self.writable = config.writable
        paths: List[Tuple[str, bool]] = []
        if config.upper is not None:
            paths.append((config.upper, self.writable))
        paths.extend((p, False) for p in config.lowers)
        self.layers: List[Layer] = []
        try:
            for i, (p, w) in enumerate(paths):
                self.layers.append(Layer(i, p, w))
        except OSError:
            self.close()
            raise
        self.upper = self.layers[0] if config.upper is not None else None
        # the longest name any layer takes, as the kernel's ofs->namelen: longer names
        # are refused at lookup (ENAMETOOLONG), shorter ones are left to the layers
        self.namelen = max(os.fstatvfs(layer.root_fd).f_namemax for layer in self.layers)
        self.uidmap = IdMap(config.uidmap)
        self.gidmap = IdMap(config.gidmap)
        self.st_dev_upper = self.upper.st_dev if self.upper else None
        root = Node(ROOT_INODE, None, b"", True, tuple(range(len(self.layers))), None)
        self.table = InodeTable(root)
        self.root = root
        self._fds: "OrderedDict[Tuple[int, int], int]" = OrderedDict()
        # removed directories the kernel still knows (an open fd, a cwd): ino -> an fd of
        # the removed object (hold_dir / detached_dir), until the kernel forgets them
        self.detached: Dict[int, int] = {}
        # redirect_dir: directories whose lower layers hold them somewhere else than their
        # parent's lower dirs under their own name (a redirect followed at lookup, or a
        # rename): ino -> {layer: path from the layer root}; and the overlay.redirect value
        # of a directory's upper copy, which the next rename builds on
        self.redirect_follow = config.redirect_follow
        self.redirect_xattr = whiteout.redirect_xattr(config.userxattr)
        self.redirects: Dict[int, Dict[int, Tuple[bytes, ...]]] = {}
        self.redirect_value: Dict[int, bytes] = {}
        self.pending_invalidations: List[Tuple[int, bytes]] = []
        # index=on (index.py): workdir/index, set up by session.run; the nodes backed by an
        # index entry (a copied-up lower hard link): ino -> entry name, and entry name ->
        # node, so that every name of the hard link finds the one node
        self.xindex: Optional[xindex.Index] = None
        self.indexed: Dict[int, bytes] = {}
        self.by_index: Dict[bytes, Node] = {}
        # directories whose listing the kernel may cache (we answered a READDIR for them
        # since their last change), and those of them whose names changed since: the glue
        # has the kernel drop those cached listings (Operations._drop_listings)
        self.listed_dirs: Set[int] = set()
        self.changed_dirs: List[int] = []
        # inodes whose attributes the kernel cached and must fetch again before the reply
        # (Operations._flush_stale_attrs)
        self.stale_attrs: List[int] = []
        self.entry_timeout = config.timeout
        self.attr_timeout = config.timeout
        # directories by last use of their listing, oldest first (trim_candidates); kept
        # only when trimming is on (max_nodes), as it costs every lookup a little
        self.dir_lru: "Optional[OrderedDict[int, Node]]" = \
            OrderedDict() if config.max_nodes else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in self.detached.values():
            os.close(fd)
        self.detached.clear()
        for layer in self.layers:
            layer.close()
        if self.xindex is not None:
            self.xindex.close()
            self.xindex = None

    # ----------------------------------------------------------------- directory fds
    def dirfd(self, node: Node, layer: int) -> int:
        """An O_RDONLY fd of directory ``node`` in ``layer``, opened relative to its parent."""
        if node.ino == ROOT_INODE:
            return self.layers[layer].root_fd
        key = (node.ino, layer)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        if node.parent is None:
            raise fuse_error(errno.ENOENT)      # removed, still open somewhere
        where = self.redirects.get(node.ino)
        if where is not None and layer in where:
            fd = self._open_components(layer, where[layer])
        else:
            parent_fd = self.dirfd(node.parent, layer)
            fd = open_dir_at(parent_fd, node.name)
        self._fds[key] = fd
        if len(self._fds) > FD_CACHE_SIZE:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _open_components(self, layer: int, comps: Tuple[bytes, ...]) -> int:
        """The directory at ``comps`` below the root of ``layer``, one O_NOFOLLOW component
        at a time."""
        fd = self.layers[layer].root_fd
        owned = None
        try:
            for c in comps:
                nxt = open_dir_at(fd, c)
                if owned is not None:
                    os.close(owned)
                fd = owned = nxt
        except BaseException:
            if owned is not None:
                os.close(owned)
            raise
        if owned is None:
            return os.dup(fd)
        return owned

    def layer_components(self, node: Node, layer: int) -> Tuple[bytes, ...]:
        """Where directory ``node`` is in ``layer``: its path from the layer's root."""
        if node.ino == ROOT_INODE:
            return ()
        where = self.redirects.get(node.ino)
        if where is not None and layer in where:
            return where[layer]
        return self.layer_components(node.parent, layer) + (node.name,)

    def drop_fds(self, node: Node) -> None:
        """Forget cached fds of a directory that was removed, forgotten or replaced."""
        for layer in range(len(self.layers)):
            fd = self._fds.pop((node.ino, layer), None)
            if fd is not None:
                os.close(fd)

    def parent_fd(self, node: Node, layer: Optional[int] = None) -> Tuple[int, bytes]:
        """(fd of the parent dir in the node's layer, name): where the backing object lives."""
        layer = node.layer if layer is None else layer
        if layer == UPPER and self.indexed:
            iname = self.indexed.get(node.ino)
            if iname is not None:
                return self.xindex.fd, iname
        last = None
        for parent, name in node.paths:
            try:
                return self.dirfd(parent, layer), name
            except OSError as e:
                last = e
        if last is not None:
            raise last
        raise fuse_error(errno.ENOENT)

    # ----------------------------------------------------------------- merged view
    def index(self, node: Node) -> lookup.Index:
        """The merged listing of a directory, built once from one scandir per layer."""
        idx = node.index
        if idx is None and node.unlinked:
            return {}
        if idx is None:
            listings = []
            for layer in node.layers:
                try:
                    listings.append((layer, dirindex.scan_layer_dir(self.dirfd(node, layer))))
                except (FileNotFoundError, NotADirectoryError):
                    continue
            idx = node.index = lookup.merge_listings(listings)
            node.listing = None
        lru = self.dir_lru
        if lru is not None:
            if node.ino in lru:
                lru.move_to_end(node.ino)
            else:
                lru[node.ino] = node
        return idx

    def listing(self, node: Node) -> Listing:
        """The merged names of a directory in readdir order, kept until a name changes."""
        lst = node.listing
        if lst is None:            # every place that drops node.index drops this too
            lst = node.listing = Listing(self.index(node).keys())
        return lst

    def refresh_entry(self, parent: Node, name: bytes) -> None:
        """Recompute one name of a cached merged index after we changed it in the upper layer."""
        if parent.index is None:
            return
        parent.listing = None
        listings = []
        for layer in parent.layers:
            try:
                fd = self.dirfd(parent, layer)
            except OSError:
                continue
            ents = []
            st = lstat_at(fd, name)
            if st is not None:
                if whiteout.is_kernel_whiteout(st):
                    ents.append((name, lookup.WHITEOUT))
                else:
                    ents.append((name, lookup.DIR if stat.S_ISDIR(st.st_mode) else lookup.NONDIR))
            if lstat_at(fd, whiteout.WH_PREFIX + name) is not None:
                ents.append((name, lookup.WHITEOUT))
            listings.append((layer, ents))
        occ = lookup.merge_listings(listings).get(name)
        if occ is None:
            parent.index.pop(name, None)
        else:
            parent.index[name] = occ

    def child(self, parent: Node, name: bytes) -> Optional[Node]:
        """The node for ``name`` in ``parent``, or None. Does not take a kernel reference."""
        kids = parent.kids
        if kids is not None:
            node = kids.get(name)
            if node is not None:
                return node
        occ = self.index(parent).get(name)
        if occ is None:
            return None
        top, is_dir = occ[0]
        st = lstat_at(self.dirfd(parent, top), name)
        if st is None:
            return None              # changed behind our back: treat as absent
        if stat.S_ISDIR(st.st_mode) != is_dir:
            is_dir = stat.S_ISDIR(st.st_mode)
            occ = ((top, is_dir),)
        key = (top, st.st_dev, st.st_ino)
        node = self.table.find(key)
        if (node is None or node.unlinked) and self.xindex is not None and not is_dir \
                and st.st_nlink > 1:
            node = self._indexed_child(parent, name, top, st, occ) or node
        if node is None or node.is_dir != is_dir or node.unlinked:
            where = redirect = None
            if is_dir:
                layers, opened, where, redirect = self._dir_layers(parent, name, occ)
            elif self.config.metacopy and len(occ) > 1 and stat.S_ISREG(st.st_mode) \
                    and not occ[1][1] and self._is_metacopy(parent, top, name):
                layers = (top, occ[1][0])        # metadata here, data in the lower file
            else:
                layers = _shared((top,))
            ino_key = self._origin_key(parent, name, st, occ, layers, is_dir,
                                       opened if is_dir else None) or key
            node = self.table.add(
                Node(self.table.new_ino(ino_key), parent, name, is_dir, layers, key))
            if is_dir:
                if where:
                    self.redirects[node.ino] = where
                if redirect is not None:
                    self.redirect_value[node.ino] = redirect
                self._adopt_fds(node, opened)
        else:
            node.add_path(parent, name)
        if node.attr is None or not node.handles:
            if self.indexed and node.ino in self.indexed and top != UPPER:
                st = self.stat_node(node)         # the copy, not the lower name's file
            node.attr = self._make_attrs(node, st)
        if is_dir or self.dir_lru is not None:
            # Files are not kept by name (~40 bytes each on a big tree): the next lookup of
            # one finds its node by key (table.find) after the lstat its reply needs anyway.
            # Trimming (max_nodes) walks the files of a directory by name, so keeps them.
            if kids is None:
                kids = parent.kids = {}
            kids[name] = node
        return node

    def _indexed_child(self, parent: Node, name: bytes, top: int, st: os.stat_result,
                       occ) -> Optional[Node]:
        """index=on: the node of a name of a copied-up lower hard link (ovl_lookup_index):
        a lower name whose handle names an index entry, or an upper name whose origin does
        and which is that entry's inode. None if the name is not indexed."""
        ix = self.xindex
        dir_fd = self.dirfd(parent, top)
        try:
            if top == UPPER:
                fh = os.getxattr(b"/proc/self/fd/%d/%s" % (dir_fd, name), ix.origin_xattr,
                                 follow_symlinks=False)
                if xindex.check_fh(fh) is not True:
                    return None
            else:
                fh = ix.fh(top, dir_fd, name)
        except OSError:
            return None
        iname = xindex.index_name(fh)
        node = self.by_index.get(iname)
        if node is None:
            ist = ix.lstat(iname)
            if ist is None or stat.S_IFMT(ist.st_mode) != stat.S_IFMT(st.st_mode):
                return None
            if top == UPPER:
                if (ist.st_dev, ist.st_ino) != (st.st_dev, st.st_ino):
                    return None                # copied up, but not through this index
                key = self._index_origin_key(parent, name, fh, occ)
            else:
                key = (top, st.st_dev, st.st_ino)
            key = key or (UPPER, ist.st_dev, ist.st_ino)
            node = self.table.find(key)
            if node is None or node.is_dir:
                node = self.table.add(Node(self.table.new_ino(key), parent, name, False,
                                           _shared((UPPER,)), key))
            node.layers = _shared((UPPER,))
            self.indexed[node.ino] = iname
            self.by_index[iname] = node
        node.unlinked = False
        node.add_path(parent, name)
        return node

    def _index_origin_key(self, parent: Node, name: bytes, fh: bytes, occ):
        """The key (so the number) of the lower origin of an indexed upper file: the lower
        file of the same name if it is the origin, else the one the handle opens."""
        ix = self.xindex
        if len(occ) > 1 and not occ[1][1]:
            low = occ[1][0]
            try:
                fd = self.dirfd(parent, low)
                if ix.fh(low, fd, name) == fh:
                    lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    return (low, lst.st_dev, lst.st_ino)
            except OSError:
                pass
        found = ix.decode(fh)
        if found is None:
            return None
        low, lst = found
        return (low, lst.st_dev, lst.st_ino)

    def index_entry_gone(self, node: Node) -> None:
        """The node's index entry was removed (its last name went)."""
        iname = self.indexed.pop(node.ino, None)
        if iname is not None and self.by_index.get(iname) is node:
            del self.by_index[iname]

    def unnamed_node(self, st: os.stat_result) -> Node:
        """A node for an upper file that has no name yet (O_TMPFILE)."""
        key = (UPPER, st.st_dev, st.st_ino)
        node = self.table.add(Node(self.table.new_ino(key), None, b"", False, (UPPER,), key))
        node.unlinked = True
        return node

    def _origin_key(self, parent: Node, name: bytes, st: os.stat_result, occ, layers,
                    is_dir: bool, opened=None):
        """The object whose number a copied-up object keeps, as the kernel keeps st_ino
        across copy-up and remount: for a merged directory its bottom layer, for an upper
        non-directory marked as a copy-up (overlay.origin xattr) the lower file of the same
        name, unless that one has other hard links (they are separate files now)."""
        try:
            if is_dir:
                if len(layers) < 2:
                    return None
                low = layers[-1]
            else:
                if layers[0] != UPPER or len(occ) < 2 or occ[1][1]:
                    return None
                path = b"/proc/self/fd/%d/%s" % (self.dirfd(parent, UPPER), name)
                if not any(_has_xattr(path, x) for x in ORIGIN_XATTRS):
                    return None
                low = occ[1][0]
            if opened and low in opened:
                lst = os.fstat(opened[low])       # (where a redirect led)
            else:
                lst = lstat_at(self.dirfd(parent, low), name)
        except OSError:
            return None
        if lst is None or stat.S_IFMT(lst.st_mode) != stat.S_IFMT(st.st_mode):
            return None
        if not is_dir and lst.st_nlink > 1:
            return None
        return (low, lst.st_dev, lst.st_ino)

    def _is_metacopy(self, parent: Node, layer: int, name: bytes) -> bool:
        path = b"/proc/self/fd/%d/%s" % (self.dirfd(parent, layer), name)
        try:
            os.getxattr(path, "trusted.overlay.metacopy", follow_symlinks=False)
            return True
        except OSError:
            return False

    def changed(self, node: Node) -> None:
        """The object behind node changed (attributes, size, links): drop cached attributes."""
        node.attr = None

    def name_changed(self, parent: Node, name: bytes) -> None:
        """``name`` in ``parent`` now names something else, or nothing."""
        self.refresh_entry(parent, name)
        if parent.kids is not None:
            parent.kids.pop(name, None)
        parent.attr = None
        self._listing_changed(parent)

    def name_removed(self, parent: Node, name: bytes) -> None:
        """``name`` in ``parent`` shows nothing any more: we deleted it or whited it out.
        Cheaper than name_changed, which looks the name up again in every layer."""
        if parent.index is not None and parent.index.pop(name, None) is not None:
            parent.listing = None
        if parent.kids is not None:
            parent.kids.pop(name, None)
        parent.attr = None
        self._listing_changed(parent)

    def _listing_changed(self, parent: Node) -> None:
        if parent.ino in self.listed_dirs:
            self.listed_dirs.discard(parent.ino)
            self.changed_dirs.append(parent.ino)

    def forget_node(self, node: Node) -> None:
        """The kernel forgot the node: drop what refers to it."""
        if self.indexed:
            self.index_entry_gone(node)
        for parent, name in node.paths:
            if parent.kids is not None and parent.kids.get(name) is node:
                del parent.kids[name]
        if node.is_dir:
            self.drop_dir_state(node)
            fd = self.detached.pop(node.ino, None)
            if fd is not None:
                os.close(fd)
            self.redirects.pop(node.ino, None)
            self.redirect_value.pop(node.ino, None)

    # ----------------------------------------------------------------- removed directories
    def hold_dir(self, node: Node) -> int:
        """An fd of the directory's topmost object, taken before an operation may remove
        it: a removed directory lives on for whoever has it open (fstat shows st_nlink 0,
        fchmod, futimens, fsetxattr work), as on a local filesystem. Give it to
        ``keep_removed`` once the directory is gone, or close it."""
        return os.dup(self.dirfd(node, node.layer))

    def keep_removed(self, node: Node, fd: int) -> None:
        old = self.detached.pop(node.ino, None)
        if old is not None:
            os.close(old)
        self.detached[node.ino] = fd
        node.attr = None

    def removed_dir_fd(self, node: Node) -> int:
        """The fd of a removed directory (see copyup.copy_up_removed_dir for changes)."""
        fd = self.detached.get(node.ino)
        if fd is None:
            raise fuse_error(errno.ENOENT)
        return fd

    def drop_dir_state(self, node: Node) -> None:
        """A directory the kernel forgot, or that is gone: drop its fds and caches."""
        self.drop_fds(node)
        node.index = node.listing = node.kids = None
        if self.dir_lru is not None:
            self.dir_lru.pop(node.ino, None)

    def trim_candidates(self, excess: int) -> List[Tuple[int, bytes]]:
        """Directory entries to invalidate so that the kernel forgets about ``excess`` nodes.

        The kernel holds a reference to every node it has a dentry for, and on a big tree
        it keeps them all (there is no memory pressure to make it let go), so the daemon's
        table would grow without bound. Invalidating the dentry of an unused file makes the
        kernel drop it and its inode at once, and send FORGET. Only files, and only those
        with no open handle: invalidating a directory would also cut it loose from a process
        that has it as its working directory (getcwd fails with ENOENT). Directories whose
        listings were used least recently go first; they lose their cached listings too."""
        out: List[Tuple[int, bytes]] = []
        lru = self.dir_lru
        if lru is None:
            return out
        while len(out) < excess and lru:
            ino, node = lru.popitem(last=False)
            node.index = node.listing = None
            kids = node.kids
            if not kids:
                continue
            for name, child in list(kids.items()):
                if child.is_dir or child.handles:
                    continue
                del kids[name]
                out.append((ino, name))
        return out

    def _dir_layers(self, parent: Node, name: bytes, occ):
        """(layers, {layer: fd opened on the way}, {layer: path where a redirect led},
        the upper copy's redirect value) of a directory: its run of directories of the same
        name down to the first opaque one -- unless one of them carries an overlay.redirect,
        after which the layers below are searched at the redirected place instead (the
        kernel's ovl_lookup: a relative redirect replaces the last name, in the parent's
        directories; an absolute one is a path from each layer's root), or, without
        redirect_dir=follow or on, the lookup fails with EPERM, as the kernel's. The fds
        are kept for the node: its listing needs them next."""
        opened: dict = {}
        bottom = len(self.layers) - 1
        layers = []
        for i, (layer, is_dir) in enumerate(occ):
            if not is_dir:
                break
            layers.append(layer)
            more = i + 1 < len(occ) and occ[i + 1][1]
            if layer == bottom:
                break
            try:
                fd = opened[layer] = open_dir_at(self.dirfd(parent, layer), name)
            except OSError:
                break
            found = self._read_redirect(fd)
            if (more or found is not None) and whiteout.dir_is_opaque(fd):
                break
            if found is not None:
                if not self.redirect_follow:
                    # the kernel: "refusing to follow redirect" (nofollow, userxattr)
                    for fd in opened.values():
                        os.close(fd)
                    raise fuse_error(errno.EPERM)
                value, target = found
                where = self._follow(parent, layer, target, layers, opened)
                return tuple(layers), opened, where, value if layer == UPPER else None
            if not more:
                break
        return tuple(layers), opened, None, None

    def _read_redirect(self, fd: int):
        """(raw value, (absolute, components)) of a directory's redirect, or None."""
        try:
            raw = os.getxattr(fd, self.redirect_xattr)
        except OSError:
            return None
        target = whiteout.parse_redirect(raw)
        if target is None:
            log.warning("ignoring an invalid redirect %r", raw)
            return None
        return raw, target

    def _follow(self, parent: Node, from_layer: int, target, layers, opened):
        """Continue a directory's lookup below ``from_layer`` at ``target``; appends to
        ``layers``/``opened``; returns {layer: path} for the layers found there."""
        where: Dict[int, Tuple[bytes, ...]] = {}
        bottom = len(self.layers) - 1
        absolute, comps = target
        cur = comps[-1]
        for layer in range(from_layer + 1, bottom + 1):
            if absolute:
                path = comps
            elif layer in parent.layers:      # a relative one: in the parent's dirs
                path = self.layer_components(parent, layer) + (cur,)
            else:
                continue
            try:
                base = self._open_components(layer, path[:-1])
            except OSError:
                continue
            try:
                st = lstat_at(base, path[-1])
                hidden = lstat_at(base, whiteout.WH_PREFIX + path[-1]) is not None
                if st is None:
                    if hidden:
                        break
                    continue
                if whiteout.is_kernel_whiteout(st) or not stat.S_ISDIR(st.st_mode):
                    break
                fd = opened[layer] = open_dir_at(base, path[-1])
            finally:
                os.close(base)
            layers.append(layer)
            where[layer] = path
            if layer == bottom or hidden or whiteout.dir_is_opaque(fd):
                break
            found = self._read_redirect(fd)
            if found is not None:
                absolute2, comps2 = found[1]
                if absolute2:
                    absolute, comps = True, comps2
                elif absolute:
                    comps = comps[:-1] + comps2
                else:
                    cur = comps2[-1]
        return where

    def _adopt_fds(self, node: Node, opened) -> None:
        for layer, fd in opened.items():
            key = (node.ino, layer)
            if layer in node.layers and key not in self._fds:
                self._fds[key] = fd
            else:
                os.close(fd)
        while len(self._fds) > FD_CACHE_SIZE:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    # ----------------------------------------------------------------- attributes
    def stat_node(self, node: Node, fd: Optional[int] = None) -> os.stat_result:
        if fd is not None:
            return os.fstat(fd)
        if node.is_dir:
            if node.unlinked:
                return os.fstat(self.removed_dir_fd(node))
            return os.fstat(self.dirfd(node, node.layer))
        if node.handles and len(node.layers) == 1:
            # (not for a metacopy file: its handles are open on the lower data file,
            # whose owner, mode and times are not the file's)
            return os.fstat(next(iter(node.handles)).fd)
        if self.indexed and node.ino in self.indexed:
            return os.stat(self.indexed[node.ino], dir_fd=self.xindex.fd,
                           follow_symlinks=False)
        last = errno.ENOENT
        for parent, name in node.paths:
            try:
                return os.stat(name, dir_fd=self.dirfd(parent, node.layer),
                               follow_symlinks=False)
            except OSError as e:
                last = e.errno
        raise fuse_error(last)

    @staticmethod
    def keeps_attrs(node: Node) -> bool:
        """Whether a node keeps its reply attributes between requests: a directory (few, and
        the kernel asks for one after each listing, which updates its atime), and a file
        that has been opened (the kernel may write its times back late, even after its name
        is gone: dirops keeps the last attributes of an unlinked file for that). Any other
        file's attributes are built when asked for: the kernel caches them for
        attr_timeout, so it rarely asks twice, and keeping them cost ~200 bytes a node,
        a fifth of the daemon's memory after a walk of a big tree."""
        return node.is_dir or node.handles is not None

    def node_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """Reply attributes of a node: cached unless it is open (writes may be under way).
        For a node that keeps none (keeps_attrs), child() leaves the ones it built for the
        reply that follows, which takes them."""
        attr = node.attr
        if attr is not None and not node.handles:
            if not node.unlinked and not self.keeps_attrs(node):
                node.attr = None
            return attr
        attr = self._make_attrs(node, self.stat_node(node))
        if self.keeps_attrs(node):
            node.attr = attr
        return attr

    def attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = self._make_attrs(node, st)
        if self.keeps_attrs(node):
            node.attr = attr
        return attr

    def _make_attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        # A file open for writing in passthrough mode changes behind the kernel's cached
        # attributes when written through a mapping: no caching until it is closed.
        a.attr_timeout = 0 if node.backing and node.backing.writers else self.attr_timeout
        a.st_mode = st.st_mode
        nlink = st.st_nlink
        if node.is_dir and node.unlinked:
            nlink = 0                # removed (a lower one still has its links)
        elif node.is_dir and len(node.layers) > 1:
            nlink = 1                # merged dir: as the kernel, "nlink=1 pacifies find"
        elif self.indexed and node.ino in self.indexed:
            # the overlay's count, kept in overlay.nlink (the index entry is a link too)
            nlink = self.xindex.nlink(self.indexed[node.ino], nlink)
        a.st_nlink = nlink
        if self.uidmap or self.gidmap:
            a.st_uid = self.uidmap.to_mount(st.st_uid)
            a.st_gid = self.gidmap.to_mount(st.st_gid)
        else:
            a.st_uid = st.st_uid
            a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def negative_entry(self) -> pyfuse3.EntryAttributes:
        """A lookup miss the kernel may cache (st_ino 0) for entry_timeout."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.entry_timeout
        return a

    # ----------------------------------------------------------------- xattrs
    def list_xattrs(self, node: Node) -> List[str]:
        """The xattr names of the node's backing object (the overlay's own included): one
        syscall (flistxattr on a directory's fd, listxattrat on a file's parent)."""
        if node.is_dir:
            if node.unlinked:
                return os.listxattr(self.removed_dir_fd(node))
            return os.listxattr(self.dirfd(node, node.layer))
        dir_fd, name = self.parent_fd(node)
        return listxattr_at(dir_fd, name)

    def get_xattr(self, node: Node, attr: str) -> bytes:
        """The value of one xattr of the node's backing object (OSError ENODATA if none)."""
        if node.is_dir:
            if node.unlinked:
                return os.getxattr(self.removed_dir_fd(node), attr)
            return os.getxattr(self.dirfd(node, node.layer), attr)
        dir_fd, name = self.parent_fd(node)
        return getxattr_at(dir_fd, name, attr)

    def object_path(self, node: Node):
        """A context manager giving a /proc path to the node's backing object (O_PATH fd)."""
        return _ObjectPath(self, node)


class _ObjectPath:
    __slots__ = ("ov", "node", "fd")

    def __init__(self, ov: Overlay, node: Node):
        self.ov, self.node, self.fd = ov, node, None

    def __enter__(self) -> str:
        if self.node.is_dir and self.node.unlinked:
            return f"/proc/self/fd/{self.ov.removed_dir_fd(self.node)}"
        if self.node.ino == ROOT_INODE or self.node.is_dir:
            return f"/proc/self/fd/{self.ov.dirfd(self.node, self.node.layer)}"
        dir_fd, name = self.ov.parent_fd(self.node)
        self.fd = open_path_at(dir_fd, name)
        return f"/proc/self/fd/{self.fd}"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
