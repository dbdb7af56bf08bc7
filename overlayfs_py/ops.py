"""The pyfuse3.Operations subclass: thin async glue over overlay, dirops and copyup.

Every handler goes through one error boundary (``handler``): OSError becomes FUSEError with its
errno, anything else is logged and answered with EIO for that request alone -- an exception
escaping a handler would end pyfuse3.main() and kill the mount.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from typing import Callable, Optional

import pyfuse3
import trio

from . import atime, creds, directio, filedata, passthrough, stats, whiteout
from .config import Config
from .copyup import CopyUp, Workdir, copy_up_removed_dir
from .dirops import Namespace
from .handles import HandleTable
from .readdir import FIRST_NAME_OFFSET, Listing
from .inodes import ROOT_INODE, Node
from .overlay import UPPER, Overlay, fuse_error

log = logging.getLogger("overlayfs_py")

BIG_IO = 128 * 1024        # reads/writes at least this large go to a worker thread
TRIM_INTERVAL = 0.25       # seconds between checks of the node table's size (trim_nodes)
# requests during which the kernel holds no directory lock: they may wait for invalidations
_NO_DIR_LOCK = frozenset(("open", "setattr", "setxattr", "removexattr"))
READ_AHEAD_KB = 2048
CAPABILITY = b"security.capability"
CAPABILITY_NAME = "security.capability"


def tune_readahead(mountpoint: str) -> None:
    """A larger bdi read-ahead gives 1 MiB read requests and several of them in flight.

    Only after INIT: the kernel sends INIT at mount time with the read-ahead it had then
    (128 KiB), and sets the bdi to the smaller of its current value and the reply's. And before
    the first request after INIT is answered: a file keeps the read-ahead of its open (a
    mount tuned 5 ms late read in 128 KiB requests, at a third of the speed)."""
    # Not os.stat(mountpoint): that would wait for a request nobody serves yet.
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == mountpoint]
        if devs:
            with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("read_ahead_kb not set: %s", e)


def handler(fn):
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        debug = self.debug
        if debug:
            log.debug("-> %s%r", name, args[:3])
        if self.tune_pending:            # the first request after INIT
            self.tune_pending = False
            tune_readahead(self.config.mountpoint)
        self.seq += 1                    # requests begun and ended (see listxattr)
        counts = self.stats              # OVERLAYFS_PY_STATS (stats.py): None when off
        if counts is not None:
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        failed = True
        try:
            result = await fn(self, *args)
            failed = False
        except pyfuse3.FUSEError as e:
            if debug:
                log.debug("<- %s: %s", name, errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            code = e.errno or errno.EIO
            if code == errno.EMFILE:
                # the daemon's own descriptor table is full, not the caller's: to the
                # caller that is a system-wide limit
                code = errno.ENFILE
            if debug:
                log.debug("<- %s: %s", name, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("internal error in %s%r", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.seq += 1
            if self.ov.changed_dirs:
                self._drop_listings()
            if self.ov.pending_invalidations:
                await self._flush_invalidations(name in _NO_DIR_LOCK)
            if self.ov.stale_attrs:
                await self._flush_stale_attrs()
            if counts is not None:
                counts.add(name, time.perf_counter_ns() - t0, time.thread_time_ns() - c0,
                           failed)
        if debug:
            log.debug("<- %s ok", name)
        return result
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # The kernel enforces POSIX ACLs (stored as system.posix_acl_* xattrs, copied up with
    # the others), as on the kernel overlay and fuse-overlayfs.
    enable_acl = True
    # Our pyfuse3 build (vendor/pyfuse3) passes the inode to readdir when the kernel sends no
    # handle, and can ask for DONT_MASK. With a stock pyfuse3 both stay off.
    _PATCHED = getattr(pyfuse3, "OVERLAYFS_PY_PATCH", 0) >= 1
    # No OPENDIR: the kernel caches listings and sends no OPENDIR/RELEASEDIR (see opendir).
    dir_cache = _PATCHED and not os.environ.get("OVERLAYFS_PY_NO_DIR_CACHE")
    # The kernel leaves the umask to us, so a parent's default ACL can replace it (see make).
    enable_dont_mask = _PATCHED

    def __init__(self, config: Config, ov: Overlay, work: Optional[Workdir]):
        super().__init__()
        self.config = config
        self.ov = ov
        self.work = work
        self.debug = config.debug
        self.writable = ov.writable
        self.enable_writeback_cache = bool(config.writeback and self.writable)
        self.exact_ctime = self.enable_writeback_cache and config.exact_ctime
        # FUSE passthrough (passthrough.py) is asked for at INIT unless ruled out already;
        # if the kernel grants it, the connection has no writeback cache (init)
        self.pt_off_reason = passthrough.why_not(config)
        self.enable_passthrough = self.pt_off_reason is None
        self.pt: Optional[passthrough.Passthrough] = None
        self.on_init: Optional[Callable[[], None]] = None    # session: passthrough=on
        self.init_error: Optional[str] = None
        self.handles = HandleTable()
        self.tune_pending = False
        # past this many nodes (about 1.2 KiB each) trim_nodes has the kernel forget some
        self.max_nodes = config.max_nodes
        if self.writable:
            self.cu = CopyUp(ov, work, fsync=config.fsync, metacopy=config.metacopy)
            self.ns = Namespace(ov, work, self.cu, userxattr=config.userxattr)
        # reads of upper files record atimes (atime.py); never on a read-only mount
        self.toucher = atime.Toucher(ov.upper.root_fd) \
            if self.writable and config.atime != atime.NOATIME else None
        # files just linked, renamed or unlinked: the kernel flushes their cached times
        # with a SETATTR while it holds the directory's lock (see setattr)
        self._ns_changed: set = set()
        self.seq = 0                       # +1 as each request begins and as it ends
        # (node, its xattr names, self.seq) listed by the last GETXATTR of
        # security.capability, for the LISTXATTR that usually follows it
        self._xattr_list = None
        # request statistics (OVERLAYFS_PY_STATS: stats.py), None when off
        self.stats = stats.from_env()
        if self.stats is not None:
            self.stats.info.update(mountpoint=config.mountpoint, layers=len(ov.layers),
                                   lowers=list(config.lowers), upper=config.upper)

    def init(self):
        # called while pyfuse3 handles INIT, just before it replies: the bdi is tuned at
        # the next request, once the kernel has taken the reply (tune_readahead)
        self.tune_pending = True
        if self.stats is not None:
            self.stats.t_init = time.time()
        if self.enable_passthrough:
            if pyfuse3.passthrough_enabled():
                self.pt = passthrough.Passthrough(
                    self.writable, [lay.root_fd for lay in self.ov.layers], self.config.atime)
                self.enable_writeback_cache = False       # pyfuse3 did not ask for it
                self.exact_ctime = False                  # a writeback-cache matter
            else:
                self.pt_off_reason = "the kernel did not offer FUSE passthrough at INIT"
        if self.pt is None:
            if self.config.passthrough == "on":
                self.init_error = f"passthrough=on, but {self.pt_off_reason}"
                pyfuse3.terminate()
                return
            passthrough.log_off(self.pt_off_reason)
        if self.on_init is not None:
            self.on_init()

    async def trim_nodes(self) -> None:
        """Keep the node table near ``max_nodes`` on trees bigger than that: ask the kernel
        to forget unused files of the least recently listed directories
        (Overlay.trim_candidates). FORGETs
        arrive later, so wait before looking again, and back off while they do not come
        (e.g. the kernel has that many files open)."""
        if not self.max_nodes:
            return
        pause = TRIM_INTERVAL
        while True:
            await trio.sleep(pause)
            before = len(self.ov.table)
            excess = before - self.max_nodes
            if excess <= 0:
                pause = TRIM_INTERVAL
                continue
            # go a fifth below the limit, so that a walk does not trim at every step
            entries = self.ov.trim_candidates(excess + self.max_nodes // 5)
            log.debug("trim: %d nodes > %d: invalidating %d directory entries",
                      before, self.max_nodes, len(entries))
            for parent_ino, name in entries:
                pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)
            await trio.sleep(TRIM_INTERVAL)
            pause = TRIM_INTERVAL if len(self.ov.table) < before else min(pause * 2, 30.0)

    # ---------------------------------------------------------------- helpers
    def _node(self, ino: int) -> Node:
        node = self.ov.table.get(ino)
        if node is None:
            raise fuse_error(errno.ESTALE)
        return node

    def _need_writable(self) -> None:
        if not self.writable:
            raise fuse_error(errno.EROFS)

    def _umask(self, ctx) -> int:
        """The caller's umask when the kernel left it to us (DONT_MASK), else 0."""
        return ctx.umask if self.enable_dont_mask else 0

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self.ov.node_attrs(node)
        node.nlookup += 1
        return attrs

    def _drop_listings(self) -> None:
        """Have the kernel drop its cached listing of each directory whose names changed.

        The kernel keeps listings in a directory's page cache (see opendir) and checks them
        against the directory's change counter and mtime; with many processes changing one
        directory at once it was seen to serve a listing without a name that the reader had
        just created itself (soak test: about 100 stale listings a minute with 32 clients in
        one directory). Dropping the pages before the reply ends that. This is safe inline:
        a directory has no dirty pages to write back and this takes no directory lock. Only
        directories we answered a READDIR for since their last change can be cached."""
        dirs, self.ov.changed_dirs = self.ov.changed_dirs, []
        if not self.dir_cache:
            return
        for ino in dirs:
            try:
                pyfuse3.invalidate_inode(ino)
            except OSError as e:          # ENOENT: the kernel no longer knows the directory
                log.debug("invalidate_inode %d: %s", ino, e)

    async def _flush_stale_attrs(self) -> None:
        """Make the kernel fetch the attributes of these inodes again before the reply (no
        lock is needed for that, whatever the request holds)."""
        pending, self.ov.stale_attrs = self.ov.stale_attrs, []
        for ino in pending:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
            except OSError as e:          # ENOENT: the kernel had already dropped it
                log.debug("invalidate_inode %d: %s", ino, e)

    async def _flush_invalidations(self, wait: bool) -> None:
        """Make the kernel drop dentries that no longer name the node it has for them (the
        other lower hard links of a file that was just copied up).

        With ``wait``, the reply waits until the kernel has done it, so the caller's next
        access to those names is looked up afresh; the notification runs in a worker
        thread because the kernel may first wait for other requests we must keep serving.
        Requests that hold a directory lock (rename, link) cannot wait: the kernel would
        need that lock to drop the entry."""
        pending, self.ov.pending_invalidations = self.ov.pending_invalidations, []
        for parent_ino, name in pending:
            try:
                if wait:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent_ino, name)
                else:
                    pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)
            except OSError as e:          # ENOENT: the kernel had already dropped it
                log.debug("invalidate_entry %r: %s", name, e)

    # ---------------------------------------------------------------- lookup & attributes
    @handler
    async def lookup(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        elif len(name) > self.ov.namelen:
            raise fuse_error(errno.ENAMETOOLONG)     # as the kernel overlay's lookup
        else:
            node = self.ov.child(parent, name)
            if node is None:
                if self.stats is not None:
                    self.stats.note("lookup negative")
                return self.ov.negative_entry()
        return self._entry(node)

    @handler
    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.ov.table.forget(ino, n)
            if node is not None:
                self.ov.forget_node(node)
                self._ns_changed.discard(ino)

    @handler
    async def getattr(self, inode, ctx):
        return self.ov.node_attrs(self._node(inode))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._need_writable()
        node = self._node(inode)
        ov = self.ov
        h = self.handles.files.get(fh) if fh is not None else None
        changes_inode = fields.update_mode or fields.update_uid or fields.update_gid or \
            fields.update_atime or fields.update_mtime
        if not (changes_inode or fields.update_size):
            return ov.node_attrs(node)                      # ctime only: nothing to copy up
        if node.unlinked:
            return self._setattr_unlinked(node, attr, fields, h)
        truncating_to_zero = fields.update_size and attr.st_size == 0
        await self.cu.copy_up(node, data=not truncating_to_zero,
                              meta_only=not fields.update_size)
        if fields.update_size:
            if h is not None and h.writable:
                os.ftruncate(h.fd, attr.st_size)
            else:
                dir_fd, name = ov.parent_fd(node, UPPER)
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if changes_inode:
            self._set_inode_attrs(node, attr, fields)
        st = ov.stat_node(node)
        under_lock = node.ino in self._ns_changed
        self._ns_changed.discard(node.ino)
        if fields.update_ctime and st.st_ctime_ns != attr.st_ctime_ns:
            # done before we reply, unless the kernel sends this holding a directory lock:
            # the flush of the times it took for a link, rename or unlink of the file
            self._reload_ctime(node, wait=not under_lock)
        return ov.attrs(node, st)

    def _reload_ctime(self, node: Node, wait: bool = False) -> None:
        """With the writeback cache the kernel keeps its own ctime for a regular file (the
        time of a write, chmod, link or rename, taken in its cache) and ignores ours until
        it drops the inode; the upper file's ctime is the time we applied the change, a
        little later, and cannot be set. With ``exact_ctime=1``, have the kernel drop the
        names of the file, so that once nobody uses the inode it is evicted (a FUSE inode
        goes with its last reference) and the next stat shows the upper's ctime, as the
        kernel overlay shows it, before and after a remount. The costs: the file's next
        lookup is a request, and a kill -9 of the daemon while such a notification waits
        for a directory lock leaves the mount hung until its FUSE connection is aborted
        (README: the same as for max_nodes), so it is off by default."""
        if not self.exact_ctime or node.is_dir or node.unlinked:
            return                      # the kernel takes ctime from our replies
        try:
            if not stat.S_ISREG(self.ov.stat_node(node).st_mode):
                return
        except (OSError, pyfuse3.FUSEError):
            return
        # ``wait``: before the reply (the request must hold no directory lock: see
        # _flush_invalidations); otherwise soon after it
        if wait:
            self.ov.pending_invalidations.extend((p.ino, name) for p, name in node.paths)
            return
        for parent, name in node.paths:
            pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)

    def _setattr_unlinked(self, node: Node, attr, fields, h):
        """A removed file that is still open: change it through an open descriptor. A
        removed directory: through the fd kept for it (Overlay.hold_dir)."""
        if node.is_dir:
            if fields.update_size:
                raise fuse_error(errno.EISDIR)
            return self._setattr_fd(node, copy_up_removed_dir(self.ov, self.work, node),
                                    attr, fields)
        if h is None or not h.writable:
            h = next((x for x in node.handles or () if x.writable), None)
        if h is None and node.layer == UPPER and not fields.update_size:
            # an fd opened for reading is enough for fchmod/fchown/futimens, and an upper
            # file is ours to change (a lower one never is)
            h = next(iter(node.handles or ()), None)
        if h is None:
            # Only read-only handles on a lower file that is gone from the view: the kernel's
            # writeback cache still flushes its time stamps here. Failing would turn the
            # reader's close() into EIO; there is nothing left to update, so say yes.
            if fields.update_size or fields.update_mode or fields.update_uid or \
                    fields.update_gid:
                raise fuse_error(errno.ENOENT)
            any_h = next(iter(node.handles or ()), None)
            if any_h is not None:
                return self.ov.attrs(node, os.fstat(any_h.fd))
            if node.attr is not None:
                return node.attr
            raise fuse_error(errno.ENOENT)
        return self._setattr_fd(node, h.fd, attr, fields)

    def _setattr_fd(self, node: Node, fd: int, attr, fields):
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_mode:
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, self.ov.uidmap.to_layer(attr.st_uid) if fields.update_uid else -1,
                      self.ov.gidmap.to_layer(attr.st_gid) if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self.ov.attrs(node, os.fstat(fd))

    def _set_inode_attrs(self, node: Node, attr, fields) -> None:
        ov = self.ov
        if node.ino == ROOT_INODE:
            target, dir_fd = ov.dirfd(node, UPPER), None
        else:
            dir_fd, target = ov.parent_fd(node, UPPER)
        kw = {"dir_fd": dir_fd, "follow_symlinks": False} if dir_fd is not None else {}
        if fields.update_uid or fields.update_gid:
            uid = ov.uidmap.to_layer(attr.st_uid) if fields.update_uid else -1
            gid = ov.gidmap.to_layer(attr.st_gid) if fields.update_gid else -1
            os.chown(target, uid, gid, **kw)
        if fields.update_mode:
            with ov.object_path(node) as p:
                st = os.stat(p)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(p, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.stat(target, **kw)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime), **kw)

    @handler
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        dir_fd, name = self.ov.parent_fd(node)
        return os.readlink(name, dir_fd=dir_fd)

    @handler
    async def statfs(self, ctx):
        top = self.ov.layers[0]
        sv = os.fstatvfs(top.root_fd)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail"):
            setattr(out, f, getattr(sv, f))
        out.f_namemax = self.ov.namelen
        return out

    @handler
    async def access(self, inode, mode, ctx):
        self._node(inode)
        if mode & os.W_OK and not self.writable:
            return False
        return True

    # ---------------------------------------------------------------- files
    def _open_flags(self, flags: int) -> int:
        # O_TRUNC stays: libfuse asks for atomic_o_trunc, so the kernel passes it to open()
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOATIME)
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if self.enable_writeback_cache and (flags & os.O_ACCMODE) != os.O_RDONLY:
            # the kernel may read through any handle to fill its cache, and it owns
            # the file position: O_APPEND would write at the wrong offset
            flags = (flags & ~os.O_ACCMODE & ~os.O_APPEND) | os.O_RDWR
        return flags

    def _file_info(self, h) -> pyfuse3.FileInfo:
        if h.backing_id:
            # no other flag: the kernel refuses passthrough with FOPEN_KEEP_CACHE
            return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, backing_id=h.backing_id)
        # after passthrough opens the inode's page cache may be stale: drop it
        return pyfuse3.FileInfo(fh=h.fh,
                                keep_cache=self.config.keep_cache and h.node.backing is None)

    def _open_handle(self, fd: int, node: Node, flags: int, writable: bool):
        """A handle for a new open of ``node`` through ``fd``, passed through by the kernel
        where passthrough.Passthrough.eligible says so."""
        bid = self.pt.open(node, fd, writable, flags) if self.pt is not None else 0
        return self.handles.open_file(fd, node, flags, writable, bid)

    @handler
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._need_writable()
            was_lower = node.layer != UPPER
            await self.cu.copy_up(node, data=not flags & os.O_TRUNC)
            if was_lower:
                # the copy's ctime, not the lower's: no reply carries it to the kernel
                self.ov.stale_attrs.append(node.ino)
                self._reload_ctime(node, wait=True)
        # a metadata-only copy reads its data from the lower layer that holds it
        dir_fd, name = self.ov.parent_fd(node, node.layers[-1])
        fd = atime.open_noatime(name, self._open_flags(flags), dir_fd)
        h = self._open_handle(fd, node, flags, bool(writing))
        if h.backing_id and writing:
            # attributes come from the upper file while it is open for writing (see
            # Overlay._make_attrs); what the kernel cached before must go
            try:
                pyfuse3.invalidate_inode(node.ino, attr_only=True)
            except OSError as e:
                log.debug("invalidate_inode %d: %s", node.ino, e)
        info = self._file_info(h)
        if not h.backing_id and self.toucher is not None and \
                (flags & os.O_ACCMODE) == os.O_RDONLY and node.layer == UPPER and \
                atime.due(self.config.atime, os.fstat(fd), time.time_ns()):
            # the read is due to update the atime: let the first one reach us
            h.atime_pending = True
            info.keep_cache = False
        return info

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._need_writable()
        parent = self._node(parent_inode)
        oflags = self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOATIME

        def maker(dir_fd: int, n: bytes, m: int) -> int:
            return os.open(n, oflags, stat.S_IMODE(m), dir_fd=dir_fd)

        node, fd = self.ns.make(parent, name, ctx.uid, ctx.gid, False, maker, mode,
                                self._umask(ctx))
        h = self._open_handle(fd, node, flags, True)
        return self._file_info(h), self._entry(node)

    @handler
    async def tmpfile(self, parent_inode, mode, flags, ctx):
        """open(dir, O_TMPFILE): an unnamed file in the upper copy of the directory, as the
        kernel's overlay makes it (linkat later names it: see Namespace.link)."""
        self._need_writable()
        parent = self._node(parent_inode)
        node, fd = self.ns.tmpfile(parent, ctx.uid, ctx.gid, mode, self._umask(ctx),
                                   self._open_flags(flags))
        h = self._open_handle(fd, node, flags, True)
        return self._file_info(h), self._entry(node)

    @handler
    async def read(self, fh, off, size):
        h = self.handles.files[fh]
        if h.atime_pending:
            h.atime_pending = False
            self.toucher.touch(h.fd)
            self.ov.changed(h.node)
        if h.direct:
            if size < BIG_IO:
                return directio.pread(h.fd, size, off)
            return await trio.to_thread.run_sync(directio.pread, h.fd, size, off)
        if size < BIG_IO:
            return os.pread(h.fd, size, off)
        # What the host page cache holds is copied here and now (RWF_NOWAIT never blocks):
        # a hand-off to a worker thread costs more than copying a cached MiB. Only what has
        # to wait for the disk goes to a thread (whole, when nothing was cached: no copy).
        if h.nowait:
            buf = bytearray(size)
            try:
                n = os.preadv(h.fd, (buf,), off, os.RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:          # e.g. tmpfs: never ask again
                    h.nowait = False
                elif e.errno != errno.EAGAIN:
                    raise
                n = 0
            if n == size:
                return buf
            if n:
                # partly cached: a short reply would tell the kernel the file ends here
                rest = await trio.to_thread.run_sync(os.pread, h.fd, size - n, off + n)
                buf[n:n + len(rest)] = rest
                return memoryview(buf)[:n + len(rest)]
        return await trio.to_thread.run_sync(os.pread, h.fd, size, off)

    @handler
    async def write(self, fh, off, buf):
        h = self.handles.files[fh]
        if not h.wrote:
            h.wrote = True
            self._reload_ctime(h.node)    # our writes move the upper's times: see release
        if h.direct:
            cached = any(o.writable and not o.direct for o in h.node.handles if o is not h)
            if len(buf) < BIG_IO:
                return directio.pwrite(h.fd, buf, off, cached, h.buffered_fd)
            return await trio.to_thread.run_sync(directio.pwrite, h.fd, buf, off, cached,
                                                 h.buffered_fd)
        if len(buf) >= BIG_IO:
            return await trio.to_thread.run_sync(os.pwrite, h.fd, buf, off)
        return os.pwrite(h.fd, buf, off)

    @handler
    async def flush(self, fh):
        # Nothing to do at close (data reaches the upper file at write/fsync time). ENOSYS
        # tells the kernel so, once: it stops sending FLUSH, one request less per close.
        raise fuse_error(errno.ENOSYS)

    @handler
    async def release(self, fh):
        h = self.handles.release_file(fh)
        if h is None:
            return
        if h.backing_id:
            self.pt.release(h.node, h.writable)
        if h.writable:
            self.ov.changed(h.node)
            if h.wrote:
                # our writes moved the upper's mtime and ctime after the kernel took its
                # own (it sends no times when its coarse clock did not move)
                self._reload_ctime(h.node)
            if not h.node.handles:
                self._ns_changed.discard(h.node.ino)

    @handler
    async def fallocate(self, fh, mode, offset, length):
        h = self.handles.files[fh]
        await filedata.fallocate(h.fd, mode, offset, length)
        self.ov.changed(h.node)
        self._reload_ctime(h.node)

    @handler
    async def lseek(self, fh, offset, whence):
        h = self.handles.files[fh]
        if self.enable_writeback_cache and any(x.writable for x in h.node.handles or ()):
            # The kernel writes back dirty pages before FALLOCATE and COPY_FILE_RANGE but
            # not before LSEEK: written data still in its page cache would look like a
            # hole (or past the end). Have it write them back first (and drop the file's
            # pages): it sends the writes, which other workers serve meanwhile.
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, h.node.ino)
        return filedata.seek(h.fd, offset, whence)

    @handler
    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        files = self.handles.files
        ho = files[fh_out]
        n = await filedata.copy_range(files[fh_in].fd, off_in, ho.fd, off_out, length)
        self.ov.changed(ho.node)
        self._reload_ctime(ho.node)
        return n

    @handler
    async def fsync(self, fh, datasync):
        h = self.handles.files.get(fh)
        if h is None or not self.config.fsync or not h.writable:
            return
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    # ---------------------------------------------------------------- directories
    @handler
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise fuse_error(errno.ENOTDIR)
        if self.dir_cache:
            # ENOSYS once and the kernel stops sending OPENDIR and RELEASEDIR on this mount
            # (no_opendir); it then opens directories with FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE
            # and keeps each listing in its page cache until the directory changes through
            # the mount. READDIR then carries the inode (our pyfuse3 patch), and our offsets
            # need no per-open state.
            raise fuse_error(errno.ENOSYS)
        return self.handles.open_dir(node).fh

    def _dir_listing(self, fh: int, start_id: int):
        if self.dir_cache:
            node = self._node(fh)                  # the inode: there was no OPENDIR
            return node, self.ov.listing(node)
        h = self.handles.dirs[fh]
        if start_id == 0 or h.listing is None:     # snapshot at the start of a listing
            h.listing = Listing(self.ov.index(h.node).keys())
        return h.node, h.listing

    @handler
    async def readdir(self, fh, start_id, token):
        node, listing = self._dir_listing(fh, start_id)
        ov = self.ov
        ov.listed_dirs.add(node.ino)
        if start_id < 2 and not node.unlinked:
            for off, name, target in ((1, b".", node), (2, b"..", node.parent or node)):
                if start_id >= off:
                    continue
                # readdirplus: the kernel takes no reference for . and ..
                if not pyfuse3.readdir_reply(token, name, ov.node_attrs(target), off):
                    return
        i = listing.after(max(start_id, FIRST_NAME_OFFSET - 1))
        entries = listing.entries
        while i < len(entries):
            off, name = entries[i]
            i += 1
            try:
                child = ov.child(node, name)
                if child is None:
                    continue                      # removed since the listing began
                attrs = ov.node_attrs(child)
            except (OSError, pyfuse3.FUSEError):
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, off):
                return
            child.nlookup += 1
        if self.dir_cache:
            # The kernel has the whole listing now and keeps it in its page cache until the
            # directory changes through the mount; if it asks again, ov.listing() sorts the
            # index again, and offsets (hashes of the names) come out the same.
            node.listing = None

    @handler
    async def releasedir(self, fh):
        self.handles.release_dir(fh)

    @handler
    async def fsyncdir(self, fh, datasync):
        if self.dir_cache:
            node = self._node(fh)
        else:
            h = self.handles.dirs.get(fh)
            if h is None:
                return
            node = h.node
        if not self.writable or not self.config.fsync or node.unlinked:
            return
        if node.layer == UPPER:
            fd = self.ov.dirfd(node, UPPER)
            await trio.to_thread.run_sync(os.fsync, fd)

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._need_writable()
        parent = self._node(parent_inode)
        def maker(dir_fd: int, n: bytes, m: int) -> None:
            os.mkdir(n, stat.S_IMODE(m), dir_fd=dir_fd)

        node, _ = self.ns.make(parent, name, ctx.uid, ctx.gid, True, maker,
                               stat.S_IMODE(mode) | stat.S_IFDIR, self._umask(ctx))
        return self._entry(node)

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._need_writable()
        if stat.S_ISCHR(mode) and rdev == 0:
            raise fuse_error(errno.EPERM)       # a whiteout cannot be made through the overlay
        parent = self._node(parent_inode)

        def maker(dir_fd: int, n: bytes, m: int) -> None:
            os.mknod(n, m, rdev, dir_fd=dir_fd)

        node, _ = self.ns.make(parent, name, ctx.uid, ctx.gid, False, maker, mode,
                               self._umask(ctx))
        return self._entry(node)

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        self._need_writable()
        parent = self._node(parent_inode)

        def maker(dir_fd: int, n: bytes, m: int) -> None:
            os.symlink(target, n, dir_fd=dir_fd)

        node, _ = self.ns.make(parent, name, ctx.uid, ctx.gid, False, maker)
        return self._entry(node)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._need_writable()
        node = await self.ns.link(self._node(inode), self._node(new_parent_inode), new_name)
        self._ns_changed.add(node.ino)
        self._reload_ctime(node)
        return self._entry(node)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        self._need_writable()
        parent = self._node(parent_inode)
        node = self.ov.child(parent, name)
        await self.ns.unlink(parent, name)
        if node is not None and node.paths:
            self._ns_changed.add(node.ino)
            self._reload_ctime(node)              # other names of it are left

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        self._need_writable()
        await self.ns.rmdir(self._node(parent_inode), name)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._need_writable()
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise fuse_error(errno.EINVAL)
        p_new = self._node(parent_inode_new)
        replaced = self.ov.child(p_new, name_new)
        moved = await self.ns.rename(self._node(parent_inode_old), name_old, p_new, name_new,
                                     bool(flags & pyfuse3.RENAME_EXCHANGE),
                                     bool(flags & pyfuse3.RENAME_NOREPLACE))
        for node in moved + ((replaced,) if replaced is not None else ()):
            self._ns_changed.add(node.ino)
        for node in moved:
            self._reload_ctime(node)

    # ---------------------------------------------------------------- xattrs
    @handler
    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        if self.stats is not None:
            self.stats.note("getxattr " + os.fsdecode(name))
        if name == CAPABILITY:
            # The kernel asks for this before every write(2) to a FUSE file (a write must
            # drop file capabilities, and FUSE inodes never get S_NOSEC): one request per
            # write. A file only gains it by setxattr through the mount, so remember a miss.
            if node.nocap:
                raise fuse_error(pyfuse3.ENOATTR)
            # A container engine's diff walk (containers/storage with a mount_program) asks
            # every file of two trees for this and then for its list: list the names
            # (one syscall either way) and keep them for a LISTXATTR that comes next.
            names = self.ov.list_xattrs(node)
            self._xattr_list = (node, names, self.seq)
            if CAPABILITY_NAME not in names:
                node.nocap = True
                raise fuse_error(pyfuse3.ENOATTR)
            return self.ov.get_xattr(node, CAPABILITY_NAME)
        sname = whiteout.layer_xattr_name(os.fsdecode(name), self.config.userxattr)
        if sname is None:
            raise fuse_error(pyfuse3.ENOATTR)
        return self.ov.get_xattr(node, sname)

    @handler
    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        kept, self._xattr_list = self._xattr_list, None
        if kept is not None and kept[0] is node and kept[2] + 2 == self.seq:
            # listed by the GETXATTR just before, with no request begun or ended since
            # (the handler wrapper counts both in self.seq), so nothing can have changed
            names = kept[1]
        else:
            names = self.ov.list_xattrs(node)
        names = [c for c in (whiteout.client_xattr_name(n, self.config.userxattr)
                             for n in names) if c is not None]
        # trusted.* are listed to CAP_SYS_ADMIN only, as a local filesystem and the kernel
        # overlay do (the kernel leaves that filtering to the filesystem)
        if any(n.startswith("trusted.") for n in names) and \
                not creds.caller_has_cap(ctx.pid, ctx.uid, creds.CAP_SYS_ADMIN):
            names = [n for n in names if not n.startswith("trusted.")]
        return [os.fsencode(n) for n in names]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        self._need_writable()
        sname = whiteout.layer_xattr_name(os.fsdecode(name), self.config.userxattr)
        if sname is None:
            raise fuse_error(errno.EOPNOTSUPP)
        node = self._node(inode)
        await self.cu.copy_up(node, meta_only=True)
        node.nocap = False
        with self.ov.object_path(node) as p:
            os.setxattr(p, sname, value)
        self.ov.changed(node)
        self._reload_ctime(node, wait=True)

    @handler
    async def removexattr(self, inode, name, ctx):
        self._need_writable()
        sname = whiteout.layer_xattr_name(os.fsdecode(name), self.config.userxattr)
        if sname is None:
            raise fuse_error(errno.EOPNOTSUPP)
        node = self._node(inode)
        with self.ov.object_path(node) as p:
            os.getxattr(p, sname)             # ENODATA before any copy-up, as the kernel
        await self.cu.copy_up(node, meta_only=True)
        with self.ov.object_path(node) as p:
            os.removexattr(p, sname)
        self.ov.changed(node)
        self._reload_ctime(node, wait=True)
