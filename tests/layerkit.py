"""Test helpers for building layer stacks and comparing merged views.

This module is imported by every mount-level test file; keep its API stable.

Building layers
---------------
``make_layer(root, spec)`` builds one layer directory from a dict that maps a relative
path to what should be there::

    make_layer(tmp / "lower", {
        "etc/motd": "hi",                       # regular file (str is utf-8 encoded)
        "bin/tool": b"\\x7fELF...",             # regular file from bytes
        "usr/doc": WHITEOUT,                   # char 0/0 whiteout (kernel format)
        "usr/man": WHITEOUT_OCI,               # empty file usr/.wh.man (OCI/AUFS format)
        "usr/info": WHITEOUT_XATTR,            # kernel >= 6.7 "xwhiteout": empty file with
                                               # trusted.overlay.whiteout, parent opaque=x
        "var": OPAQUE,                         # dir with trusted.overlay.opaque=y
        "srv": OPAQUE_OCI,                     # dir containing .wh..wh..opq
        "l": Symlink("target"),
        "h": Hardlink("etc/motd"),             # hard link to another path of this layer
        "p": FIFO,
        "d/": DIR,                             # a trailing slash also means "directory"
        "e": Dir(mode=0o700, xattrs={"user.k": b"v"}),
        "x": File(b"..", mode=0o640, uid=1000, gid=1000, xattrs={"user.a": b"1"}),
        "dev/null": CharDevice(1, 3),
        "dev/sda": BlockDevice(8, 0),
        "s": SOCKET,
    })

Parent directories are created as needed (mode 0755). Directory modes, ownership and
xattrs are applied last, deepest first, so read-only directories can still be filled.
``WHITEOUT`` is an alias of ``WHITEOUT_KERNEL`` and ``OPAQUE`` of ``OPAQUE_KERNEL``.

``to_kernel_format(layer_dir)`` rewrites, in place, the OCI markers of a layer into the
kernel's format (``.wh.X`` -> char 0/0 ``X``; ``D/.wh..wh..opq`` -> xattr
``trusted.overlay.opaque=y`` on ``D``). Use it on a copy (``copy_tree``).

Looking at a merged tree
------------------------
``snapshot(root)`` returns ``{relpath: {attribute: value}}`` for every entry below ``root``
(``"."`` is the root itself). ``diff_snapshots(a, b)`` lists the differences as strings.

Mounting
--------
``kernel_overlay(lowers, upper, work, mnt)`` mounts the kernel overlay; ``fuse_mount(prog,
lowers, upper, work, mnt, options)`` runs a FUSE overlay daemon (ours by default, or the
program named by ``prog`` / ``$OVL_TEST_PROG``) in the foreground and unmounts it on exit,
asserting the daemon exited 0. Both are context managers and always unmount.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

__all__ = [
    "File", "Dir", "Symlink", "Hardlink", "Device", "CharDevice", "BlockDevice",
    "Fifo", "FIFO", "DIR", "SOCKET",
    "WHITEOUT", "WHITEOUT_KERNEL", "WHITEOUT_OCI", "WHITEOUT_XATTR", "OPAQUE", "OPAQUE_KERNEL", "OPAQUE_OCI",
    "OCI_WHITEOUT_PREFIX", "OCI_OPAQUE_NAME", "OVERLAY_XATTR_PREFIX",
    "make_layer", "to_kernel_format", "copy_tree", "snapshot", "diff_snapshots",
    "kernel_overlay", "fuse_mount", "FuseMount", "daemon_command", "is_mounted",
    "mounts_under", "unmount_quietly", "kernel_overlay_available", "fuse_available",
    "abort_fuse_mounts_under", "kill_descendants",
]

OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_NAME = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"

# --------------------------------------------------------------------------------------
# Spec value types
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class File:
    """A regular file. ``content`` may be str (utf-8) or bytes."""
    content: Union[str, bytes] = b""
    mode: int = 0o644
    uid: Optional[int] = None
    gid: Optional[int] = None
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    mtime: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Dir:
    """A directory (created even if empty)."""
    mode: int = 0o755
    uid: Optional[int] = None
    gid: Optional[int] = None
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    mtime: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Symlink:
    target: str
    uid: Optional[int] = None
    gid: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target``, a path relative to the same layer's root."""
    target: str


