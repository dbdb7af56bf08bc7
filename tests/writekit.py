"""Helpers for the write-path (upper layer) tests.

What lives here (and not in layerkit, which the infra helper owns):

- ``Stack``: a set of lower layers + an upper + a workdir, mountable either through the
  program under test (our daemon, or ``$OVL_TEST_PROG``) or through the kernel overlay
  driver, with a twin copy converted to the kernel's on-disk format.
- ``merged_snapshot`` / ``upper_snapshot``: comparable descriptions of a merged view and
  of an upper directory (kernel/FUSE private bookkeeping removed, everything that has a
  meaning kept: names, types, modes, owners, contents, whiteouts, opaque markers, xattrs).
- ``attempt``: run one syscall and return ``("ok", value)`` or ``("err", "ENOENT")``.
- ``renameat2`` via ctypes (RENAME_NOREPLACE / RENAME_EXCHANGE).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import layerkit

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# syscalls
# ---------------------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def renameat2(src, dst, flags=0):
    """rename(2) with flags; raises OSError like os.rename."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src), None, str(dst))


def attempt(fn, *args, **kwargs):
    """Run fn; return ("ok", result) or ("err", errno-name)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def outcome(res):
    """Only the success/errno part of an attempt() result."""
    return res[0] if res[0] == "ok" else res[1]


# ---------------------------------------------------------------------------------------------
# stacks and mounts (on top of layerkit)
# ---------------------------------------------------------------------------------------------

PRIVATE_XATTRS = (
    # bookkeeping the kernel or fuse-overlayfs (or we) may write; they do not change what the
    # merged view shows, so upper comparisons ignore them
    "trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.uuid",
    "trusted.overlay.nlink", "trusted.overlay.upper", "trusted.overlay.metacopy",
    "user.overlay.origin", "user.overlay.impure", "user.overlay.uuid", "user.overlay.nlink",
    "user.fuseoverlayfs.origin",
)
OPAQUE_ATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")

# Kernel overlay options that match what we implement: no redirect (EXDEV on merged dir
# rename), no index, no metacopy, no xino. These are the module defaults on this machine too.
KERNEL_OPTS = ("redirect_dir=off", "index=off", "metacopy=off", "xino=off")


def kernel_overlay_available():
    return layerkit.kernel_overlay_available()


def fuse_available():
    return layerkit.fuse_available()


def is_fuse_overlayfs():
    return "fuse-overlayfs" in (os.environ.get("OVL_TEST_PROG") or "")


def kernel_mode():
    return os.environ.get("OVL_TEST_PROG", "").strip() == "kernel"


def passthrough_by_default() -> bool:
    """Whether our daemon, mounted here with default options, uses FUSE passthrough (and
    so no writeback cache): root, a kernel and pyfuse3 build that have it."""
    if kernel_mode() or is_fuse_overlayfs() or os.environ.get("OVL_TEST_PROG", "").strip():
        return False
    try:
        from overlayfs_py.config import Config
        from overlayfs_py.passthrough import why_not
    except ImportError:
        return False
    return why_not(Config(lowers=("/",), mountpoint="/")) is None


class Stack:
    """Lower layers (top first) + upper + work + mount point under ``base/name``.

    Mounts are context managers entered on ``exits`` (a contextlib.ExitStack owned by the
    caller), so they are always unmounted."""

    def __init__(self, base, layer_specs, name="s", upper_spec=None):
        self.base = Path(base) / name
        self.base.mkdir(parents=True)
        self.lowers = [layerkit.make_layer(self.base / f"lower{i}", spec or {})
                       for i, spec in enumerate(layer_specs or [{}])]
        self.upper = layerkit.make_layer(self.base / "upper", upper_spec or {})
        self.work = self.base / "work"
        self.work.mkdir()
        self.mnt = self.base / "mnt"
        self.mnt.mkdir()

    @classmethod
    def from_dirs(cls, base, name, lowers, upper, work):
        self = cls.__new__(cls)
        self.base = Path(base) / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.lowers = [Path(x) for x in lowers]
        self.upper, self.work = Path(upper), Path(work)
        self.mnt = self.base / "mnt"
        self.mnt.mkdir(exist_ok=True)
        return self

    def clone(self, name, kernel_format=False, lowers=True):
        """A copy of this (unmounted) stack: lowers (unless lowers=False: shared), upper and
        an empty work dir. kernel_format converts the OCI markers of the copy."""
        other = Stack.__new__(Stack)
        other.base = self.base.parent / name
        other.base.mkdir()
        if lowers:
            other.lowers = []
            for i, d in enumerate(self.lowers):
                dst = layerkit.copy_tree(d, other.base / f"lower{i}")
                if kernel_format:
                    layerkit.to_kernel_format(dst)
                other.lowers.append(dst)
        else:
            other.lowers = list(self.lowers)
        other.upper = layerkit.copy_tree(self.upper, other.base / "upper")
        if kernel_format:
            layerkit.to_kernel_format(other.upper)
        other.work = other.base / "work"
        other.work.mkdir()
        other.mnt = other.base / "mnt"
        other.mnt.mkdir()
        return other

    def mount_ours(self, exits, options=(), **kw):
        """Mount with the program under test (ours or $OVL_TEST_PROG); returns FuseMount."""
        return exits.enter_context(layerkit.fuse_mount(
            None, self.lowers, self.upper, self.work, self.mnt, options, **kw))

    def mount_tested(self, exits, options=()):
        """Mount with what is under test: ours (or $OVL_TEST_PROG), or with
        OVL_TEST_PROG=kernel the kernel overlay (the lowers must be in kernel format)."""
        if kernel_mode():
            return self.mount_kernel(exits)
        return self.mount_ours(exits, options)

    def mount_kernel(self, exits, options=KERNEL_OPTS, lowers=None):
        """Mount with the kernel overlay (lowers may be replaced, e.g. by kernel-format
        copies); returns the mount point."""
        exits.enter_context(layerkit.kernel_overlay(
            lowers or self.lowers, self.upper, self.work, mnt=self.mnt, options=options))
        return self.mnt

    def kernel_lowers(self, name="klowers"):
        """Kernel-format copies of the lowers (for mounting this upper with the kernel)."""
        out = []
        base = self.base / name
        base.mkdir()
        for i, d in enumerate(self.lowers):
            dst = layerkit.copy_tree(d, base / f"lower{i}")
            layerkit.to_kernel_format(dst)
            out.append(dst)
        return out

    def reset_work(self):
        """Empty the workdir (it belongs to the previous mount: the kernel keeps its work/
        subdir and a shared whiteout there, fuse-overlayfs its temp files)."""
        shutil.rmtree(self.work)
        self.work.mkdir()


def mp(mount):
    """Mount point (str) of what mount_ours / mount_kernel / the conftest fixtures return."""
    if isinstance(mount, (str, os.PathLike)):
        return os.fspath(mount)
    return os.fspath(getattr(mount, "mountpoint", None) or mount.path)


def fuse_conn(mountpoint):
    """The /sys/fs/fuse/connections entry of a FUSE mount (take it while it answers)."""
    return f"/sys/fs/fuse/connections/{os.minor(os.stat(mountpoint).st_dev)}"


class Hang(AssertionError):
    pass


def abort_fuse_conn(conn) -> None:
    """Abort a FUSE connection (its /sys/fs/fuse/connections/N dir): every pending and
    later request fails with ENOTCONN. Best effort: it may be gone already."""
    try:
        with open(os.path.join(conn, "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


@contextlib.contextmanager
def hang_guard(conn, seconds, what="operation"):
    """Fail (instead of blocking the test run forever) when the FUSE daemon does not answer:
    after ``seconds`` the connection ``conn`` (see fuse_conn) is aborted, which makes every
    pending and later request fail with ENOTCONN, and Hang is raised."""
    fired = []

    def fire():
        fired.append(time.monotonic())
        abort_fuse_conn(conn)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    try:
        yield
    except OSError:
        if fired:
            raise Hang(f"{what}: no answer within {seconds}s; FUSE connection aborted "
                       f"(daemon hung or deadlocked)") from None
        raise
    finally:
        t.cancel()
    if fired:
        raise Hang(f"{what}: no answer within {seconds}s; FUSE connection aborted "
                   f"(daemon hung or deadlocked)")


def kill9(fm):
    """kill -9 a FUSE daemon (layerkit.FuseMount) and lazily unmount its mount point."""
    if fm.proc.poll() is None:
        os.kill(fm.proc.pid, signal.SIGKILL)
    fm.proc.wait(timeout=30)
    if layerkit.is_mounted(fm.mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", fm.mountpoint], capture_output=True)


# ---------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------

def merged_snapshot(root):
    """layerkit.snapshot of a merged view (types, modes, owners, sizes, contents, symlink
    targets, devices, user./security. xattrs, nlink of non-dirs, hard-link groups)."""
    return layerkit.snapshot(root)


def diff_snapshots(a, b, label_a="a", label_b="b"):
    return layerkit.diff_snapshots(a, b, names=(label_a, label_b))


def _upper_xattr_keep(n):
    return n not in PRIVATE_XATTRS


def upper_snapshot(upper):
    """Snapshot of an upper dir, normalized for comparing two overlays' uppers:
    a whiteout (char 0/0, any mode, any link count) -> {"type": "whiteout"}; directories
    get "opaque": True when any opaque xattr is "y" (the xattrs themselves are dropped);
    private bookkeeping xattrs (origin, impure, uuid, ...) are dropped; nlink and hard-link
    groups are left out (the kernel hard-links its whiteouts). Marker files (.wh.*) are kept
    as they are: they are part of the on-disk format and must show up as differences."""
    snap = layerkit.snapshot(upper, nlink=False, link_groups=False,
                             xattr_filter=_upper_xattr_keep)
    out = {}
    for rel, e in snap.items():
        if e["type"] == "chardev" and e.get("rdev") == "0:0":
            out[rel] = {"type": "whiteout"}
            continue
        e = dict(e)
        xa = dict(e["xattrs"])
        opaque = False
        for a in OPAQUE_ATTRS:
            v = xa.pop(a, None)
            if v is not None and v.startswith("79"):      # "y"
                opaque = True
        e["xattrs"] = xa
        if e["type"] == "dir":
            e["opaque"] = opaque
        out[rel] = e
    return out


def is_whiteout(path):
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_dir(path):
    for a in OPAQUE_ATTRS:
        try:
            if os.getxattr(path, a, follow_symlinks=False)[:1] == b"y":
                return True
        except OSError:
            pass
    return False


# ---------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------

def write_file(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644, fsync=False):
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def tempbase(prefix="ovlw-"):
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(d)
    finally:
        _force_cleanup(d)


def _force_cleanup(d):
    """Unmount anything still mounted under d (deepest first), then remove d."""
    for m in layerkit.mounts_under(d):
        layerkit.unmount_quietly(m)
    shutil.rmtree(d, ignore_errors=True)


def tree_paths(root):
    """Sorted relative paths of everything under root (no metadata)."""
    root = str(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def upper_of(stack, m):
    """The upper dir behind a conftest ``mounted`` mount (in OVL_TEST_PROG=kernel mode the
    fixture mounts a kernel-format copy, whose upper sits next to its mount point)."""
    if getattr(m, "pid", None) is None:
        return Path(mp(m)).parent / "upper"
    return Path(stack.upper)


def fuse_conns_under(path):
    """/sys/fs/fuse/connections entries of the FUSE mounts at or below path, read from
    /proc/self/mountinfo (no syscall on the mounts themselves: they may hang)."""
    path = os.path.realpath(os.fspath(path))
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mnt = layerkit._unescape_mount_path(parts[4])
            fstype = parts[parts.index("-") + 1]
            if not fstype.startswith("fuse"):
                continue
            if mnt == path or mnt.startswith(path.rstrip("/") + "/"):
                major, minor = parts[2].split(":")
                out.append(f"/sys/fs/fuse/connections/{int(minor)}")
    return out


@contextlib.contextmanager
def watchdog(path, seconds, what="test"):
    """Abort every FUSE connection below ``path`` if the block is still running after
    ``seconds`` (a hung daemon then fails the test with ENOTCONN instead of blocking the
    run); raises Hang on exit if it fired."""
    fired = []

    def fire():
        fired.append(True)
        for conn in fuse_conns_under(path):
            abort_fuse_conn(conn)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    try:
        yield fired
    except Exception:
        if fired:
            raise Hang(f"{what}: still running after {seconds}s; FUSE connections aborted")
        raise
    finally:
        t.cancel()
    if fired:
        raise Hang(f"{what}: still running after {seconds}s; FUSE connections aborted")


def compare_uppers(kern_upper, ours_upper, kern_lowers):
    """Compare two normalized upper dirs. Returns (differences, redundant): an entry that
    only one side has and that is an unmodified copy of the topmost lower entry (same type,
    mode, owner, xattrs, content) is a copy-up the other side did not need, which the merged
    view cannot show; those go to ``redundant`` instead of ``differences``."""
    a, b = upper_snapshot(kern_upper), upper_snapshot(ours_upper)
    lower_snaps = [upper_snapshot(d) for d in kern_lowers]
    diffs, redundant = [], []
    for rel in sorted(set(a) | set(b)):
        if rel in a and rel in b:
            if a[rel] != b[rel]:
                diffs += diff_snapshots({rel: a[rel]}, {rel: b[rel]}, "kernel", "ours")
            continue
        side, e = ("kernel", a[rel]) if rel in a else ("ours", b[rel])
        low = next((s[rel] for s in lower_snaps if rel in s), None)
        if low is not None and e.get("type") in ("dir", "file", "symlink") and \
                {k: v for k, v in low.items() if k != "opaque"} == \
                {k: v for k, v in e.items() if k != "opaque"} and not e.get("opaque"):
            redundant.append(f"{rel}: copied up only by {side} (unchanged copy of the lower)")
        else:
            diffs.append(f"{rel}: only in {side}'s upper: {e}")
    return diffs, redundant


def run_as(uid, gid, fn, groups=()):
    """Run fn() in a forked child with the given uid/gid and supplementary ``groups``
    (default none); returns "ok" or the errno name it failed with ("EXC" for any other
    exception)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
        except OSError as e:
            code = e.errno or 254
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return "ok"
    if code == 255:
        return "EXC"
    return errno.errorcode.get(code, str(code))


def make_traversable(path):
    """Add o+x to every ancestor of path (pytest's and mkdtemp's dirs are 0700), so that an
    unprivileged test user can reach a mount below it."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        try:
            m = stat.S_IMODE(os.lstat(d).st_mode)
            if not m & 0o001:
                os.chmod(d, m | 0o001)
        except OSError:
            pass
