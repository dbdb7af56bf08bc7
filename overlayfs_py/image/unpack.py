"""Apply one layer tar to an empty directory, in the store's on-disk format.

Everything is created relative to held directory fds: each directory of an entry's name is
opened with ``O_DIRECTORY | O_NOFOLLOW`` from the layer's root, so a name that leads through a
symlink (or a non-directory) of the same layer is refused, and nothing can be written outside
the directory being filled. Names with ``..`` or a leading ``/`` are refused too, and so is a
hard link whose target is not an earlier entry of this layer. Every refusal is a
``HostileArchive`` with one line naming the entry; the caller (the store) then removes the
half-made directory.

What is kept: regular files, directories, symlinks, hard links (within the layer), character
and block devices, fifos; owners, modes (with setuid, setgid and sticky bits), mtimes, and
xattrs from PAX ``SCHILY.xattr.*`` records (``security.capability`` included; the overlay's own
``*.overlay.*`` xattrs are dropped, so a layer cannot smuggle in whiteouts, redirects or
metacopy marks). Entries may repeat: the last one wins (a directory over a directory merges
and takes the new attributes; anything else replaces what was there). OCI markers become the
kernel's format (``ondisk``): ``.wh.X`` a char 0/0 device ``X``, ``.wh..wh..opq`` the opaque
xattr on its directory -- unless ``keep_markers`` asks to keep them as they are.

Without the privilege for something (device nodes, other owners, ``trusted.*`` or
``security.*`` xattrs), the entry is created without it, or not at all for a device node,
and a warning says so (``Warnings``); nothing is silently turned into something else.

Directory modes and mtimes are applied at the end, deepest first (creating entries changes a
directory's mtime, and a read-only directory mode would stop a non-root unpack).

Small regular files can be written by a few worker threads (``threads``; by default only
on machines with more than two CPUs, see ``DEFAULT_THREADS``, and
``$OVERLAYFS_PY_UNPACK_THREADS`` sets the number for a store's unpack): the main thread
parses the tar and reads each file's data, a worker creates the file, writes it and sets its
attributes (system calls that release the GIL). Everything that depends on such a file
(a later entry of the same name, a hard link to it, removing a directory above it, the final
directory pass) waits for it first, so the result is the same as a sequential unpack.
While they run, the interpreter's thread switch interval is lowered (``SWITCH_INTERVAL``):
workers take the GIL back after every system call, and with the default 5 ms they would wait
behind the parsing thread most of the time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import os
import stat
import sys
from typing import Dict, List, Optional, Tuple

from . import ondisk
from .tarstream import REGULAR, Member, members, mtime_ns
from .errors import CorruptData, HostileArchive, StoreError
from .fsutil import O_DIR, proc_path, rmtree_at, write_all

CHUNK = 1 << 20
MAX_CACHED_DIRS = 128
POOL_FILE_MAX = 1 << 20           # larger files are written by the main thread, streaming
POOL_BYTES = 32 << 20             # data held for pending writes, at most
POOL_JOBS = 512                   # pending writes, at most
# One thread on a machine of two CPUs or fewer: measured on a 2-vCPU VM shared with other
# work, a pool of 2 (and the read-ahead thread with it) made a 200 MB debootstrap layer
# slower to unpack than one thread (1.7-2.5 s against 1.15-1.6 s, and twice the user CPU):
# the threads mostly waited for the GIL and for a CPU. Larger machines keep the pool.
DEFAULT_THREADS = 0 if (os.cpu_count() or 1) <= 2 else min(4, os.cpu_count() or 1)
THREADS_ENV = "OVERLAYFS_PY_UNPACK_THREADS"
SWITCH_INTERVAL = 0.0005          # seconds; see Extractor.run

_NOPRIV = (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP,
           errno.E2BIG, errno.ERANGE)

_KIND_TEXT = {
    "device": "device nodes not created (needs root)",
    "owner": "owners not kept (needs root; the entries are yours)",
    "xattr": "xattrs not set",
    "overlay-xattr": "overlay xattrs in the tar dropped",
}


def default_threads() -> int:
    """Writer threads for a store's unpack: $OVERLAYFS_PY_UNPACK_THREADS, else
    ``DEFAULT_THREADS``."""
    value = os.environ.get(THREADS_ENV, "")
    try:
        return max(0, int(value)) if value else DEFAULT_THREADS
    except ValueError:
        raise StoreError(f"${THREADS_ENV}: not a number of threads: {value!r}") from None


class Warnings:
    """What could not be kept, grouped by kind, for one summary line per kind."""

    def __init__(self):
        self.items: Dict[str, List[str]] = collections.OrderedDict()

    def add(self, kind: str, path: str, detail: str = "") -> None:
        self.items.setdefault(kind, []).append(f"{path} ({detail})" if detail else path)

    def __bool__(self) -> bool:
        return bool(self.items)

    def lines(self, prefix: str = "") -> List[str]:
        out = []
        for kind, paths in self.items.items():
            paths = sorted(paths)                # worker threads add them in any order
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths) - 3} more)"
                                             if len(paths) > 3 else "")
            out.append(f"{prefix}{len(paths)} {_KIND_TEXT.get(kind, kind)}: {shown}")
        return out


class Stats:
    __slots__ = ("entries", "files", "dirs", "symlinks", "hardlinks", "devices", "fifos",
                 "whiteouts", "opaques", "bytes")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class Extractor:
    """Fills the directory held by ``root_fd`` from a tar stream (see the module docstring)."""

    def __init__(self, root_fd: int, *, namespace: str, keep_markers: bool = False,
                 warnings: Optional[Warnings] = None, task=None, what: str = "layer",
                 threads: int = DEFAULT_THREADS):
        self.root_fd = root_fd
        self.opaque_xattr = ondisk.opaque_xattr(namespace)
        self.keep = keep_markers
        self.warnings = warnings if warnings is not None else Warnings()
        self.task = task
        self.what = what
        self.cache: "collections.OrderedDict[Tuple[bytes, ...], int]" = \
            collections.OrderedDict()
        self.dirs: Dict[Tuple[bytes, ...], Tuple[int, Optional[int]]] = {}
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.stats = Stats()
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "unpack") \
            if threads > 0 else None
        self.pending: "collections.OrderedDict[Tuple[bytes, ...], _Job]" = \
            collections.OrderedDict()
        self.pending_bytes = 0

    # ------------------------------------------------------------------ the loop
    def run(self, reader) -> Stats:
        # Workers re-take the GIL after each system call; with the default 5 ms switch
        # interval they queue behind the parsing thread (the convoy effect) and the pool
        # is slower than one thread. 0.5 ms made it faster than one thread here.
        old_switch = sys.getswitchinterval()
        if self.pool is not None:
            sys.setswitchinterval(min(old_switch, SWITCH_INTERVAL))
        try:
            first = True
            try:
                for m in members(reader):
                    first = False
                    self._trim_cache()
                    try:
                        self.apply(m, reader)
                    except HostileArchive as e:
                        raise HostileArchive(f"{self.what}: {e}") from None
                    except CorruptData as e:
                        raise CorruptData(f"{self.what}: {e}") from None
                    except OSError as e:
                        raise StoreError(f"{self.what}: entry {m.shown!r}: "
                                         f"{e.strerror or e}") from None
                    self.stats.entries += 1
                    if self.task is not None:
                        self.task.advance(reader.blob_size, self.stats.entries)
            except CorruptData as e:
                if str(e).startswith(self.what):
                    raise
                if first:
                    raise CorruptData(f"{self.what}: not a tar archive ({e})") from None
                raise CorruptData(f"{self.what}: {e}") from None
            self.drain()
            self.finish_dirs()
        finally:
            self.close()
            sys.setswitchinterval(old_switch)
        return self.stats

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for job in self.pending.values():
            job.discard()
        self.pending.clear()
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()

    # ------------------------------------------------------------------ the writers
    def wait(self, parts: Tuple[bytes, ...]) -> None:
        """A write of ``parts`` still pending: finish it first."""
        job = self.pending.pop(parts, None)
        if job is not None:
            self._finish(job)

    def _finish(self, job: "_Job") -> None:
        self.pending_bytes -= len(job.data)
        try:
            try:
                job.future.result()
            except FileExistsError:
                # the name was taken (an earlier entry of the same name): redo it here,
                # where replacing is safe
                job.discard()
                fd = self._create_file(job.pfd_main(self), job.parts[-1], job.parts)
                job.write(fd)
        except OSError as e:
            raise StoreError(f"{self.what}: entry {job.shown!r}: {e.strerror or e}") from None
        finally:
            job.discard()

    def drain(self) -> None:
        while self.pending:
            _, job = self.pending.popitem(last=False)
            self._finish(job)

    def _throttle(self) -> None:
        while self.pending and (len(self.pending) > POOL_JOBS or
                                self.pending_bytes > POOL_BYTES or
                                next(iter(self.pending.values())).future.done()):
            _, job = self.pending.popitem(last=False)
            self._finish(job)

    # ------------------------------------------------------------------ names and dirs
    @staticmethod
    def split(raw: bytes, shown: str) -> Tuple[bytes, ...]:
        """A member name -> its components; refuses absolute names and '..'."""
        if raw.startswith(b"/"):
            raise HostileArchive(f"entry {shown!r}: absolute name")
        parts = raw.split(b"/")
        if b"" in parts or b"." in parts:             # "./x", "x/", "a//b"
            parts = [p for p in parts if p and p != b"."]
        if b".." in parts:
            raise HostileArchive(f"entry {shown!r}: '..' in its name")
        return tuple(parts)

    def _trim_cache(self) -> None:
        while len(self.cache) > MAX_CACHED_DIRS:
            _, fd = self.cache.popitem(last=False)
            os.close(fd)

    def dir_fd(self, parts: Tuple[bytes, ...], shown: str, create: bool = True) -> int:
        """fd of the directory ``parts`` (cached), walking down with O_NOFOLLOW and making
        missing directories (0755, as the engines do) when ``create``. Raises HostileArchive
        for a symlink or a non-directory on the way, FileNotFoundError when not ``create``."""
        if not parts:
            return self.root_fd
        fd = self.cache.get(parts)
        if fd is not None:
            self.cache.move_to_end(parts)
            return fd
        # the deepest cached ancestor, then down from there
        i = len(parts) - 1
        while i > 0 and parts[:i] not in self.cache:
            i -= 1
        fd = self.cache[parts[:i]] if i > 0 else self.root_fd
        if i > 0:
            self.cache.move_to_end(parts[:i])
        for j in range(i, len(parts)):
            name = parts[j]
            self.wait(parts[:j + 1])          # a file still being written may have this name
            try:
                child = os.open(name, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o700, dir_fd=fd)
                self.dirs[parts[:j + 1]] = (0o755, None)
                child = os.open(name, O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = b"/".join(parts[:j + 1]).decode("utf-8", "surrogateescape")
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise HostileArchive(f"entry {shown!r} leads through the symlink "
                                         f"{where!r}") from None
                raise HostileArchive(f"entry {shown!r}: {where!r} is not a "
                                     "directory") from None
            self.cache[parts[:j + 1]] = child
            fd = child
        return fd

    def forget(self, parts: Tuple[bytes, ...]) -> None:
        """``parts`` is going away: drop cached fds and pending attributes below it."""
        n = len(parts)
        for key in [k for k in self.cache if k[:n] == parts]:
            os.close(self.cache.pop(key))
        for key in [k for k in self.dirs if k[:n] == parts]:
            del self.dirs[key]

    def make_room(self, pfd: int, name: bytes, parts: Tuple[bytes, ...],
                  keep_dir: bool) -> bool:
        """``name`` exists in ``pfd``: True if it is a directory to keep (dir over dir);
        otherwise it is removed (the last entry wins) and False returned."""
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.drain()
            self.forget(parts)
            rmtree_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    # ------------------------------------------------------------------ attributes
    def _owner(self, do, m: Member, shown: str) -> None:
        if m.uid == self.euid and m.gid == self.egid:
            return
        try:
            do()
        except OSError as e:
            if e.errno not in _NOPRIV:
                raise
            self.warnings.add("owner", shown, f"{m.uid}:{m.gid}")

    def _xattrs(self, m: Member, shown: str) -> List[Tuple[str, bytes]]:
        if not m.xattrs:
            return m.xattrs
        out = []
        for name, value in m.xattrs:
            if ondisk.is_private_xattr(name):
                self.warnings.add("overlay-xattr", shown, name)
                continue
            out.append((name, value))
        return out

    def _set_xattrs(self, target, pairs, shown: str, follow: bool = True) -> None:
        for name, value in pairs:
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in _NOPRIV:
                    raise
                self.warnings.add("xattr", shown, f"{name}: {e.strerror}")

    # ------------------------------------------------------------------ entries
    def apply(self, m: Member, reader) -> None:
        shown = m.shown
        parts = self.split(m.name, shown)
        if not parts:
            if not m.isdir():
                raise HostileArchive(f"entry {shown!r} would replace the layer's root")
            self._owner(lambda: os.fchown(self.root_fd, m.uid, m.gid), m, shown)
            self._set_xattrs(self.root_fd, self._xattrs(m, shown), shown)
            self.dirs[()] = (m.mode & 0o7777, mtime_ns(m))
            return
        name = parts[-1]
        if not self.keep and name.startswith(ondisk.WH_PREFIX):
            self.marker(m, parts, shown)
            return
        self.wait(parts)
        pfd = self.dir_fd(parts[:-1], shown)
        t = m.type
        if t in REGULAR and not m.sparse:
            self.regular(m, pfd, parts, shown, reader)
        elif t == b"5":
            self.directory(m, pfd, parts, shown)
        elif m.issparse():
            raise CorruptData(f"entry {shown!r} is a sparse file (not allowed in OCI layers)")
        elif t == b"1":
            self.hardlink(m, pfd, parts, shown)
        elif t == b"2":
            self.symlink(m, pfd, parts, shown)
        elif t == b"3" or t == b"4":
            self.device(m, pfd, parts, shown)
        elif t == b"6":
            self.fifo(m, pfd, parts, shown)
        else:
            raise CorruptData(f"entry {shown!r} has an unsupported tar type {m.type!r}")

    def marker(self, m: Member, parts: Tuple[bytes, ...], shown: str) -> None:
        name = parts[-1]
        if name == ondisk.OPAQUE_MARKER:
            dfd = self.dir_fd(parts[:-1], shown)
            os.setxattr(dfd, self.opaque_xattr, b"y")
            self.stats.opaques += 1
            return
        if name.startswith(ondisk.AUFS_META_PREFIX):
            return                              # AUFS internals (.wh..wh.plnk ...): skipped
        target = name[len(ondisk.WH_PREFIX):]
        if target in (b"", b".", b".."):
            raise HostileArchive(f"entry {shown!r}: invalid whiteout name")
        pfd = self.dir_fd(parts[:-1], shown)
        tparts = parts[:-1] + (target,)
        self.wait(tparts)
        try:
            os.mknod(target, ondisk.WHITEOUT_MODE, ondisk.WHITEOUT_DEV, dir_fd=pfd)
        except FileExistsError:
            self.make_room(pfd, target, tparts, keep_dir=False)
            os.mknod(target, ondisk.WHITEOUT_MODE, ondisk.WHITEOUT_DEV, dir_fd=pfd)
        if self.euid == 0 and (m.uid or m.gid):
            try:
                os.chown(target, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _NOPRIV:
                    raise
        ns = mtime_ns(m)                      # the marker's time: the same tree every time
        os.utime(target, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        self.stats.whiteouts += 1

    def directory(self, m, pfd, parts, shown) -> None:
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            if not self.make_room(pfd, name, parts, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=pfd)
        fd = self.dir_fd(parts, shown)
        self._owner(lambda: os.fchown(fd, m.uid, m.gid), m, shown)
        self._set_xattrs(fd, self._xattrs(m, shown), shown)
        self.dirs[parts] = (m.mode & 0o7777, mtime_ns(m))
        self.stats.dirs += 1

    def _create_file(self, pfd, name, parts) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            self.make_room(pfd, name, parts, keep_dir=False)
            return os.open(name, flags, 0o600, dir_fd=pfd)

    def regular(self, m, pfd, parts, shown, reader) -> None:
        if self.pool is not None and m.size <= POOL_FILE_MAX:
            data = b""
            if m.size:
                reader.seek(m.offset_data)
                data = reader.read(m.size)
                if len(data) != m.size:
                    raise CorruptData(f"truncated tar (in the data of {shown!r})")
            job = _Job(self, m, parts, shown, data, os.dup(pfd))
            job.future = self.pool.submit(job.run)
            self.pending[parts] = job
            self.pending_bytes += len(data)
            self.stats.files += 1
            self.stats.bytes += m.size
            self._throttle()
            return
        fd = self._create_file(pfd, parts[-1], parts)
        try:
            if m.size:
                reader.seek(m.offset_data)
                remaining = m.size
                while remaining:
                    chunk = reader.view(remaining if remaining < CHUNK else CHUNK)
                    if not chunk:
                        raise CorruptData(f"truncated tar (in the data of {shown!r})")
                    write_all(fd, chunk)           # straight from the reader's buffer
                    remaining -= len(chunk)
            self.file_attrs(fd, m, shown)
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def file_attrs(self, fd: int, m, shown: str) -> None:
        if m.uid != self.euid or m.gid != self.egid:
            self._owner(lambda: os.fchown(fd, m.uid, m.gid), m, shown)
        os.fchmod(fd, m.mode & 0o7777)
        if m.xattrs:                                          # after chown: it clears
            self._set_xattrs(fd, self._xattrs(m, shown), shown)   # security.capability
        ns = m.mtime_ns if m.mtime_ns is not None else m.mtime * 1_000_000_000
        os.utime(fd, ns=(ns, ns))

    def hardlink(self, m, pfd, parts, shown) -> None:
        link_shown = m.linkname.decode("utf-8", "surrogateescape")
        tparts = self.split(m.linkname, link_shown)
        outside = HostileArchive(f"entry {shown!r}: hard link to {link_shown!r}, which "
                                 "is not an earlier entry of this layer")
        if not tparts:
            raise outside
        self.wait(tparts)
        try:
            tfd = self.dir_fd(tparts[:-1], shown, create=False)
            st = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise outside from None
        except NotADirectoryError:
            raise outside from None
        if stat.S_ISDIR(st.st_mode):
            raise HostileArchive(f"entry {shown!r}: hard link to the directory "
                                 f"{link_shown!r}")
        name = parts[-1]
        try:
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            cur = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                return
            self.make_room(pfd, name, parts, keep_dir=False)
            # make_room may have closed tfd (if it was below what it removed): reopen
            tfd = self.dir_fd(tparts[:-1], shown, create=False)
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _small_attrs(self, m, pfd, name, shown, chmod: bool) -> None:
        """Owner, mode, xattrs and mtime of a symlink, device or fifo, by name."""
        self._owner(lambda: os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False),
                    m, shown)
        if chmod:
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        pairs = self._xattrs(m, shown)
        if pairs:
            self._set_xattrs(proc_path(pfd, name), pairs, shown, follow=False)
        ns = mtime_ns(m)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def symlink(self, m, pfd, parts, shown) -> None:
        name = parts[-1]
        target = m.linkname
        try:
            os.symlink(target, name, dir_fd=pfd)
        except FileExistsError:
            self.make_room(pfd, name, parts, keep_dir=False)
            os.symlink(target, name, dir_fd=pfd)
        self._small_attrs(m, pfd, name, shown, chmod=False)
        self.stats.symlinks += 1

    def device(self, m, pfd, parts, shown) -> None:
        name = parts[-1]
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        dev = os.makedev(m.devmajor, m.devminor)
        try:
            try:
                os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
            except FileExistsError:
                self.make_room(pfd, name, parts, keep_dir=False)
                os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
        except PermissionError:
            self.warnings.add("device", shown, f"{'char' if m.ischr() else 'block'} "
                                               f"{m.devmajor}:{m.devminor}")
            return
        self._small_attrs(m, pfd, name, shown, chmod=True)
        self.stats.devices += 1

    def fifo(self, m, pfd, parts, shown) -> None:
        name = parts[-1]
        try:
            os.mkfifo(name, 0o600, dir_fd=pfd)
        except FileExistsError:
            self.make_room(pfd, name, parts, keep_dir=False)
            os.mkfifo(name, 0o600, dir_fd=pfd)
        self._small_attrs(m, pfd, name, shown, chmod=True)
        self.stats.fifos += 1

    # ------------------------------------------------------------------ the end
    def finish_dirs(self) -> None:
        """Directory modes and mtimes, deepest first, the root last."""
        root = self.dirs.pop((), (0o755, None))
        for parts in sorted(self.dirs, key=len, reverse=True):
            mode, ns = self.dirs[parts]
            fd = self.dir_fd(parts, "/".join(p.decode("utf-8", "surrogateescape")
                                             for p in parts), create=False)
            os.fchmod(fd, mode)
            if ns is not None:
                os.utime(fd, ns=(ns, ns))
            self._trim_cache()
        os.fchmod(self.root_fd, root[0])
        if root[1] is not None:
            os.utime(self.root_fd, ns=(root[1], root[1]))


class _Job:
    """One small regular file, written by a worker thread into a dup of its parent's fd."""

    __slots__ = ("ex", "m", "parts", "shown", "data", "pfd", "future")

    def __init__(self, ex: Extractor, m, parts, shown, data: bytes, pfd: int):
        self.ex, self.m, self.parts, self.shown, self.data, self.pfd = \
            ex, m, parts, shown, data, pfd
        self.future = None

    def run(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.parts[-1], flags, 0o600, dir_fd=self.pfd)   # EEXIST: see _finish
        self.write(fd)

    def write(self, fd: int) -> None:
        try:
            if self.data:
                write_all(fd, self.data)
            self.ex.file_attrs(fd, self.m, self.shown)
        finally:
            os.close(fd)

    def pfd_main(self, ex: Extractor) -> int:
        return ex.dir_fd(self.parts[:-1], self.shown)

    def discard(self) -> None:
        if self.pfd >= 0:
            os.close(self.pfd)
            self.pfd = -1


def unpack_tar(reader, root_fd: int, *, namespace: str, keep_markers: bool = False,
               warnings: Optional[Warnings] = None, task=None, what: str = "layer",
               threads: int = DEFAULT_THREADS) -> Stats:
    """Extract the tar that ``reader`` yields into the empty directory ``root_fd``."""
    return Extractor(root_fd, namespace=namespace, keep_markers=keep_markers,
                     warnings=warnings, task=task, what=what, threads=threads).run(reader)