@dataclasses.dataclass(frozen=True)
class Device:
    kind: str            # "c" or "b"
    major: int
    minor: int
    mode: int = 0o644
    uid: Optional[int] = None
    gid: Optional[int] = None


def CharDevice(major: int, minor: int, mode: int = 0o644) -> Device:
    return Device("c", major, minor, mode)


def BlockDevice(major: int, minor: int, mode: int = 0o644) -> Device:
    return Device("b", major, minor, mode)


@dataclasses.dataclass(frozen=True)
class Fifo:
    mode: int = 0o644


@dataclasses.dataclass(frozen=True)
class Socket:
    mode: int = 0o755


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


WHITEOUT_KERNEL = _Marker("WHITEOUT_KERNEL")   # char device 0/0 named NAME
WHITEOUT_XATTR = _Marker("WHITEOUT_XATTR")     # empty file + trusted.overlay.whiteout; parent opaque=x
WHITEOUT_OCI = _Marker("WHITEOUT_OCI")         # empty regular file .wh.NAME
OPAQUE_KERNEL = _Marker("OPAQUE_KERNEL")       # dir with trusted.overlay.opaque=y
OPAQUE_OCI = _Marker("OPAQUE_OCI")             # dir containing .wh..wh..opq
WHITEOUT = WHITEOUT_KERNEL
OPAQUE = OPAQUE_KERNEL
FIFO = Fifo()
DIR = Dir()
SOCKET = Socket()

SpecValue = Union[str, bytes, File, Dir, Symlink, Hardlink, Device, Fifo, Socket, _Marker]

# --------------------------------------------------------------------------------------
# Building layers
# --------------------------------------------------------------------------------------


def _chown(path: Path, uid: Optional[int], gid: Optional[int]) -> None:
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid,
                 follow_symlinks=False)


def _set_xattrs(path: Path, xattrs: Mapping[str, bytes]) -> None:
    for name, value in xattrs.items():
        if isinstance(value, str):
            value = value.encode()
        os.setxattr(path, name, value, follow_symlinks=False)


def _mkparents(root: Path, rel: str) -> None:
    parent = (root / rel).parent
    parent.mkdir(parents=True, exist_ok=True)


def make_layer(root: Union[str, os.PathLike], spec: Mapping[str, SpecValue]) -> Path:
    """Create (or add to) the layer directory ``root`` according to ``spec``.

    Returns ``root`` as a Path. Raises ValueError for inconsistent specs.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dirs_to_finish: List[tuple] = []       # (path, Dir) applied last, deepest first
    hardlinks: List[tuple] = []

    def norm(rel: str) -> str:
        rel = rel.strip("/")
        if not rel or rel.startswith("../") or "/../" in f"/{rel}/":
            raise ValueError(f"bad spec path {rel!r}")
        return rel

    # Directories first (shortest path first) so that files can be created inside them.
    items = sorted(spec.items(), key=lambda kv: (not _is_dir_value(kv[0], kv[1]),
                                                  kv[0].count("/")))
    for raw, value in items:
        is_dir = raw.endswith("/")
        rel = norm(raw)
        path = root / rel
        if is_dir and value is not DIR and not isinstance(value, Dir) and \
                value not in (OPAQUE_KERNEL, OPAQUE_OCI):
            raise ValueError(f"{raw!r}: trailing slash but value {value!r} is not a directory")
        _mkparents(root, rel)
        if isinstance(value, (str, bytes)):
            value = File(value)
        if isinstance(value, Dir):
            path.mkdir(exist_ok=True)
            dirs_to_finish.append((path, value))
        elif value is OPAQUE_KERNEL:
            path.mkdir(exist_ok=True)
            os.setxattr(path, OPAQUE_XATTR, b"y")
        elif value is OPAQUE_OCI:
            path.mkdir(exist_ok=True)
            (path / OCI_OPAQUE_NAME).touch()
        elif isinstance(value, File):
            data = value.content.encode() if isinstance(value.content, str) else value.content
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, value.mode)
            _chown(path, value.uid, value.gid)
            _set_xattrs(path, value.xattrs)
            if value.mtime is not None:
                os.utime(path, (value.mtime, value.mtime))
        elif isinstance(value, Symlink):
            os.symlink(value.target, path)
            _chown(path, value.uid, value.gid)
        elif isinstance(value, Hardlink):
            hardlinks.append((path, root / norm(value.target)))
        elif isinstance(value, Device):
            kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[value.kind]
            os.mknod(path, kind | value.mode, os.makedev(value.major, value.minor))
            os.chmod(path, value.mode)       # mknod is subject to the umask
            _chown(path, value.uid, value.gid)
        elif isinstance(value, Fifo):
            os.mkfifo(path, value.mode)
            os.chmod(path, value.mode)
        elif isinstance(value, Socket):
            os.mknod(path, stat.S_IFSOCK | value.mode)
            os.chmod(path, value.mode)
        elif value is WHITEOUT_KERNEL:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif value is WHITEOUT_OCI:
            (path.parent / (OCI_WHITEOUT_PREFIX + path.name)).touch()
        elif value is WHITEOUT_XATTR:
            path.touch()
            os.setxattr(path, "trusted.overlay.whiteout", b"y")
            try:
                current = os.getxattr(path.parent, OPAQUE_XATTR)
            except OSError:
                current = b""
            if current[:1] != b"y":          # an opaque dir needs no whiteouts
                os.setxattr(path.parent, OPAQUE_XATTR, b"x")
        else:
            raise ValueError(f"{raw!r}: unknown spec value {value!r}")

    for path, target in hardlinks:
        if not os.path.lexists(target):
            raise ValueError(f"hard link {path} -> {target}: target not in the layer")
        os.link(target, path, follow_symlinks=False)

    for path, d in sorted(dirs_to_finish, key=lambda pd: -len(pd[0].parts)):
        _set_xattrs(path, d.xattrs)
        _chown(path, d.uid, d.gid)
        os.chmod(path, d.mode)
        if d.mtime is not None:
            os.utime(path, (d.mtime, d.mtime))
    return root


def _is_dir_value(key: str, value: SpecValue) -> bool:
    return key.endswith("/") or isinstance(value, Dir) or value in (OPAQUE_KERNEL, OPAQUE_OCI)


def copy_tree(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> Path:
    """Copy a layer preserving everything the overlay cares about (``cp -a``: modes,
    owners, times, hard links, device nodes, fifos, and all xattrs incl. trusted.*)."""
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(dst)
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    return dst


def to_kernel_format(layer_dir: Union[str, os.PathLike]) -> None:
    """Convert OCI markers in ``layer_dir`` (in place) into kernel overlay markers.

    ``D/.wh.X`` (any type) becomes a char 0/0 device ``D/X``; ``D/.wh..wh..opq`` is removed
    and ``D`` gets ``trusted.overlay.opaque=y``. Raises ValueError if ``.wh.X`` sits next to
    a real ``X`` (the OCI spec says a whiteout never applies to its own layer, so such a
    layer is ambiguous). Other ``.wh..wh.*`` names (AUFS internals) and the invalid
    ``.wh..`` / ``.wh...`` (which would hide ``.`` / ``..``) are removed. The
    times of the directories it changes are restored.
    """
    layer_dir = Path(layer_dir)
    touched = {}          # dir -> (atime_ns, mtime_ns) to restore: the conversion is not a change
    for dirpath, dirnames, filenames in os.walk(layer_dir):
        names = list(dirnames) + list(filenames)
        d = Path(dirpath)
        if any(n.startswith(OCI_WHITEOUT_PREFIX) for n in names):
            st = os.lstat(d)
            touched[d] = (st.st_atime_ns, st.st_mtime_ns)
        for name in names:
            if not name.startswith(OCI_WHITEOUT_PREFIX):
                continue
            p = d / name
            if name == OCI_OPAQUE_NAME:
                os.unlink(p)
                os.setxattr(d, OPAQUE_XATTR, b"y")
                continue
            if name.startswith(".wh..wh."):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                continue
            hidden = name[len(OCI_WHITEOUT_PREFIX):]
            if not hidden:
                raise ValueError(f"{p}: '.wh.' alone is not a valid whiteout")
            if hidden in (".", ".."):
                # '.wh..' / '.wh...' would hide '.' or '..': invalid, dropped.
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                continue
            target = d / hidden
            if os.path.lexists(target):
                raise ValueError(f"{p}: whiteout next to an existing {hidden!r} in the same layer")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                os.unlink(p)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        dirnames[:] = [n for n in dirnames if (d / n).is_dir() and not (d / n).is_symlink()
                       and not n.startswith(OCI_WHITEOUT_PREFIX)]
    for d, (atime_ns, mtime_ns) in touched.items():
        os.utime(d, ns=(atime_ns, mtime_ns), follow_symlinks=False)


# --------------------------------------------------------------------------------------
# Snapshots of a merged tree
# --------------------------------------------------------------------------------------

_TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _default_xattr_filter(name: str) -> bool:
    return (name.startswith("user.") or name.startswith("security.")) and \
        not name.startswith(OVERLAY_XATTR_PREFIX)


def _xattrs(path: str, keep) -> Dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    out = {}
    for n in sorted(names):
        if not keep(n):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False).hex()
        except OSError as e:
            out[n] = f"<{errno.errorcode.get(e.errno, e.errno)}>"
    return out


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(root: Union[str, os.PathLike], *, nlink: bool = True, times: bool = False,
             xattr_filter=_default_xattr_filter, link_groups: bool = True,
             dir_nlink: bool = False) -> Dict[str, Dict[str, object]]:
    """Describe every entry below ``root`` (not following symlinks).

    Per path: ``type``, ``mode`` (full st_mode), ``uid``, ``gid``; files: ``size``,
    ``sha256``; symlinks: ``target``; devices: ``rdev`` as "major:minor"; all entries:
    ``xattrs`` (filtered by ``xattr_filter``: user.* and security.* by default; the
    overlay's own trusted.overlay.* are never included). Optional: ``nlink`` for non-dirs
    (default on), ``dir_nlink``, ``mtime`` (``times=True``), and ``links``: for non-dirs the
    sorted tuple of all *other* snapshot paths sharing the same st_ino (hard-link groups,
    compared by membership so that two mounts with different inode numbers compare equal).
    The root itself is reported as ``"."``.
    """
    root = os.fspath(root)
    snap: Dict[str, Dict[str, object]] = {}
    by_ino: Dict[int, List[str]] = {}

    def describe(rel: str, full: str) -> None:
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        e: Dict[str, object] = {
            "type": _TYPE_NAMES.get(fmt, oct(fmt)),
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
        if fmt == stat.S_IFREG:
            e["size"] = st.st_size
            e["sha256"] = file_sha256(full)
        elif fmt == stat.S_IFLNK:
            e["target"] = os.readlink(full)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            e["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        if fmt != stat.S_IFDIR:
            if nlink:
                e["nlink"] = st.st_nlink
            by_ino.setdefault(st.st_ino, []).append(rel)
        elif dir_nlink:
            e["nlink"] = st.st_nlink
        if times:
            e["mtime"] = st.st_mtime_ns
        e["xattrs"] = _xattrs(full, xattr_filter)
        snap[rel] = e

    describe(".", root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            describe(rel, full)
        # os.walk does not follow symlinks to dirs by default; keep it that way.
    if link_groups:
        for paths in by_ino.values():
            for p in paths:
                snap[p]["links"] = tuple(sorted(q for q in paths if q != p))
    return snap


def diff_snapshots(a: Mapping[str, Mapping[str, object]], b: Mapping[str, Mapping[str, object]],
                   names: Sequence[str] = ("a", "b"), ignore: Iterable[str] = ()) -> List[str]:
    """Human-readable differences between two snapshots (empty list: identical)."""
    ignore = set(ignore)
    out: List[str] = []
    for p in sorted(set(a) | set(b)):
        if p not in b:
            out.append(f"{p}: only in {names[0]} ({a[p].get('type')})")
            continue
        if p not in a:
            out.append(f"{p}: only in {names[1]} ({b[p].get('type')})")
            continue
        ea, eb = a[p], b[p]
        for k in sorted(set(ea) | set(eb)):
            if k in ignore:
                continue
            va, vb = ea.get(k, "<absent>"), eb.get(k, "<absent>")
            if va != vb:
                out.append(f"{p}: {k}: {names[0]}={va!r} {names[1]}={vb!r}")
    return out


# --------------------------------------------------------------------------------------
# Mounting
# --------------------------------------------------------------------------------------


def _unescape_mount_path(s: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1:i + 4]) == 3 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts_under(prefix: Union[str, os.PathLike]) -> List[str]:
    """Mount points listed in /proc/mounts at or below ``prefix`` (deepest first)."""
    prefix = os.path.realpath(os.fspath(prefix))
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = _unescape_mount_path(line.split()[1])
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                found.append(mp)
    return sorted(found, key=lambda m: -m.count("/"))


def is_mounted(path: Union[str, os.PathLike]) -> bool:
    path = os.path.realpath(os.fspath(path))
    return path in mounts_under(path)


def unmount_quietly(path: Union[str, os.PathLike]) -> None:
    """Lazy-unmount ``path`` whatever it is (FUSE or kernel); never raises."""
    path = os.fspath(path)
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _fuse_mounts_with_dev(prefix: str) -> List[tuple]:
    """(mountpoint, minor) of FUSE mounts at or below ``prefix``, from mountinfo."""
    prefix = os.path.realpath(prefix)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            mp = _unescape_mount_path(fields[4])
            if not (fstype == "fuse" or fstype.startswith("fuse.")):
                continue
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                out.append((mp, int(fields[2].split(":")[1])))
    return out


def abort_fuse_mounts_under(prefix: Union[str, os.PathLike]) -> List[str]:
    """Abort the FUSE connection of every FUSE mount at or below ``prefix`` (through
    fusectl, mounting it if needed): every request pending on it fails with ENOTCONN, so a
    process stuck on a hung daemon wakes up. Returns the mount points aborted."""
    conn_dir = "/sys/fs/fuse/connections"
    mounts = _fuse_mounts_with_dev(os.fspath(prefix))
    if mounts and os.path.isdir(conn_dir) and not os.listdir(conn_dir):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conn_dir],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = []
    for mp, minor in mounts:
        with contextlib.suppress(OSError):
            with open(f"{conn_dir}/{minor}/abort", "w") as f:
                f.write("1")
            done.append(mp)
    return done


def kill_descendants(pid: int, sig: int = 9) -> List[int]:
    """Send ``sig`` to every descendant process of ``pid`` (not ``pid`` itself)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    killed, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
            killed.append(p)
    return killed


def kernel_overlay_available() -> bool:
    if os.geteuid() != 0:
        return False
    modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/usr/sbin:/sbin")
    if modprobe:
        subprocess.run([modprobe, "overlay"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def fuse_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@contextlib.contextmanager
def kernel_overlay(lowers: Sequence[Union[str, os.PathLike]], upper=None, work=None, *,
                   mnt: Union[str, os.PathLike], options: Sequence[str] = ()) -> Iterator[str]:
    """Mount the kernel overlay on ``mnt`` (``umount -l`` on exit).

    The kernel refuses a single lower layer without an upper; in that case an empty
    bottom layer (a temporary directory) is appended, which changes nothing visible.
    """
    lowers = [os.fspath(x) for x in lowers]
    mnt = os.fspath(mnt)
    tmp_bottom = None
    if upper is None and len(lowers) == 1:
        tmp_bottom = tempfile.mkdtemp(prefix="ovl-empty-bottom-")
        lowers.append(tmp_bottom)
    opts = ["lowerdir=" + ":".join(x.replace(":", "\\:") for x in lowers)]
    if upper is not None:
        if work is None:
            raise ValueError("kernel overlay: upperdir needs a workdir")
        opts += [f"upperdir={os.fspath(upper)}", f"workdir={os.fspath(work)}"]
    opts += list(options)
    try:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), mnt],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kernel overlay mount failed ({r.returncode}): {r.stderr.strip()}"
                               f" options={','.join(opts)}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    finally:
        if tmp_bottom is not None:
            shutil.rmtree(tmp_bottom, ignore_errors=True)


def daemon_command(prog: Optional[str], opts: str, mnt: str) -> List[str]:
    """The foreground command line for a FUSE overlay daemon.

    ``prog``: a shell-quoted command (e.g. ``"fuse-overlayfs"``); None means
    ``$OVL_TEST_PROG`` if set, else our own ``python -m overlayfs_py``.
    """
    if prog is None:
        prog = os.environ.get("OVL_TEST_PROG") or None
    if prog:
        return [*shlex.split(prog), "-f", "-o", opts, mnt]
    return [sys.executable, "-m", "overlayfs_py", "-f", "-o", opts, mnt]


def _fuse_opts(lowers, upper, work, options) -> str:
    parts = ["lowerdir=" + ":".join(os.fspath(x).replace(":", "\\:") for x in lowers)]
    if upper is not None:
        parts.append(f"upperdir={os.fspath(upper)}")
    if work is not None:
        parts.append(f"workdir={os.fspath(work)}")
    parts += list(options)
    return ",".join(parts)


@dataclasses.dataclass
class FuseMount:
    mountpoint: str
    proc: subprocess.Popen
    argv: List[str]
    log_path: str
    stuck: str = ""      # where the daemon's threads waited, if it outlived the unmount

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def path(self) -> Path:
        return Path(self.mountpoint)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@contextlib.contextmanager
def fuse_mount(prog: Optional[str], lowers, upper=None, work=None, mnt=None, options=(), *,
               timeout: float = 20.0, check_exit: bool = True, env=None,
               wrapper: Sequence[str] = ()) -> Iterator[FuseMount]:
    """Run a FUSE overlay daemon in the foreground on ``mnt``; unmount on exit.

    Waits up to ``timeout`` seconds for the mount to appear (fails with the daemon's
    output otherwise). On exit: ``fusermount3 -u`` (falling back to ``-u -z``), wait for the
    daemon, and -- if ``check_exit`` -- assert it exited 0, so a crashed filesystem fails
    the test. ``wrapper`` is prepended to the command (e.g. ``["strace", "-f", ...]``).
    """
    if mnt is None:
        raise ValueError("fuse_mount: mnt is required")
    mnt = os.fspath(mnt)
    argv = [*wrapper, *daemon_command(prog, _fuse_opts(lowers, upper, work, options), mnt)]
    log_fd, log_path = tempfile.mkstemp(prefix="ovl-daemon-", suffix=".log")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                            env=env, start_new_session=True)
    os.close(log_fd)
    m = FuseMount(mnt, proc, argv, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mnt):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} before mounting:"
                                     f" {shlex.join(argv)}\n{m.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mount did not appear within {timeout}s:"
                                     f" {shlex.join(argv)}\n{m.log()}")
            time.sleep(0.02)
        yield m
    finally:
        exc_pending = sys.exc_info()[0] is not None
        rc = _stop_daemon(m)
        keep_log = os.environ.get("OVL_KEEP_LOGS")
        log = m.log()
        if not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(log_path)
        if check_exit and not exc_pending and rc != 0:
            what = (f"did not exit within 20 s of the unmount (killed); its threads:\n"
                    f"{m.stuck}" if rc is None
                    else f"exited with status {rc}")
            raise AssertionError(f"daemon {what} ({shlex.join(argv)}):\n{log}")


def thread_states(pid: int) -> str:
    """One line per thread of ``pid``: its name, state, wait channel and kernel stack
    (the stack needs root; what cannot be read is left out)."""
    lines = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"(no /proc/{pid}/task: {e.strerror})"
    for tid in tids:
        parts = []
        for name in ("comm", "wchan", "stack"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    text = f.read().strip()
            except OSError:
                continue
            parts.append(" <- ".join(l.split()[-1] for l in text.splitlines())
                         if name == "stack" else text)
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                parts.insert(1, f.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass
        lines.append(f"  thread {tid}: " + " | ".join(parts))
    return "\n".join(lines)


def mount_holders(mountpoint: str) -> str:
    """Processes of other mount namespaces in which ``mountpoint`` is still mounted, one
    per namespace. A namespace made while the mount existed (``unshare -m``, a container,
    rootless podman's pause process) holds a copy of it, and the FUSE connection lives
    until that copy goes: the daemon then rightly keeps serving after our unmount."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if ns == own or ns in found:
                continue
            with open(f"/proc/{pid}/mountinfo") as f:
                if any(line.split()[4] == mountpoint for line in f):
                    with open(f"/proc/{pid}/comm") as c:
                        found[ns] = f"{pid} ({c.read().strip()})"
        except (OSError, IndexError):
            continue
    return ", ".join(found.values())


def _stop_daemon(m: FuseMount) -> Optional[int]:
    mnt = m.mountpoint
    how = "fusermount3 -u"
    if is_mounted(mnt):
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if r.returncode != 0 and is_mounted(mnt):
            how = f"fusermount3 -u -z (after: {r.stderr.decode().strip()})"
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    try:
        return m.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        # The daemon did not notice the unmount. Record how it was unmounted, where each
        # of its threads waits, and who else still has the mount, then make sure nothing
        # is left behind.
        holders = mount_holders(os.fspath(mnt))
        m.stuck = (f"  unmounted by {how}; still mounted in the mount namespaces of: "
                   f"{holders or 'none'}\n" + thread_states(m.proc.pid))
        unmount_quietly(mnt)
        with contextlib.suppress(ProcessLookupError):
            m.proc.kill()
        m.proc.wait(timeout=10)
        return None
